"""``artifactscan.report``: a scan's output files and terminal rendering, re-exported from :mod:`artifactscan.render`.

Here "report" is a scan's result (``ScanReport``, its ``report.json``); the HTML page of a results folder is
:mod:`artifactscan.render.html_report`."""

from artifactscan.analysis.scan import headline, load_report, load_scan_report
from artifactscan.core.results import JsonResult, atomic_write_text, from_jsonable, to_jsonable
from artifactscan.render.outputs import write_outliers_csv, write_scan_outputs
from artifactscan.render.text import render_compare, render_emergence, render_scan

__all__ = ["JsonResult", "atomic_write_text", "from_jsonable", "headline", "load_report", "load_scan_report",
           "render_compare", "render_emergence", "render_scan", "to_jsonable", "write_outliers_csv",
           "write_scan_outputs"]
