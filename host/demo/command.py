"""``edgetune demo``."""

from __future__ import annotations

import signal

import click

from ..cliutil import emit, json_option


@click.command()
@click.option("--trials", type=int, default=64, show_default=True, help="Tuning budget (64 takes a few minutes).")
@click.option("--workdir", type=click.Path(file_okay=False), default="edgetune-demo", show_default=True,
              help="Where the log, build, package and report go.")
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs of each build in the bench.")
@json_option
def demo(trials: int, workdir: str, runs: int, as_json: bool) -> None:
    """The whole loop on this machine: tracker, agent, discovery, tune, build, package, flash, bench.

    \b
    Example:
      edgetune demo                 # about 5 minutes on 2 cores
      edgetune demo --trials 16     # quicker, less tuned
    """
    from ..bench.bench import vs_onnxruntime
    from ..tuning.command import _Display
    from .demo import run_demo

    # SIGTERM stops the demo like Ctrl-C: everything it started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    def say(message: str) -> None:
        if not as_json:
            click.echo(message)

    display = _Display(as_json=False)
    result = run_demo(workdir, trials, say, None if as_json else display, runs=runs)
    if as_json:
        emit(result, True)
        return
    click.echo("\n" + "=" * 72)
    click.echo("edgetune demo: summary")
    if result.tuned_over_onnxruntime:
        click.echo(f"  tiny_cnn on this machine: {result.tuned_p50_ms:.3f} ms tuned vs {result.onnxruntime_p50_ms:.3f} ms "
                   f"with ONNX Runtime on the board: {vs_onnxruntime(result.tuned_over_onnxruntime)} "
                   + (f" (the median of {result.rounds} rounds' ratios)" if result.rounds > 1 else "")
                   + f" after {result.trials} trials")
    else:
        click.echo("  ONNX Runtime was not measured on the board: " + "; ".join(result.notes))
    if result.speedup:
        click.echo(f"  tiny_cnn on this machine: {result.tuned_p50_ms:.3f} ms tuned vs {result.untuned_p50_ms:.3f} ms "
                   f"with TVM's default build: {result.speedup:.2f}x faster after {result.trials} trials")
    click.echo(f"  package:  {result.package}  (installed: slot {result.installed.get('slot')}, "
               f"current = {result.installed.get('current')}, via {result.flashed_via.split(' (')[0]})")
    click.echo(f"  report:   {result.report}")
    click.echo(f"  timings:  {result.bench}")
    click.echo("\nWith a real board (a Raspberry Pi running `edgetune-agent serve --key rpi4`, see README):")
    click.echo("  edgetune tracker &")
    click.echo("  edgetune tune model.onnx --device rpi4 --trials 256 --log runs/rpi4")
    click.echo("  edgetune build model.onnx --device rpi4 --log runs/rpi4 -o out/ && "
               "edgetune package out/ --log runs/rpi4 -o model.etpkg && edgetune flash model.etpkg --key rpi4 --all")
