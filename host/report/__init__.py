"""Reports of tuning logs: convergence plots (PNG) and a self-contained HTML page."""

from .report import ReportError, ReportResult, TaskSummary, make_report

__all__ = ["ReportError", "ReportResult", "TaskSummary", "make_report"]
