"""``edgetune bench``."""

from __future__ import annotations

import click

from ..cliutil import emit, json_option, table, tracker_option


@click.command()
@click.argument("model_or_package")
@click.option("--device", "key", required=True, help="Device key of the board to measure on.")
@click.option("--log", "log_dir", type=click.Path(file_okay=False, exists=True),
              help="Tuning log: the tuned build is made from it (for a MODEL argument).")
@click.option("--model", "model", help="The ONNX model of a PACKAGE argument, for the untuned comparison.")
@click.option("--target", "target_json", metavar="JSON", help="TVM target (default: the log's).")
@click.option("--runs", type=int, default=50, show_default=True, help="Timed runs of each build.")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Rounds the runs are split into, alternating the builds; the ratios are the rounds' median.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxDxD",
              help="Static shape of an input the model leaves symbolic (repeatable).")
@tracker_option
@json_option
def bench(model_or_package: str, key: str, log_dir: str | None, model: str | None, target_json: str | None,
          runs: int, rounds: int, input_shapes: tuple[str, ...], tracker: str | None, as_json: bool) -> None:
    """On-board latency (p50/p90/p99, mean, first load), tuned against untuned, and the speedup.

    \b
    Example:
      edgetune bench model.onnx --device rpi4 --log runs/rpi4
      edgetune bench model.etpkg --device rpi4 --model model.onnx --json
    """
    from ..models.onnx_import import parse_input_shapes
    from ..toolchain import parse_target
    from ..tracker.client import resolve_tracker
    from .bench import bench as run_bench
    from .bench import vs_onnxruntime

    result = run_bench(model_or_package, key, resolve_tracker(tracker), log_dir, model,
                       parse_target(target_json) if target_json else None, runs, parse_input_shapes(input_shapes),
                       on_progress=None if as_json else (lambda m: click.echo(m, err=True)), rounds=rounds)

    def render(r) -> str:
        rows = []
        for t in (r.tuned, r.onnxruntime, r.untuned):
            if t is not None:
                rows.append([t.label, f"{t.p50_ms:.3f}", f"{t.p90_ms:.3f}", f"{t.p99_ms:.3f}", f"{t.mean_ms:.3f}",
                             f"{t.first_load_ms:.1f}", f"{t.max_abs_err:.1e}" if t.max_abs_err is not None else "-",
                             t.runs, t.board])
        text = table(rows, ["BUILD", "P50 ms", "P90 ms", "P99 ms", "MEAN ms", "FIRST LOAD ms", "MAX ERR", "RUNS", "BOARD"])
        text += "\n"
        if r.onnxruntime_ratio:
            text += f"\n{vs_onnxruntime(r.onnxruntime_ratio)} (p50) on {r.model} for key {r.key!r}"
            if len(r.rounds) > 1:
                text += f" (median of {len(r.rounds)} rounds)"
        if r.speedup:
            text += f"\ntuned is {r.speedup:.2f}x faster than TVM's untuned build (p50)"
        for note in r.notes:
            text += f"\nnote: {note}"
        return text

    emit(result, as_json, render)
