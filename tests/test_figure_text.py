"""No figure the tool writes has colliding text: every figure kind is saved from small real results, and the text
matplotlib actually drew into the file (titles, suptitles, axis labels, tick labels, legends, annotations) is
measured with the renderer that drew it. No two text boxes may overlap by more than a pixel, and none may run off
the figure's edge (where it would be cut). A rotated text is measured by its upright bounding box, which is larger
than its glyphs: slanted labels that nearly touch count as a collision (the figures use upright labels instead)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.text import Text  # noqa: E402

from artifactscan.render import (  # noqa: E402
    plots,
    plots_attention,
    plots_calibrate,
    plots_compare,
    plots_discover,
    plots_probe,
    style,
)

from . import real_results as real  # noqa: E402

#: Boxes may touch: anti-aliasing and rounding make neighbours share up to a pixel.
TOLERANCE_PX = 1.0
FIGURE_MODULES = (plots, plots_attention, plots_calibrate, plots_compare, plots_discover, plots_probe)


@dataclass
class DrawnText:
    text: str
    role: str
    x0: float
    y0: float
    x1: float
    y1: float

    def overlap(self, other: "DrawnText") -> float:
        """How far the two boxes overlap, in pixels, in the direction they overlap least (<= 0: apart)."""
        return min(min(self.x1, other.x1) - max(self.x0, other.x0), min(self.y1, other.y1) - max(self.y0, other.y0))

    def __str__(self) -> str:
        return f"{self.role} {self.text!r} at ({self.x0:.0f},{self.y0:.0f})-({self.x1:.0f},{self.y1:.0f})"


def _role(artist: Text) -> str:
    """What a text is, for the failure message: a title, an axis label, a tick label, a legend entry ..."""
    fig = artist.get_figure(root=True) if hasattr(artist, "get_figure") else artist.figure
    if fig is not None and artist is getattr(fig, "_suptitle", None):
        return "suptitle"
    for ax in fig.axes if fig is not None else []:
        if artist in (ax.title, ax._left_title, ax._right_title):
            return "title"
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if artist is axis.label:
                return f"{name}-label"
            if artist is axis.get_offset_text():
                return f"{name}-offset"
            if any(artist in (t.label1, t.label2) for t in axis.get_major_ticks() + axis.get_minor_ticks()):
                return f"{name}-tick"
        legend = ax.get_legend()
        if legend is not None and (artist in legend.get_texts() or artist is legend.get_title()):
            return "legend"
    return "annotation" if type(artist).__name__ == "Annotation" else "text"


@contextlib.contextmanager
def recording_drawn_text():
    """Record every non-empty text matplotlib draws, with its box as the drawing renderer measures it (the last
    draw of each artist wins: constrained layout may draw more than once)."""
    drawn: dict[int, tuple[Text, DrawnText]] = {}
    sizes: list[tuple[float, float]] = []
    original = Text.draw

    def draw(self: Text, renderer) -> None:
        original(self, renderer)
        if not self.get_visible() or not self.get_text().strip():
            return
        box = self.get_window_extent(renderer)
        drawn[id(self)] = (self, DrawnText(self.get_text(), _role(self), box.x0, box.y0, box.x1, box.y1))
        sizes.append((renderer.width, renderer.height))

    Text.draw = draw
    try:
        yield drawn, sizes
    finally:
        Text.draw = original


def collisions(texts: list[DrawnText], width: float, height: float) -> list[str]:
    problems = []
    for i, a in enumerate(texts):
        if a.x0 < -TOLERANCE_PX or a.y0 < -TOLERANCE_PX or a.x1 > width + TOLERANCE_PX or a.y1 > height + TOLERANCE_PX:
            problems.append(f"cut off at the figure's edge ({width:.0f}x{height:.0f} px): {a}")
        for b in texts[i + 1:]:
            if a.overlap(b) > TOLERANCE_PX:
                problems.append(f"{a}  overlaps  {b}")
    return problems


@pytest.fixture
def checked_figures(monkeypatch):
    """Every figure saved through ``save_figure`` is checked as it is written; returns {file name: problems}."""
    found: dict[str, list[str]] = {}
    original = style.save_figure

    def save_and_check(fig, path, dpi, style=None):
        with recording_drawn_text() as (drawn, sizes):
            written = original(fig, path, dpi, style)
        assert drawn, f"nothing drawn in {path}"
        width, height = sizes[-1]
        found[str(path)] = collisions([d for _, d in drawn.values()], width, height)
        return written

    for module in FIGURE_MODULES:
        monkeypatch.setattr(module, "save_figure", save_and_check)
    return found


def _save_every_figure(out: Path) -> None:
    from artifactscan.render.outputs import write_probe_outputs, write_scan_outputs

    write_scan_outputs(real.photo_scan(), out / "norms")
    write_scan_outputs(real.deep_scan(), out / "norms-deep")
    plots_compare.save_emergence_figure(real.emergence(), out / "run")
    plots_compare.save_compare_figure(real.comparison(), out / "compare")
    plots_compare.save_register_ablation_figure(real.comparison(), out / "compare")
    write_probe_outputs(real.probe_result(), out / "probe")
    plots_attention.save_attention_figures(real.attention_result(), out / "attention")
    plots_attention.save_attention_figures(real.attention_result("demo-reg4"), out / "attention-reg")
    plots_discover.save_discover_figure(real.discover_result(), out / "discover")
    plots_calibrate.save_calibration_figure(real.calibration(), out / "calibrate")


EXPECTED = {"norms/norm_histogram.png", "norms/layer_norms.png", "run/emergence.png", "compare/compare.png",
            "compare/register_ablation.png", "probe/probes.png", "probe/neighbour_similarity.png",
            "attention/attention_mass.png", "discover/discover.png", "calibrate/calibration.png"}


def test_no_figure_has_colliding_text(checked_figures, tmp_path):
    _save_every_figure(tmp_path)
    checked = {str(Path(p).relative_to(tmp_path)): found for p, found in checked_figures.items()}
    names = set(checked)
    assert EXPECTED <= names, sorted(EXPECTED - names)
    for kind in ("norms/maps", "attention/attention_maps", "attention/attention_heads"):
        assert any(n.startswith(kind) for n in names), (kind, sorted(names))
    problems = {name: found for name, found in sorted(checked.items()) if found}
    assert not problems, "\n".join(f"{name}:\n  " + "\n  ".join(found) for name, found in problems.items())


def test_the_checker_sees_a_collision(tmp_path):
    """The probe figure's old fault, rebuilt: a two-line suptitle over a panel's title, and a label on ticks."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 2))
    ax = fig.subplots()
    ax.set_title("lower = more\nredundant")
    fig.text(0.5, 0.93, "a suptitle placed\nby hand", ha="center", va="top")
    ax.set_ylabel("label", labelpad=-20)
    with recording_drawn_text() as (drawn, sizes):
        style.save_figure(fig, tmp_path / "bad.png", 100)
    found = collisions([d for _, d in drawn.values()], *sizes[-1])
    assert any("title" in p and "overlaps" in p for p in found), found
    assert any("y-label" in p and "y-tick" in p for p in found), found
