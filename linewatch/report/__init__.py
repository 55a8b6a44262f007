"""Evaluation reports: ``results.json`` and a self-contained ``index.html``."""

from linewatch.report.html import ReportImage, ReportPaths, write_report, write_text_atomic

__all__ = ["ReportImage", "ReportPaths", "write_report", "write_text_atomic"]
