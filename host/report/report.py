"""The report of a tuning log: convergence plots (PNG) and one self-contained HTML page.

Reading the log is :mod:`host.report.load`'s (through :mod:`host.logs`), drawing :mod:`host.report.plots`',
the page :mod:`host.report.page`'s; this module puts them together.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from host.logs.results import TaskResult

from .page import write_html
from .load import ReportError, estimate_curve, load
from .plots import plot_overall, plot_tasks

REPORT_DIR = "report"
OVERALL_PNG = "convergence_overall.png"
TASKS_PNG = "convergence_tasks.png"
HTML_FILE = "report.html"


@dataclasses.dataclass
class ReportResult:
    """What ``make_report`` wrote and the figures it found.

    ``estimated_latency_ms`` is the weighted sum of the tasks' best latencies (``None`` while a task has no
    successful trial; ``fallback_tasks`` names those). ``source`` is ``history`` or ``database``.
    """

    out_dir: Path
    html: Path
    pngs: list[Path]
    source: str
    trials: int
    failed: int
    tasks: list[TaskResult]
    estimated_latency_ms: float | None
    first_estimated_latency_ms: float | None
    fallback_tasks: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "html": str(self.html),
            "pngs": [str(p) for p in self.pngs],
            "out_dir": str(self.out_dir),
            "source": self.source,
            "trials": self.trials,
            "failed": self.failed,
            "estimated_latency_ms": self.estimated_latency_ms,
            "first_estimated_latency_ms": self.first_estimated_latency_ms,
            "fallback_tasks": self.fallback_tasks,
            "tasks": [t.as_dict() for t in self.tasks],
        }


def make_report(
    log_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> ReportResult:
    """Write the convergence plots (PNG) and an HTML report of the tuning log in ``log_dir``.

    ``out_dir`` defaults to ``log_dir/report``. Writes ``convergence_overall.png`` (estimated model latency in
    ms, best so far, against the trial number; failed trials as red crosses), ``convergence_tasks.png``
    (one panel per task: GFLOPS of each trial and the best so far) and ``report.html`` (self-contained: the
    PNGs are embedded). ``progress`` receives short messages. Nothing in ``log_dir`` but ``out_dir`` is written.

    Raises ``ReportError`` when the directory has no measured trial (run ``edgetune tune`` first), and
    ``TuningLogError`` when its files are damaged.
    """
    say = progress or (lambda _msg: None)
    log_dir = Path(log_dir)
    data = load(log_dir)
    out = Path(out_dir) if out_dir is not None else log_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    say(f"read {len(data.trials)} trials of {len(data.tasks)} tasks from the {data.source}")

    _, ys, complete = estimate_curve(data)
    full = [y for y, c in zip(ys, complete) if c]
    est = full[-1] if full else None
    first_est = full[0] if full else None

    overall, per_task = out / OVERALL_PNG, out / TASKS_PNG
    say(f"drawing {overall.name}")
    plot_overall(data, overall)
    say(f"drawing {per_task.name}")
    plot_tasks(data, per_task)
    page = out / HTML_FILE
    write_html(page, data, [(overall, "estimated model latency against trials"),
                            (per_task, "GFLOPS of each trial per task")], est, first_est)
    say(f"wrote {page}")
    return ReportResult(
        out_dir=out,
        html=page,
        pngs=[overall, per_task],
        source=data.source,
        trials=len(data.trials),
        failed=data.failed,
        tasks=data.tasks,
        estimated_latency_ms=est,
        first_estimated_latency_ms=first_est,
        fallback_tasks=[t.name for t in data.tasks if not t.tuned],
    )


__all__ = ["ReportError", "ReportResult", "make_report"]
