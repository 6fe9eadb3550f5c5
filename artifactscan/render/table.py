"""Terminal tables that fit the terminal: every command's tables are a :class:`FitTable`.

A cell is never cut ("1.22…") or wrapped: each is printed whole on one line. Numbers are compact (:func:`num`: three
significant digits, ``1.22k``) and headers short, so most tables fit 80 columns as they are. When a table is still
wider than the console, columns are left out by priority (:attr:`Column.drop`: the highest number goes first) and one
line names them (every column stays in ``--json`` and in the ``--out`` files); below :data:`STACK_BELOW` columns, or
when even the columns that are never dropped do not fit, each row is printed as a block with one value per line.
The console's width is rich's: the terminal's, or ``COLUMNS``, or 80 when the output is piped.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from rich.cells import cell_len
from rich.text import Text

if TYPE_CHECKING:
    from rich.console import Console

#: Narrower than this, a table is printed one value per line.
STACK_BELOW = 60
#: Spaces between two columns of a table.
GAP = 2

_SUFFIXES = ("", "k", "M", "G", "T", "P", "E")


def num(x: float | None) -> str:
    """Three significant digits; thousands and up with a suffix (``1.22k``, ``45.3M``), tiny values as ``1.2e-5``.

    ``None`` and NaN print as ``-`` (JSON stores NaN as null; the table shows "no value" the same way)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    magnitude = abs(x)
    if magnitude < 1e-3:
        mantissa, exponent = f"{x:.2e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    if magnitude < 999.5:  # below 999.5, three significant digits stay below 1000
        return f"{x:.3g}"
    tier = min(int(math.log10(magnitude) // 3), len(_SUFFIXES) - 1)
    scaled = x / 1000 ** tier
    if abs(float(f"{scaled:.3g}")) >= 1000 and tier + 1 < len(_SUFFIXES):  # 999.7k rounds to 1000k: say 1M
        tier, scaled = tier + 1, scaled / 1000
    return f"{float(f'{scaled:.3g}'):g}{_SUFFIXES[tier]}"


def pct(fraction: float | None) -> str:
    """A fraction as a percentage with three significant digits: ``1.56%``, ``100%``, ``0%``; ``-`` for none."""
    return "-" if fraction is None or fraction != fraction else f"{num(100 * fraction)}%"


def ratio(x: float | None) -> str:
    """A ratio such as max/median: one decimal below 100 (``29.0x``), then compact (``123x``, ``1.22kx``)."""
    if x is None or x != x:
        return "-"
    return f"{x:.1f}x" if abs(x) < 99.95 else f"{num(x)}x"


@dataclass(frozen=True)
class Column:
    """One column: its short ``header``, how its cells line up, and when it is left out.

    ``drop`` 0 means the column is always shown; among the others, the highest number is left out first when the
    table is too wide (ties: the rightmost first). ``long`` names the column in the one-value-per-line layout and in
    the line that says what was left out (default: the header)."""

    header: str
    justify: str = "right"
    drop: int = 0
    long: str = ""

    @property
    def label(self) -> str:
        return self.long or self.header


@dataclass
class FitTable:
    """Rows of plain-text cells (never markup: a file name is printed as it is), printed to fit the console."""

    columns: Sequence[Column]
    title: str = ""
    rows: list[tuple[list[str], str]] = field(default_factory=list)

    def add_row(self, *cells: str, style: str = "") -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(([str(c) for c in cells], style))

    def widths(self) -> list[int]:
        """Each column's natural width: its widest cell or its header, whichever is wider."""
        return [max([cell_len(col.header)] + [cell_len(cells[i]) for cells, _ in self.rows])
                for i, col in enumerate(self.columns)]

    def shown_columns(self, width: int) -> list[int] | None:
        """The indices of the columns that fit in ``width``, dropping by priority; ``None``: stack the rows."""
        if width < STACK_BELOW:
            return None
        natural = self.widths()
        shown = list(range(len(self.columns)))

        def total() -> int:
            return sum(natural[i] for i in shown) + GAP * (len(shown) - 1)

        while total() > width:
            droppable = [i for i in shown if self.columns[i].drop > 0]
            if not droppable:
                return None
            shown.remove(max(droppable, key=lambda i: (self.columns[i].drop, i)))
        return shown

    def print(self, console: "Console") -> None:
        width = console.width
        if self.title:
            console.print(Text(self.title, style="italic"), overflow="fold")
        shown = self.shown_columns(width)
        if shown is None:
            self._print_stacked(console, width)
            return
        console.print(self._rich_table(shown))
        left_out = [self.columns[i].label for i in range(len(self.columns)) if i not in shown]
        if left_out:
            console.print(Text(f"not shown at {width} columns: {name_list(left_out)} (--json has every column)",
                               style="dim"), overflow="fold")

    def _rich_table(self, shown: list[int]) -> "object":
        from rich import box
        from rich.table import Table

        natural = self.widths()
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                      padding=(0, GAP // 2), header_style="bold")
        for i in shown:
            col = self.columns[i]
            # Never "…": the widths were chosen so every cell fits; if rich ever disagreed, it folds, not cuts.
            table.add_column(Text(col.header), justify=col.justify, no_wrap=True, min_width=natural[i],
                             overflow="fold")
        for cells, style in self.rows:
            table.add_row(*(Text(cells[i]) for i in shown), style=style or None)
        return table

    def _print_stacked(self, console: "Console", width: int) -> None:
        """Each row as a block: its first cell as the heading, then one ``label  value`` line per other column."""
        labels = [col.label for col in self.columns[1:]]
        label_width = max((cell_len(lb) for lb in labels), default=0)
        for cells, style in self.rows:
            console.print(Text(cells[0], style=style or ""), no_wrap=True, crop=False)
            for label, value in zip(labels, cells[1:]):
                for line in _stacked_lines(label, value, label_width, width):
                    console.print(Text(line), no_wrap=True, crop=False)


def name_list(names: Sequence[str]) -> str:
    """Names joined by commas, runs of numbered ones as ranges: ``block 1-4, 6, 8-10, p99``."""
    parts: list[tuple[str, int, int] | str] = []
    for name in names:
        m = re.fullmatch(r"(.*?)(\d+)", name)
        last = parts[-1] if parts else None
        if m and isinstance(last, tuple) and last[0] == m[1] and last[2] + 1 == int(m[2]):
            parts[-1] = (last[0], last[1], int(m[2]))
        else:
            parts.append((m[1], int(m[2]), int(m[2])) if m else name)
    out, previous = [], None
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            previous = None
            continue
        stem, lo, hi = part
        span = f"{lo}" if lo == hi else f"{lo}-{hi}"
        out.append(span if stem == previous else stem + span)
        previous = stem
    return ", ".join(out)


def _stacked_lines(label: str, value: str, label_width: int, width: int) -> list[str]:
    """``  label  value`` on one line when it fits; else the value on the lines below, broken only at its spaces
    (between items, never inside a number or a name without spaces)."""
    one = f"  {label.ljust(label_width)}  {value}"
    if cell_len(one) <= width:
        return [one.rstrip()]
    indent = "    "
    body = textwrap.wrap(value, max(width - len(indent), 1), break_long_words=False, break_on_hyphens=False)
    return [f"  {label}"] + [indent + part for part in body or ["-"]]


def spread_order(n: int) -> list[int]:
    """For ``n`` columns of a sequence (blocks): each one's rank in the order they are kept as space runs out - the
    last first, then the first, then the middle and ever finer midpoints - so what is left is spread evenly."""
    if n <= 0:
        return []
    order = [n - 1] + ([0] if n > 1 else [])
    intervals = [(0, n - 1)]
    while len(order) < n:
        next_intervals = []
        for lo, hi in intervals:
            if hi - lo > 1:
                mid = (lo + hi) // 2
                order.append(mid)
                next_intervals += [(lo, mid), (mid, hi)]
        intervals = next_intervals
    rank = [0] * n
    for position, column in enumerate(order):
        rank[column] = position
    return rank
