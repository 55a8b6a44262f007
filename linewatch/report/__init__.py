"""Evaluation reports: ``results.json`` and a self-contained ``index.html``."""

from linewatch.report.html import ReportImage, ReportPaths, write_report

__all__ = ["ReportImage", "ReportPaths", "write_report"]
