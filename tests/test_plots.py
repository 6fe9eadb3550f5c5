"""Tests for artifactscan.plots: every figure renders, reads right (scales, lines, labels) and saves cleanly."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from artifactscan import plots  # noqa: E402
from artifactscan.render import plots as scan_plots, style  # noqa: E402
from artifactscan.inputs.images import SkippedImage  # noqa: E402
from artifactscan.analysis.scan import (  # noqa: E402
    Histogram,
    ImageSummary,
    LayerReport,
    ModelSummary,
    NormMap,
    ScanReport,
)
from artifactscan.core.stats import NUM_BINS, bin_index  # noqa: E402

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_images"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- fixtures
def _layer(index: int, name: str, norms: np.ndarray, threshold: float | None, reason: str,
           is_final: bool = False, n_images: int = 4, per_image: int = 196) -> LayerReport:
    t = torch.from_numpy(norms)
    counts = torch.bincount(bin_index(t), minlength=NUM_BINS)
    median = float(np.median(norms))
    if threshold is None:
        n_out, img_out = 0, 0
    else:
        hit = norms.reshape(n_images, per_image) > threshold
        n_out, img_out = int(hit.sum()), int(hit.any(1).sum())
    return LayerReport(
        index=index, name=name, is_final_norm=is_final, median=median, p99=float(np.quantile(norms, 0.99)),
        max=float(norms.max()), max_over_median=float(norms.max()) / median, threshold=threshold,
        threshold_reason=reason, num_outliers=n_out, outlier_fraction=n_out / norms.size,
        images_with_outliers=img_out, image_fraction_with_outliers=img_out / n_images,
        fraction_above_150=float((norms > 150).mean()), prefix=[], histogram=Histogram.from_counts(counts))


def make_report(num_blocks: int = 12, artifacts_from: int | None = 6, artifact_fraction: float = 0.02,
                kind: str = "model", threshold_mode: str = "auto", image_names: list[str] | None = None,
                name: str = "vit_test", grid: int = 14, seed: int = 0) -> ScanReport:
    """A hand-built report: lognormal bulk norms growing with depth; from ``artifacts_from`` a minority of tokens
    ~10x the bulk (the paper's artifacts). Norm maps for ``image_names`` at the last block."""
    rng = np.random.default_rng(seed)
    names = image_names if image_names is not None else [str(SAMPLE_DIR / "astronaut.jpg"), "tensor[1]",
                                                          "synthetic[2]", "photos/cat 1.jpg"]
    n_images, per_image = len(names), grid * grid
    layers, last_norms = [], None
    for b in range(num_blocks + 1):
        final = b == num_blocks
        med = 30.0 if final else 15.0 + 40.0 * b / max(num_blocks - 1, 1)
        norms = med * np.exp(rng.normal(0, 0.25, (n_images, per_image)))
        has_art = not final and artifacts_from is not None and b >= artifacts_from
        if has_art:
            # the same few positions per image, like the paper's redundant background patches
            k = max(1, round(artifact_fraction * per_image))
            for i in range(n_images):
                idx = rng.choice(per_image, k, replace=False)
                norms[i, idx] = 10 * med * np.exp(rng.normal(0, 0.1, k))
        norms = norms.reshape(-1)
        if threshold_mode == "fixed":
            thr, reason = 150.0, "fixed threshold: norm > 150"
        elif has_art:
            thr, reason = 3.5 * med, "bimodal: ... (test)"
        else:
            thr, reason = None, "unimodal: no separate high-norm group (test)"
        layers.append(_layer(b, "final norm" if final else f"block {b}", norms, thr, reason, final,
                             n_images, per_image))
        if b == num_blocks - 1:
            last_norms = (norms.reshape(n_images, grid, grid), thr)
    assert last_norms is not None
    grids, thr = last_norms
    maps = [NormMap(n, i, num_blocks - 1, grids[i].tolist(),
                    (grids[i] > thr).tolist() if thr is not None else np.zeros((grid, grid), bool).tolist())
            for i, n in enumerate(names)]
    onset = next((lay.index for lay in layers if not lay.is_final_norm and lay.num_outliers), None)
    model = ModelSummary(name=name, source="test", arch=None, kind=kind, num_blocks=num_blocks, num_prefix_tokens=1,
                         num_cls_tokens=1, num_register_tokens=0, patch_size=[16, 16], grid_size=[grid, grid],
                         input_size=[16 * grid, 16 * grid],
                         calibration_note="CALIBRATION PHANTOM" if kind == "phantom" else None)
    return ScanReport(model=model, images=ImageSummary("test", n_images, n_images, [SkippedImage("x", "y")][:0]),
                      threshold_mode=threshold_mode, threshold_rule="test", layers=layers, onset_layer=onset,
                      headline="test", outliers=[], outlier_records_complete=True, maps=maps, notes=[])


def _all_titles(fig: Figure) -> str:
    parts = [ax.get_title() for ax in fig.axes]
    if fig._suptitle is not None:
        parts.append(fig._suptitle.get_text())
    return "\n".join(parts)


def _vlines(ax) -> dict[str, float]:
    """Label -> x of the vertical lines (axvline) in ``ax``."""
    out = {}
    for line in ax.get_lines():
        x = np.asarray(line.get_xdata(), dtype=float)
        if x.size == 2 and x[0] == x[1] and not line.get_label().startswith("_"):
            out[line.get_label()] = float(x[0])
    return out


def _check_png(path: Path, min_px: int = 200, max_px: int = 3000) -> tuple[int, int]:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert min_px <= w <= max_px and 100 <= h <= max_px, (path, w, h)
    return w, h


# ----------------------------------------------------------------------------------------------- histogram
def test_norm_histogram_threshold_paper_line_and_log_axes():
    rep = make_report()
    last = rep.last_block
    fig, ax = plots.plot_norm_histogram(last)
    assert isinstance(fig, Figure)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    lines = _vlines(ax)
    thr_labels = [k for k in lines if k.startswith("threshold (auto) = ")]
    assert len(thr_labels) == 1
    assert lines[thr_labels[0]] == pytest.approx(last.threshold)
    assert thr_labels[0].endswith(f"= {style.format_number(last.threshold)}")
    assert style.format_number(1000.0) == "1000" and style.format_number(192.34) == "192" and style.format_number(0.01234) == "0.0123"
    lo, hi = ax.get_xlim()
    if lo <= 150 <= hi:
        assert lines["paper's 150"] == 150
    legend_texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("outliers: ") and "%" in t for t in legend_texts)
    assert ax.get_xlabel() and ax.get_ylabel()
    # ~80-120 coarse bars, and the bulk and the artifacts are both drawn
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert 40 <= len(bars) <= 125
    edges, counts = scan_plots._rebin(last.histogram, 100)
    assert 80 <= len(counts) <= 120
    assert counts.sum() == sum(last.histogram.counts)
    fig.savefig(Path("/dev/null"), format="png")  # renders


def test_norm_histogram_fixed_threshold_and_none():
    rep = make_report(threshold_mode="fixed")
    fig, ax = plots.plot_norm_histogram(rep.last_block)
    lines = _vlines(ax)
    assert "threshold (fixed) = 150" in lines
    assert "paper's 150" not in lines  # the same line; drawn once

    unimodal = make_report(artifacts_from=None).last_block
    fig, ax = plots.plot_norm_histogram(unimodal, title="custom")
    assert not any(k.startswith("threshold") for k in _vlines(ax))
    assert ax.get_title() == "custom"
    assert any("no outliers" in t.get_text() for t in ax.get_legend().get_texts())


def test_norm_histogram_into_given_axes_and_empty():
    fig = Figure()
    ax = fig.add_subplot()
    layer = make_report().last_block
    layer.histogram = Histogram(layer.histogram.log10_min, layer.histogram.bin_width, [], [])
    f2, a2 = plots.plot_norm_histogram(layer, ax=ax)
    assert f2 is fig and a2 is ax
    fig.savefig(Path("/dev/null"), format="png")


def test_histogram_quantiles_match_numpy():
    norms = np.exp(np.random.default_rng(1).normal(3, 0.5, 20000))
    hist = Histogram.from_counts(torch.bincount(bin_index(torch.from_numpy(norms)), minlength=NUM_BINS))
    got = plots.histogram_quantiles(hist, (0.01, 0.5, 0.99))
    want = np.quantile(norms, (0.01, 0.5, 0.99))
    np.testing.assert_allclose(got, want, rtol=0.01)


# ----------------------------------------------------------------------------------------------- per layer
def test_layer_distributions():
    rep = make_report()
    fig, ax = plots.plot_layer_distributions(rep)
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[-1] == "norm" and "0" in labels
    by_label = {line.get_label(): line for line in ax.get_lines()}
    assert "median" in by_label and "max" in by_label
    thr = by_label["threshold (auto)"]
    assert len(thr.get_xdata()) == sum(lay.threshold is not None for lay in rep.layers)
    np.testing.assert_allclose(thr.get_ydata(), [lay.threshold for lay in rep.layers if lay.threshold])
    np.testing.assert_allclose(by_label["max"].get_ydata(), [lay.max for lay in rep.layers])
    # median line from the histograms, close to the stored medians
    blocks = [lay for lay in rep.layers if not lay.is_final_norm]
    np.testing.assert_allclose(by_label["median"].get_ydata(), [lay.median for lay in blocks], rtol=0.02)
    assert "vit_test" in ax.get_title() and plots.PHANTOM_TAG not in ax.get_title()
    fig.savefig(Path("/dev/null"), format="png")


def test_layer_distributions_phantom_tag_and_json_nans():
    rep = make_report(kind="phantom")
    rep.layers[0].max_over_median = None  # type: ignore[assignment]  # how JSON stores NaN
    rep.layers[0].median = None  # type: ignore[assignment]
    fig, ax = plots.plot_layer_distributions(rep)
    assert plots.PHANTOM_TAG in ax.get_title()
    fig.savefig(Path("/dev/null"), format="png")


# ----------------------------------------------------------------------------------------------- image maps
def test_image_map_with_image():
    rep = make_report()
    m = rep.maps[0]
    assert Path(m.image).is_file()
    n_flag = int(np.sum(m.flagged))
    assert n_flag > 0
    fig, axes = plots.plot_image_map(m, m.image, (224, 224), threshold=rep.last_block.threshold)
    assert len(axes) == 2
    img_ax, heat_ax = axes
    assert len(img_ax.images) == 1 and len(heat_ax.images) == 1
    for ax in axes:
        assert sum(isinstance(p, Rectangle) for p in ax.patches) == n_flag
    cbar_labels = [a.get_ylabel() for a in fig.axes]
    assert any(lab.startswith("token norm") for lab in cbar_labels)
    assert heat_ax.get_xlabel() == "patch column" and heat_ax.get_ylabel() == "patch row"
    fig.savefig(Path("/dev/null"), format="png")


@pytest.mark.parametrize("path", [None, "tensor[1]", "/nonexistent/photo.jpg"])
def test_image_map_without_image_shows_heatmap_only(path):
    m = make_report().maps[1]
    fig, axes = plots.plot_image_map(m, path)
    assert len(axes) == 1 and len(axes[0].images) == 1


def test_image_map_unreadable_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    fig, axes = plots.plot_image_map(make_report().maps[0], str(bad))
    assert len(axes) == 1


def test_image_map_given_two_axes_without_image():
    fig = Figure()
    a, b = fig.subplots(1, 2)
    f2, used = plots.plot_image_map(make_report().maps[1], None, axes=[a, b])
    assert f2 is fig and used == [b] and not a.axison


def test_image_map_non_square_input(tmp_path):
    m = NormMap("wide.png", 0, 1, np.arange(24.0).reshape(4, 6).tolist(), np.eye(4, 6, dtype=bool).tolist())
    src = tmp_path / "wide.png"
    Image.new("RGB", (300, 300), (200, 50, 50)).save(src)
    fig, axes = plots.plot_image_map(m, str(src), (64, 96))
    assert axes[0].images[0].get_array().shape[1] > axes[0].images[0].get_array().shape[0]  # cropped to 3:2
    assert sum(isinstance(p, Rectangle) for p in axes[1].patches) == 4


# ----------------------------------------------------------------------------------------------- compare / ablation
def test_compare():
    reports = {"baseline": make_report(), "+4 registers": make_report(artifacts_from=None, seed=1),
               "phantom": make_report(kind="phantom", num_blocks=8, seed=2)}
    fig, axes = plots.plot_compare(reports)
    assert len(axes) == 2
    ax_f, ax_r = axes
    assert ax_r.get_yscale() == "log"
    labels = [line.get_label() for line in ax_f.get_lines()]
    assert labels[:2] == ["baseline", "+4 registers"] and labels[2].startswith("phantom (calibration phantom")
    base = ax_f.get_lines()[0]
    np.testing.assert_allclose(base.get_xdata(), range(12))
    want = [100 * lay.outlier_fraction for lay in reports["baseline"].layers[:12]]
    np.testing.assert_allclose(base.get_ydata(), want)
    assert "%" in ax_f.get_ylabel() and ax_r.get_ylabel()
    assert plots.PHANTOM_TAG in _all_titles(fig)
    assert len({line.get_color() for line in ax_f.get_lines()}) == 3
    fig.savefig(Path("/dev/null"), format="png")


def test_compare_rejects_wrong_axes():
    fig = Figure()
    with pytest.raises(ValueError, match="two Axes"):
        plots.plot_compare({"a": make_report()}, axes=[fig.add_subplot()])


def test_register_ablation():
    reports = {4: make_report(artifacts_from=None, seed=3), 0: make_report(), 16: make_report(artifacts_from=None)}
    fig, (ax_f, ax_r) = plots.plot_register_ablation(reports)
    assert [t.get_text() for t in ax_f.get_xticklabels()] == ["0", "4", "16"]
    frac = ax_f.get_lines()[0].get_ydata()
    assert frac[0] == pytest.approx(100 * reports[0].last_block.outlier_fraction) and frac[1] == 0
    assert ax_r.get_yscale() == "log"
    assert "register" in ax_f.get_xlabel()
    fig.savefig(Path("/dev/null"), format="png")


# ----------------------------------------------------------------------------------------------- files
def test_stems():
    assert style.file_stem("photos/cat 1.jpg", 0) == "cat_1"
    assert style.file_stem("tensor[3]", 3) == "tensor_3"
    assert style.file_stem("C:\\data\\x.png", 0) == "x"
    assert style.file_stem("???", 7) == "image_7"
    maps = [NormMap(n, i, 0, [[1.0]], [[False]]) for i, n in enumerate(["a/cat.jpg", "b/cat.png", "B/CAT.jpg"])]
    stems = style.unique_stems(maps)
    assert len({s.lower() for s in stems}) == 3 and stems[0] == "cat"


def test_save_scan_figures(tmp_path):
    import matplotlib.pyplot as plt

    plt.close("all")
    names = [str(SAMPLE_DIR / "astronaut.jpg"), "tensor[1]", "a/cat.jpg", "b/cat.jpg"]
    rep = make_report(image_names=names)
    paths = plots.save_scan_figures(rep, tmp_path / "figs", dpi=100)
    assert plt.get_fignums() == []
    names_written = sorted(p.relative_to(tmp_path / "figs").as_posix() for p in paths)
    assert names_written == sorted(["norm_histogram.png", "layer_norms.png", "maps/astronaut.png",
                                    "maps/tensor_1.png", "maps/cat.png", "maps/cat_3.png"])
    for p in paths:
        _check_png(p)
    # the photo map is two panels wide, the tensor map one
    w_photo, _ = _check_png(tmp_path / "figs/maps/astronaut.png")
    w_tensor, _ = _check_png(tmp_path / "figs/maps/tensor_1.png")
    assert w_photo > w_tensor


def test_save_scan_figures_phantom_tags_every_figure(tmp_path, monkeypatch):
    titles = []

    def spy(fig, path, dpi):  # record the titles; rendering is tested elsewhere (and slow)
        titles.append(_all_titles(fig))
        return path

    monkeypatch.setattr(scan_plots, "save_figure", spy)
    phantom = make_report(kind="phantom", image_names=[str(SAMPLE_DIR / "coffee.jpg"), "tensor[1]"])
    paths = plots.save_scan_figures(phantom, tmp_path, dpi=60)
    assert len(titles) == len(paths) == 2 + 2
    assert all(plots.PHANTOM_TAG in t for t in titles)

    titles.clear()
    plots.save_scan_figures(make_report(image_names=["tensor[0]"]), tmp_path / "real", dpi=60)
    assert titles and not any(plots.PHANTOM_TAG in t for t in titles)


def test_save_scan_figures_closes_pyplot_figures(tmp_path, monkeypatch):
    """Even if the figures were made through pyplot, none is left open."""
    import matplotlib.pyplot as plt

    plt.close("all")
    made = []

    def via_pyplot(width, height, ncols=1, **kw):
        fig, axes = plt.subplots(1, ncols, figsize=(width, height), layout="constrained", squeeze=False, **kw)
        made.append(fig)
        return fig, list(axes[0])

    monkeypatch.setattr(scan_plots, "new_figure", via_pyplot)
    monkeypatch.setattr(style, "new_figure", via_pyplot)  # one_ax (style) makes the single-axes figures
    monkeypatch.setattr(scan_plots, "save_figure", lambda fig, path, dpi: path)
    plots.save_scan_figures(make_report(image_names=["tensor[0]"]), tmp_path, dpi=60)
    assert len(made) == 3 and plt.get_fignums() == []


def test_save_scan_figures_svg(tmp_path):
    rep = make_report(image_names=["tensor[0]"])
    rep.maps = []
    paths = plots.save_scan_figures(rep, tmp_path, fmt="svg")
    assert [p.suffix for p in paths] == [".svg"] * 2
    assert all(p.read_text().lstrip().startswith("<?xml") for p in paths)


def test_clear_import_error_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "artifactscan.render.style")
    with pytest.raises(ImportError, match="pip install 'matplotlib"):
        importlib.import_module("artifactscan.render.style")


# ----------------------------------------------------------------------------------------------- with a real scan
def test_figures_of_a_real_scan(tmp_path):
    timm = pytest.importorskip("timm")
    from artifactscan.models.loading import wrap_module
    from artifactscan.analysis.scan import scan

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2)
    report = scan(wrap_module(model), torch.rand(3, 3, 32, 32), device="cpu", num_maps=1, threshold="150")
    paths = plots.save_scan_figures(report, tmp_path, dpi=80)
    assert [p.name for p in paths] == ["norm_histogram.png", "layer_norms.png", "tensor_0.png"]
    for p in paths:
        _check_png(p)
    fig, axes = plots.plot_compare({"a": report, "b": report})
    assert all(not math.isnan(y) for y in axes[0].get_lines()[0].get_ydata())


# ----------------------------------------------------------------------------------------------- compare / emergence
def test_save_compare_and_emergence_figures(tmp_path):
    from artifactscan.analysis.compare import CompareReport
    from artifactscan.analysis.emergence import EmergenceGroup, EmergencePoint, EmergenceReport

    reports = {"0 reg": make_report(image_names=["tensor[0]"]),
               "4 reg": make_report(artifacts_from=None, image_names=["tensor[0]"], seed=1)}
    paths = plots.save_compare_figure(CompareReport([], reports, model=[], images=ImageSummary.described_only("synthetic:8"),
                                                          headline="verdict"), tmp_path, dpi=60)
    assert [p.name for p in paths] == ["compare.png"]
    _check_png(paths[0])
    assert plots.save_compare_figure(CompareReport([], model=[], images=ImageSummary.described_only("x"), headline="v"), tmp_path) == []

    def group(regs, onset):
        pts = [EmergencePoint(step, f"ckpt{step}.safetensors", None,
                              [0.0, 0.02 * (step >= onset)], [2.0, 12.0 if step >= onset else 2.5])
               for step in (0, 500, 1000, 1500)]
        return EmergenceGroup(f"vit_reg{regs}", regs, pts)

    emergence = EmergenceReport("runs/exp1", [group(0, 1000), group(4, 10**9)], [], model=[],
                                 images=ImageSummary.described_only("synthetic:8"), headline="h")
    fig, (ax_f, ax_r) = plots.plot_emergence(emergence)
    assert [line.get_label() for line in ax_f.get_lines()] == ["0 registers", "4 registers"]
    np.testing.assert_allclose(ax_f.get_lines()[0].get_ydata(), [0, 0, 2, 2])
    assert ax_r.get_yscale() == "log" and ax_f.get_xlabel() == "training step"
    paths = plots.save_emergence_figure(emergence, tmp_path, dpi=60)
    assert [p.name for p in paths] == ["emergence.png"]
    _check_png(paths[0])
