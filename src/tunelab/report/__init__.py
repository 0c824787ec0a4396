"""Run report: a self-contained `report.html` (inline CSS, PNG data-URI plots, no JS) in a run directory."""

from tunelab.report.html import write_report

__all__ = ["write_report"]
