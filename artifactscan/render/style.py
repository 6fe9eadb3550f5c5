"""The look of every figure, in one place: colours, sizes, rc style, and the small helpers all figures share.

Figures are matplotlib ``Figure`` objects built without pyplot (nothing is shown, nothing global is left open);
sizes are journal column widths in inches; colours are Okabe & Ito's, told apart in greyscale by marker/linestyle.
"""

from __future__ import annotations

import math
import re
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

try:
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib import patheffects
except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
    raise ImportError(
        "artifactscan's figures need matplotlib, which is not installed: pip install 'matplotlib>=3.7' "
        "(or reinstall artifactscan, which depends on it)"
    ) from exc


import numpy as np

from artifactscan.core.thresholds import PAPER_THRESHOLD  # noqa: F401  (re-exported: figures draw it, plots.py too)
from artifactscan.models.phantom_notice import PHANTOM_TAG, is_phantom  # noqa: F401  (re-exported: the figures' tag)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from artifactscan.analysis.scan import NormMap, ScanReport

# Okabe & Ito (2008), safe for the common colour-vision deficiencies and distinct in greyscale by marker/linestyle.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
BLUE, ORANGE, GREEN, PURPLE, SKY, VERMILLION, YELLOW, BLACK = OKABE_ITO
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", "-.", ":"]
HEATMAP_CMAP = "viridis"

COLUMN_WIDTH_IN = 3.5
DOUBLE_WIDTH_IN = 7.0

STYLE = {
    "font.size": 8,
    "axes.titlesize": 8.5,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 6.5,
    "legend.title_fontsize": 7,
    "figure.titlesize": 9,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": True,
    "legend.framealpha": 0.9,
    "legend.edgecolor": "0.8",
    # No bbox="tight": constrained layout already fits everything in, and the saved size stays the column width.
    "figure.constrained_layout.h_pad": 0.03,
    "figure.constrained_layout.w_pad": 0.03,
    "image.cmap": HEATMAP_CMAP,
}


#: The smaller rc style of the probe figures.
COMPACT_STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
          "legend.fontsize": 7, "axes.spines.top": False, "axes.spines.right": False}


@contextmanager
def plot_style() -> Iterator[None]:
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float, height: float, ncols: int = 1, **subplot_kw: Any) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False, **subplot_kw)[0]
    return fig, list(axes)


def two_axes(axes: Sequence[Axes] | None, height: float) -> tuple[Figure, Axes, Axes]:
    """A double-width figure of two panels side by side, or the caller's two axes (drawn into their figure)."""
    if axes is None:
        fig, (left, right) = new_figure(DOUBLE_WIDTH_IN, height, ncols=2)
        return fig, left, right
    left, right = axes
    return left.figure, left, right


def one_ax(ax: Axes | None, width: float, height: float) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, axes = new_figure(width, height)
    return fig, axes[0]


def as_float(x: Any) -> float:
    """A float, with ``None`` (how JSON stores NaN) read back as NaN."""
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def format_number(x: float) -> str:
    """Three significant digits, without an exponent between 1e-4 and 1e6 (1000, not 1e+03)."""
    return "n/a" if not math.isfinite(x) else f"{float(f'{x:.3g}'):g}"


def format_pct(fraction: float) -> str:
    if not math.isfinite(fraction):
        return "n/a"
    p = 100 * fraction
    if p == 0:
        return "0%"
    return f"{p:.2g}%" if p < 1 else f"{p:.1f}%"


def wrap_text(text: str, width: int = 50) -> str:
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def tag_phantom(title: str | None, phantom: bool) -> str | None:
    """``title`` with the phantom tag on a line of its own (when ``phantom``)."""
    if not phantom:
        return title
    tag = f"[{PHANTOM_TAG}]"
    if title and PHANTOM_TAG in title:
        return title
    return f"{title}\n{tag}" if title else tag


def line_style(i: int) -> dict[str, Any]:
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[(i // len(OKABE_ITO)) % len(LINESTYLES)]}


def plain_log_ticks(axis: Any) -> None:
    """Ticks of a log axis written as plain numbers (20, 50, 100) rather than 2x10^1; density by decades shown."""
    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and hi > lo):
        return
    span = math.log10(hi / lo)
    if span > 4.5:
        return  # many decades: matplotlib's 10^k labels read best
    subs = (1.0, 2.0, 3.0, 5.0) if span <= 1.0 else (1.0, 2.0, 5.0) if span <= 2.2 else (1.0,)
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def load_display_image(image_path: str | None, aspect_hw: tuple[int, int], max_side: int = 448):
    """The image as the model saw it (centre crop to the input aspect, resized), or None when unreadable."""
    if image_path is None:
        return None
    from artifactscan.inputs.images import load_rgb  # local: plots must not need torch at import for this alone

    try:
        p = Path(image_path)
        if not p.is_file():
            return None
        img = load_rgb(p)
    except Exception:  # ImageSkipped, OSError, ...: a figure is still useful without the photo
        return None
    h, w = aspect_hw
    target = w / h
    iw, ih = img.size
    if iw / ih > target:
        cw, ch = round(ih * target), ih
    else:
        cw, ch = iw, round(iw / target)
    left, top = (iw - cw) // 2, (ih - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    scale = min(1.0, max_side / max(cw, ch))
    if scale < 1.0:
        from PIL import Image

        img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    return np.asarray(img)


def outline_cells(ax: Axes, flagged: np.ndarray, colour: str = VERMILLION) -> int:
    """Outline each flagged grid cell (grid coordinates: cell (r, c) spans c-0.5..c+0.5); returns the count."""
    rows, cols = np.nonzero(flagged)
    stroke = [patheffects.withStroke(linewidth=2.6, foreground="white")]
    for r, c in zip(rows.tolist(), cols.tolist()):
        rect = Rectangle((c - 0.5 + 0.06, r - 0.5 + 0.06), 0.88, 0.88, fill=False, edgecolor=colour,
                         linewidth=1.2, path_effects=stroke)
        ax.add_patch(rect)
    return len(rows)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_stem(name: str, index: int) -> str:
    """A file-name-safe stem for an image name (``photos/cat 1.jpg`` -> ``cat_1``, ``tensor[3]`` -> ``tensor_3``)."""
    base = str(name).replace("\\", "/").rstrip("/").split("/")[-1]
    if "." in base and not base.startswith("."):
        base = base.rsplit(".", 1)[0]
    stem = _UNSAFE.sub("_", base).strip("._-")[:80]
    return stem or f"image_{index}"


def unique_stems(maps: Sequence[NormMap]) -> list[str]:
    seen: set[str] = set()
    out = []
    for m in maps:
        stem = file_stem(m.image, m.image_index)
        candidate = stem
        if candidate.lower() in seen:  # case-insensitive: macOS / Windows file systems
            candidate = f"{stem}_{m.image_index}"
        n = 2
        while candidate.lower() in seen:
            candidate = f"{stem}_{m.image_index}_{n}"
            n += 1
        seen.add(candidate.lower())
        out.append(candidate)
    return out


def close_figure(fig: Figure) -> None:
    """Free a figure; also drops it from pyplot's list if it was registered there."""
    import sys

    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)  # no-op for a figure pyplot does not manage
    fig.clear()


def literal_text(text: str) -> str:
    """``text`` as a figure shows it literally: each line as :func:`display_name` prints names (a byte that is not
    UTF-8 as ``\\xNN``, which no font has a glyph for), the line breaks kept."""
    from artifactscan.core.paths import display_name

    return "\n".join(display_name(line) for line in text.split("\n"))


def make_texts_literal(fig: Figure) -> None:
    """Every title, label and note of ``fig`` drawn as written. They hold file and model names, and a name may hold
    ``$`` (matplotlib would parse it as math and fail on ``a$b.jpg``) or bytes that are not UTF-8 (no font can draw
    them). Tick labels are left alone: log axes write theirs in math on purpose."""
    from matplotlib.text import Text

    ticks = {id(label) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for tick in axis.get_major_ticks() + axis.get_minor_ticks() for label in (tick.label1, tick.label2)}
    for text in fig.findobj(Text):
        if id(text) in ticks:
            continue
        text.set_parse_math(False)
        shown = text.get_text()
        if shown and literal_text(shown) != shown:
            text.set_text(literal_text(shown))


def save_figure(fig: Figure, path: Path, dpi: int, style: Any = None) -> Path:
    """Save atomically (a temporary name in the same folder, then renamed): never a half-written figure. Its
    texts are drawn as written (:func:`make_texts_literal`)."""
    from artifactscan.core.files import atomic_path

    path = Path(path)
    make_texts_literal(fig)
    with atomic_path(path) as tmp, (plot_style() if style is None else matplotlib.rc_context(style)):
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    return path
