"""``edgetune tasks`` and ``edgetune tune``."""

from __future__ import annotations

import json
import sys
import time

import click

from ..cliutil import emit, json_option, table, to_jsonable, tracker_option
from ..errors import EdgetuneError
from .variants import SERIAL, UNSCHEDULED

# How a trial of a small-kernel candidate (variants.py) is named on its progress line.
VARIANT_TEXT = {SERIAL: "its best schedule on one thread", UNSCHEDULED: "without a schedule"}

input_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="NAME:DxDxD",
    help="Static shape of an input the model leaves symbolic (repeatable), e.g. input:1x3x224x224.",
)
target_option = click.option(
    "--target", "target_json", metavar="JSON",
    help="TVM target dict for boards without an agent (default: the one the board's agent advertises).",
)


def _target_for(key: str, target_json: str | None):
    from ..toolchain import parse_target
    from .session import resolve_board_target

    if target_json:
        return parse_target(target_json), None
    found = resolve_board_target(key)
    if found is None:
        raise EdgetuneError(
            f"no agent of key {key!r} advertises its target on mDNS: pass --target JSON "
            "(for a board running plain TVM RPC) or start `edgetune-agent serve --key " + key + "` on it"
        )
    return found


@click.command()
@click.argument("model")
@click.option("--device", "key", required=True, help="Device key of the board (as in `edgetune devices`).")
@target_option
@input_shape_option
@json_option
def tasks(model: str, key: str, target_json: str | None, input_shapes: tuple[str, ...], as_json: bool) -> None:
    """List a model's tuning tasks for a board: name, FLOPs, weight, most benefit first.

    \b
    Example:
      edgetune tasks model.onnx --device rpi4
      edgetune tasks tiny_cnn --device x86 --target '{"kind":"llvm","mtriple":"x86_64-linux-gnu","mcpu":"znver4","num-cores":2}' --json
    """
    from ..models.onnx_import import load_onnx, parse_input_shapes
    from .tasks import extract_tasks

    loaded = load_onnx(model, parse_input_shapes(input_shapes))
    target, _ = _target_for(key, target_json)
    found = extract_tasks(loaded.mod, target)
    data = {"model": loaded.name, "key": key, "target": target, "tasks": [t.as_dict() for t in found]}

    def render(d) -> str:
        rows = [[t["index"], t["name"], f"{t['flops'] / 1e6:.2f}", t["weight"]] for t in d["tasks"]]
        return table(rows, ["#", "TASK", "MFLOP", "WEIGHT"]) + f"\n\n{len(rows)} tasks for {json.dumps(target)}"

    emit(data, as_json, render)


class _Display:
    """Live progress on a terminal (bar + per-task bests), or one JSON event per line with --json."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = sys.stderr.isatty()
        self.bests: dict[str, tuple[float | None, float | None]] = {}
        self.last_line = 0.0
        self.baseline_ms: float | None = None  # ONNX Runtime's p50 on the board, when measured

    def __call__(self, event: dict) -> None:
        if self.as_json:
            click.echo(json.dumps(to_jsonable(event)))
            return
        kind = event.get("event")
        if kind == "baseline":
            self.baseline_ms = event.get("onnxruntime_p50_ms")
        if kind == "start":
            verb = "resuming" if event["resumed"] else "tuning"
            click.echo(f"{verb} {event['model']} on key {event['key']!r} ({event['boards']} board(s)): "
                       f"{event['tasks']} tasks ({event.get('layout', 'NCHW')}"
                       + (f", {event['winograd_tasks']} Winograd 3x3" if event.get("winograd_tasks") else "")
                       + f"), budget {event['budget']} trials, "
                       f"{event['done']} done; log {event['log']}", err=True)
            from .timing import COLD_ABOVE_BYTES

            cache = f"{event['llc_kib']} KiB" if event.get("llc_kib") else "not known"
            how = (f"kernels over {COLD_ABOVE_BYTES // 1024} KiB timed cold" if event.get("cold_weights")
                   else "kernels timed hot")
            why = ("as the log was timed" if event["resumed"] else
                   f"weights {event.get('weight_mb')} MB, the board's last-level cache {cache}")
            click.echo(f"timing: {how} ({why})", err=True)
            if event.get("overlap"):
                click.echo("builds overlap measurements: the next batch is built while the boards time this one",
                           err=True)
        elif kind == "baseline":
            if event.get("onnxruntime_p50_ms") is not None:
                click.echo(f"ONNX Runtime on board {event['board']}: {event['onnxruntime_p50_ms']:.3f} ms (p50), "
                           "the latency to beat", err=True)
            else:
                click.echo(f"no ONNX Runtime baseline: {event['note']}", err=True)
        elif kind == "warming":
            click.echo(f"starting {event['what']}...", err=True)
        elif kind == "untuned":
            if event.get("estimated_ms") is not None:
                click.echo(f"untuned model on the board (each kernel without a schedule): {event['estimated_ms']:.3f} ms "
                           "estimated", err=True)
        elif kind == "seeded":
            click.echo(f"starting from {event['source']}: {event['records']} records "
                       f"({event['pretrained']} trained the cost model; the best schedules of {event['tasks_matched']} "
                       "of this model's tasks are measured first)", err=True)
        elif kind == "trials":
            self.bests[event["task"]] = (event["best_us"], event["gflops"])
            done, budget = event["done"], event["budget"]
            width = 24
            filled = int(width * min(done, budget) / max(budget, 1))
            bar = "#" * filled + "-" * (width - filled)
            est = event.get("estimated_ms")
            est_text = f"{est:.3f} ms" if est is not None else f"? ({event['tasks_tuned']}/{event['tasks']} tasks measured)"
            best = f"{event['best_us']:.1f} us" if event["best_us"] is not None else "failed"
            gflops = f"{event['gflops']:.2f} GFLOPS" if event["gflops"] else ""
            line = (f"[{bar}] {done}/{budget} trials  {event['task']}: best {best} {gflops}"
                    f"  est. model {est_text}  {event['elapsed_s']:.0f}s")
            if est is not None and self.baseline_ms:
                line += f"  ({est / self.baseline_ms:.2f}x ONNX Runtime)"
            if event.get("failed"):
                line += f"  ({event['failed']} failed)"
            if event.get("carried_from"):
                line += f"  (the schedule of {event['carried_from']})"
            if event.get("variant"):
                line += f"  ({VARIANT_TEXT.get(event['variant'], event['variant'])})"
            click.echo(line, err=True)
        elif kind == "finals":
            if event["tasks"]:
                click.echo(f"finals: the best {event['timed'] // max(1, event['tasks'])} candidates of {event['tasks']} "
                           f"large kernels timed again after a cache flush, as the model runs them; "
                           f"{event['changed']} kernels build with another than their best logged", err=True)
        elif kind == "finals-stopped":
            click.echo(f"finals stopped: {event['reason']} (the kernels left build with their best logged)", err=True)
        elif kind == "waiting":
            click.echo(f"waiting: {event['reason']}; giving up in {event['deadline_s']:g} s unless a board "
                       "comes back (Ctrl-C stops; the log is safe)", err=True)
        elif kind == "resumed":
            click.echo(f"board {event['board']} available again: continuing", err=True)


@click.command()
@click.argument("model")
@click.option("--device", "key", required=True, help="Device key of the boards to tune on.")
@click.option("--trials", type=int, required=True, help="Trial budget for the whole model (all runs together).")
@click.option("--log", "log_dir", required=True, type=click.Path(file_okay=False),
              help="Tuning log folder; running again on the same folder resumes.")
@click.option("--strategy", type=click.Choice(["xgb", "random"]), default="xgb", show_default=True,
              help="xgb: evolutionary search guided by the XGBoost cost model; random: uniform sampling.")
@click.option("--from-log", type=click.Path(file_okay=False, exists=True),
              help="Learn from the log of a similar board first (cost model and first candidates).")
@click.option("--early-stopping", type=int, default=None, help="Stop a task after N trials without improvement.")
@click.option("--deadline", "no_board_deadline", type=float, default=None,
              help="Seconds to wait for a board when none is free before stopping (default 120).")
@click.option("--seed", type=int, default=None, help="Random seed of the search.")
@click.option("--schedules", "schedules", default=None, metavar="PATH|URL",
              help="The schedule store to start from and add to: a SQLite file or a postgresql:// URL "
                   "(default: $EDGETUNE_SCHEDULES, else ~/.local/share/edgetune/schedules.sqlite).")
@click.option("--no-schedules", is_flag=True, help="Neither start from the schedule store nor add to it.")
@click.option("--overlap/--no-overlap", default=None,
              help="Build the next batch while the boards measure this one (default: when no board of the key "
                   "runs on this machine, where a build would skew the timings).")
@target_option
@input_shape_option
@tracker_option
@json_option
def tune(model: str, key: str, trials: int, log_dir: str, strategy: str, from_log: str | None,
         early_stopping: int | None, no_board_deadline: float | None, seed: int | None,
         schedules: str | None, no_schedules: bool, overlap: bool | None, target_json: str | None,
         input_shapes: tuple[str, ...], tracker: str | None, as_json: bool) -> None:
    """Tune a model on every free board of a key. Run it again on the same --log folder to resume.

    \b
    Example:
      edgetune tune model.onnx --device rpi4 --trials 256 --log runs/rpi4
      edgetune tune model.onnx --device rpi4b --trials 128 --log runs/rpi4b --from-log runs/rpi4
    """
    from ..logs.format import Status
    from ..logs.results import results_table
    from ..models.onnx_import import parse_input_shapes
    from ..toolchain import parse_target
    from ..tracker.client import resolve_tracker
    from .session import TuneOptions, run_session

    options = TuneOptions(
        model=model, key=key, trials=trials, log_dir=log_dir, tracker=resolve_tracker(tracker),
        target=parse_target(target_json) if target_json else None, strategy=strategy, from_log=from_log,
        early_stopping=early_stopping, input_shapes=parse_input_shapes(input_shapes),
        no_board_deadline_sec=no_board_deadline, seed=seed, schedules=schedules, use_schedules=not no_schedules,
        overlap=overlap,
    )
    display = _Display(as_json)
    started = time.monotonic()
    result = run_session(options, display)
    if as_json:
        click.echo(json.dumps({"event": "end", **to_jsonable(result.as_dict())}))
    else:
        click.echo(table(*results_table(result.tasks)))
        est = result.estimated_latency_ms
        rate = result.trials_this_run / max(time.monotonic() - started, 1e-6) * 60
        click.echo(f"\n{result.status}: {result.trials_done}/{result.budget} trials in {result.log_dir} "
                   f"({result.trials_this_run} this run, {rate:.1f} trials/min); estimated model latency "
                   + (f"{est:.3f} ms" if est is not None else "unknown (some tasks have no successful trial)"))
        if result.measured_by:
            click.echo("measured by: " + ", ".join(f"{b} ({n})" for b, n in sorted(result.measured_by.items())))
        carried = result.carried_to_siblings
        if carried.get("trials"):
            click.echo(f"sibling tasks (one kernel, another epilogue): {carried['trials']} trials replayed a "
                       f"sibling's best schedule, {carried['improved']} of them beat the task's best so far")
        small = result.small_kernels
        if small.get("trials"):
            click.echo(f"small kernels: {small['trials']} trials ran a best schedule on one thread or the kernel "
                       f"without a schedule, {small['improved']} of them beat the task's best so far")
    if result.message:
        click.echo(result.message, err=True)
    if result.status is Status.INTERRUPTED:
        sys.exit(130)
    if result.status is Status.STOPPED_NO_BOARD:
        sys.exit(3)
