"""Reports of tuning logs: convergence plots (PNG) and a self-contained HTML page."""

from .load import ReportError
from .report import ReportResult, make_report

__all__ = ["ReportError", "ReportResult", "make_report"]
