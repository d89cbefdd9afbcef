"""``edgetune build``."""

from __future__ import annotations

import click

from ..cliutil import emit, json_option, table


@click.command()
@click.argument("model")
@click.option("--device", "key", required=True, help="Device key of the board the build is for.")
@click.option("--log", "log_dir", type=click.Path(file_okay=False, exists=True),
              help="Tuning log to apply (without it every kernel gets its default schedule).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--target", "target_json", metavar="JSON", help="TVM target (default: the log's, else the board's agent).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxDxD",
              help="Static shape of an input the model leaves symbolic (repeatable).")
@click.option("--no-compare", is_flag=True,
              help="Skip timing the build against ONNX Runtime and TVM's untuned build on this workstation.")
@click.option("--schedules", "schedules", default=None, metavar="PATH|URL",
              help="The schedule store that fills tasks the log lacks (default: $EDGETUNE_SCHEDULES, else "
                   "~/.local/share/edgetune/schedules.sqlite).")
@click.option("--no-schedules", is_flag=True, help="Tasks the log lacks get default schedules, not the store's.")
@json_option
def build(model: str, key: str, log_dir: str | None, out_dir: str, target_json: str | None,
          input_shapes: tuple[str, ...], no_compare: bool, schedules: str | None, no_schedules: bool,
          as_json: bool) -> None:
    """Compile a model for a board with its tuning log applied; report what was tuned.

    \b
    Example:
      edgetune build model.onnx --device rpi4 --log runs/rpi4 -o out/rpi4
    """
    from ..models.onnx_import import parse_input_shapes
    from ..toolchain import parse_target
    from ..bench.bench import vs_onnxruntime
    from ..logs.results import results_table
    from .build import build as run_build

    target, board = None, None
    if target_json:
        target = parse_target(target_json)
    elif not log_dir:
        from ..tuning.session import resolve_board_target

        found = resolve_board_target(key)
        if found is None:
            from ..errors import EdgetuneError

            raise EdgetuneError(f"no target for key {key!r}: pass --log DIR or --target JSON, or start its agent")
        target, board = found
    result = run_build(model, key, out_dir, log_dir, target, board, parse_input_shapes(input_shapes),
                       on_progress=None if as_json else (lambda m: click.echo(m, err=True)), compare=not no_compare,
                       schedules=schedules, use_schedules=not no_schedules)

    def render(r) -> str:
        text = table(*results_table(r.coverage, r.flops_shares))
        tuned = sum(1 for c in r.coverage if c.tuned)
        text += (f"\n\n{tuned}/{len(r.coverage)} tasks tuned, covering {100 * r.tuned_share:.1f}% of the model's FLOPs; "
                 + (f"{len(r.from_store)} more from the schedule store ({', '.join(r.from_store)}); "
                    if r.from_store else "")
                 + "the rest use MetaSchedule's default schedule for the target.")
        if r.estimated_latency_ms is not None:
            text += f"\nestimated latency from the log: {r.estimated_latency_ms:.3f} ms"
        check = r.host_check
        if check:
            text += f"\nran here, max abs error against ONNX Runtime: {check['max_abs_err']:.2e}"
            if "onnxruntime_p50_ms" in check:
                text += (f"\non this workstation: {check['tuned_p50_ms']:.3f} ms tuned vs {check['onnxruntime_p50_ms']:.3f} ms "
                         f"ONNX Runtime: {vs_onnxruntime(check['tuned_p50_ms'] / check['onnxruntime_p50_ms'], 'here')}")
            if "untuned_p50_ms" in check:
                text += (f"; {check['untuned_p50_ms'] / check['tuned_p50_ms']:.2f}x faster than TVM's untuned build "
                         f"({check['untuned_p50_ms']:.3f} ms)")
        elif r.host_check is None:
            text += "\n(this machine cannot run the target: `edgetune bench` times it against ONNX Runtime on the board)"
        return text + f"\nwrote {r.out_dir}/model.so, build.json, reference/"

    emit(result, as_json, render)
