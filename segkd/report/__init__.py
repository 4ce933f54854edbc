"""``segkd report``: one self-contained HTML page (and markdown) for one run or a comparison of runs."""

from segkd.report.build import Report, build_report
from segkd.report.render import render_html, render_markdown, write_report

__all__ = ["Report", "build_report", "render_html", "render_markdown", "write_report"]
