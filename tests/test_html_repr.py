"""Results render in Jupyter: `_repr_html_` gives the headline and an HTML table, values escaped."""

from __future__ import annotations

import html

import torch

from artifactscan.analysis.probes import probe
from artifactscan.analysis.scan import scan
from artifactscan.models.loading import wrap_module

from .test_probes import planted_vit


def test_scan_report_html_has_headline_model_and_layers():
    model = planted_vit("artifact", depth=2, onset=1)
    report = scan(wrap_module(model, name="<my vit>"), torch.rand(6, 3, 32, 32), batch_size=6)
    page = report._repr_html_()
    assert page.index(html.escape(report.headline)) < page.index("<table>")  # the headline comes first
    assert "&lt;my vit&gt;" in page and "<my vit>" not in page  # escaped
    assert "<th style='text-align:left'>model.num_blocks</th><td style='text-align:left'>2</td>" in page
    assert f"<b>layers</b> ({len(report.layers)})" in page and page.count("<tr><td>") == len(report.layers)


def test_probe_report_html_has_verdict():
    report = probe(planted_vit("artifact", depth=2, onset=1), "synthetic:40", blocks=-1, device="cpu", draws=1,
                   min_images=10)
    page = report._repr_html_()
    assert html.escape(report.verdict.summary) in page
    assert "<b>rows</b>" in page and "layer" in page
    # probe/2 added model.weights / layout / inferred; a /1 report without them still reads
    old = report.to_dict()
    old["schema"] = "artifactscan.probe/1"
    old["model"] = {k: v for k, v in old["model"].items() if k not in ("weights", "layout", "inferred")}
    assert type(report).from_dict(old).model.weights is None
