"""``edgetune report``."""

from __future__ import annotations

import click

from ..cliutil import emit, json_option


def _render(result) -> str:
    lines = [f"html: {result.html}"] + [f"png:  {p}" for p in result.pngs]
    summary = f"{result.trials} trials ({result.failed} failed), {len(result.tasks)} tasks"
    if result.estimated_latency_ms is not None:
        summary += f", estimated model latency {result.estimated_latency_ms:.4g} ms"
    if result.fallback_tasks:
        summary += f"; no successful trial yet (fallback): {', '.join(result.fallback_tasks)}"
    return "\n".join([*lines, summary])


@click.command()
@click.argument("log_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "-o",
    "--out",
    "out_dir",
    metavar="OUTDIR",
    type=click.Path(file_okay=False, path_type=str),
    help="Where to write the report (default: DIR/report).",
)
@json_option
def report(log_dir: str, out_dir: str | None, as_json: bool) -> None:
    """Convergence plots (PNG) and an HTML report of the tuning log in DIR.

    DIR is the --log DIR of `edgetune tune`, or a stock MetaSchedule work dir
    (database_workload.json + database_tuning_record.json). The HTML page is
    self-contained: open it in a browser or mail it.

    \b
    Example:
      edgetune report runs/rpi4                 # writes runs/rpi4/report/report.html and PNGs
      edgetune report runs/rpi4 -o /tmp/rpi4 --json
    """
    from .report import make_report

    result = make_report(log_dir, out_dir)
    emit(result, as_json, _render)
