"""``edgetune log show|merge|export``."""

from __future__ import annotations

import click

from ..cliutil import emit, json_option, table


@click.group()
def log() -> None:
    """Inspect and combine tuning logs.

    \b
    Example:
      edgetune log show runs/rpi4
      edgetune log merge runs/rpi4-a runs/rpi4-b -o runs/rpi4
      edgetune log export runs/rpi4 -o best/rpi4
    """


@log.command()
@click.argument("log_dir", type=click.Path(file_okay=False, exists=True))
@json_option
def show(log_dir: str, as_json: bool) -> None:
    """The best record of every task: latency, GFLOPS and its decisions (tiles, vectorize, unroll...).

    \b
    Example:
      edgetune log show runs/rpi4 --json
    """
    from .ops import summarize
    from .results import results_table

    def render(d) -> str:
        text = (f"{d.log}: {d.trials_done} trials (budget {d.budget}), key {d.key!r}, "
                f"status {d.status or '-'}\n\n")
        text += table(*results_table(d.tasks))
        for t in d.tasks:
            if t.decisions:
                text += f"\n\n{t.name}:\n" + "\n".join("  " + line for line in t.decisions)
        return text

    emit(summarize(log_dir), as_json, render)


@log.command()
@click.argument("log_a", type=click.Path(file_okay=False, exists=True))
@click.argument("log_b", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="New folder for the merged log.")
@json_option
def merge(log_a: str, log_b: str, out: str, as_json: bool) -> None:
    """Combine two tuning logs of the same target (e.g. two boards of one key tuned apart).

    \b
    Example:
      edgetune log merge runs/a runs/b -o runs/ab
    """
    from .ops import merge as run_merge

    emit(run_merge(log_a, log_b, out), as_json,
         lambda d: f"merged {d['records']} records into {d['out']} ({d['duplicates_dropped']} duplicates dropped)")


@log.command()
@click.argument("log_dir", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="New folder for the export.")
@json_option
def export(log_dir: str, out: str, as_json: bool) -> None:
    """Write the best record of each task as a stock MetaSchedule database (small, for builds).

    \b
    Example:
      edgetune log export runs/rpi4 -o best/rpi4
    """
    from .ops import export as run_export

    emit(run_export(log_dir, out), as_json, lambda d: f"exported {d['records']} best records to {d['out']}")
