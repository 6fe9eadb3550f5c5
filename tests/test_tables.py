"""Every command's table fits the terminal: each cell whole on one line, no "…", at 40/60/80/120 columns, in a
terminal, piped, with NO_COLOR and with TERM=dumb. The tables are rendered from small real results."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
from rich.cells import cell_len
from rich.console import Console

from artifactscan.render import text as render_text
from artifactscan.render.table import STACK_BELOW, Column, FitTable, name_list, num, pct, ratio, spread_order

from . import real_results as real
from .conftest import REPO

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
WIDTHS = (40, 60, 80, 120)
MODES = ("terminal", "piped", "NO_COLOR", "TERM=dumb")


# ----------------------------------------------------------------------------------------------- number formats
@pytest.mark.parametrize("value, text", [
    (0, "0"), (19.0, "19"), (42.13, "42.1"), (999.4, "999"), (999.6, "1k"), (1220.0, "1.22k"), (12345, "12.3k"),
    (123456, "123k"), (999_700, "1M"), (1.5e9, "1.5G"), (-1220, "-1.22k"), (0.00123, "0.00123"),
    (1.23e-5, "1.23e-5"), (None, "-"), (float("nan"), "-"), (float("inf"), "inf"),
])
def test_numbers_are_three_significant_digits_and_compact(value, text):
    assert num(value) == text


def test_percentages_and_ratios():
    assert [pct(x) for x in (0.015625, 1.0, 0.0, 0.0281, None)] == ["1.56%", "100%", "0%", "2.81%", "-"]
    assert [ratio(x) for x in (29.04, 2.46, 123.4, 1234.0, None)] == ["29.0x", "2.5x", "123x", "1.23kx", "-"]


def test_spread_order_keeps_the_last_block_then_spreads_the_rest():
    rank = spread_order(24)
    assert sorted(rank) == list(range(24)) and rank[23] == 0 and rank[0] == 1
    kept = sorted(range(24), key=rank.__getitem__)[:5]  # the five blocks a narrow terminal keeps
    assert kept == [23, 0, 11, 5, 17]


def test_left_out_names_are_listed_with_ranges():
    names = ["block 1", "block 2", "block 3", "block 6", "block 8", "block 9", "p99", "% above 150"]
    assert name_list(names) == "block 1-3, 6, 8-9, p99, % above 150"


# ----------------------------------------------------------------------------------------------- real results
@pytest.fixture(scope="module")
def results():
    """One small real result per command (computed once; each table is then printed 16 ways)."""
    return {
        "norms": (render_text.render_scan, real.deep_scan()),
        "norms (registers)": (render_text.render_scan, real.register_scan()),
        "norms RUN_DIR": (render_text.render_emergence, real.emergence()),
        "compare": (render_text.render_compare, real.comparison()),
        "probe": (render_text.render_probe, real.probe_result()),
        "attention": (render_text.render_attention, real.attention_result("demo-reg4")),
        "fix": (render_text.render_fix, real.fix_result()),
        "discover": (render_text.render_discover, real.discover_result()),
        "calibrate": (render_text.render_calibration, real.calibration()),
    }


def _console(mode: str, width: int, monkeypatch) -> tuple[Console, io.StringIO]:
    for var in ("NO_COLOR", "TERM", "COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(var, raising=False)
    buf = io.StringIO()
    if mode == "terminal":
        return Console(file=buf, width=width, force_terminal=True, color_system="truecolor"), buf
    monkeypatch.setenv("COLUMNS", str(width))
    if mode == "piped":  # not a terminal: rich takes COLUMNS (80 when unset)
        return Console(file=buf), buf
    monkeypatch.setenv({"NO_COLOR": "NO_COLOR", "TERM=dumb": "TERM"}[mode], "1" if mode == "NO_COLOR" else "dumb")
    monkeypatch.setenv("LINES", "40")  # a dumb terminal's size is COLUMNS x LINES when both are set, else 80 x 25
    return Console(file=buf, force_terminal=True), buf


def assert_table_fits(out: str, table: FitTable, width: int) -> None:
    """The table as printed at ``width``: one line per row holding every shown cell whole, or (stacked) one line
    per value; the columns left out are named."""
    lines = out.splitlines()
    shown = table.shown_columns(width)
    if width >= STACK_BELOW:  # readable as a table from 60 columns on (the test data has no giant names)
        assert shown is not None, f"stacked at {width} columns"
    if shown is None:
        _assert_stacked(lines, table, width)
        return
    row_lines = []
    for cells, _ in table.rows:
        words = [re.escape(cells[i]) for i in shown if cells[i]]
        pattern = re.compile(r"^\s*" + r"\s+".join(words) + r"\s*$")
        start = row_lines[-1] + 1 if row_lines else 0
        match = next((k for k in range(start, len(lines)) if pattern.match(lines[k])), None)
        assert match is not None, f"no line holds the row {[cells[i] for i in shown]} whole:\n{out}"
        row_lines.append(match)
    assert row_lines == list(range(row_lines[0], row_lines[0] + len(table.rows))), "a row spans several lines"
    header, rule = lines[row_lines[0] - 2], lines[row_lines[0] - 1]
    assert header.split() == " ".join(table.columns[i].header for i in shown).split()
    assert set(rule.strip()) <= {"─", "-"}
    assert all(cell_len(lines[k]) <= width for k in [*row_lines, row_lines[0] - 2, row_lines[0] - 1])
    left_out = [table.columns[i].label for i in range(len(table.columns)) if i not in shown]
    flat = " ".join(out.split())
    if left_out:
        assert f"not shown at {width} columns: {name_list(left_out)}" in flat
    else:
        assert "not shown at" not in flat


def _assert_stacked(lines: list[str], table: FitTable, width: int) -> None:
    """Each row: its first cell alone on a line, then ``  label  value`` per column; a value too long for that line
    follows on its own lines, broken only at its spaces."""
    labels = [col.label for col in table.columns[1:]]
    label_width = max(cell_len(lb) for lb in labels)
    k = 0
    for cells, _ in table.rows:
        k = lines.index(cells[0], k) + 1
        for label, value in zip(labels, cells[1:]):
            if lines[k] == f"  {label.ljust(label_width)}  {value}".rstrip():
                assert cell_len(lines[k]) <= width
                k += 1
                continue
            assert lines[k] == f"  {label}", (lines[k], label, value)
            k += 1
            parts = []
            while k < len(lines) and lines[k].startswith("    "):
                parts.append(lines[k])
                k += 1
            assert " ".join(p.strip() for p in parts) == " ".join(value.split())
            assert all(cell_len(p) <= width or " " not in p.strip() for p in parts)


COMMANDS = ("norms", "norms (registers)", "norms RUN_DIR", "compare", "probe", "attention", "fix", "discover",
            "calibrate")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_commands_table_fits(command, width, mode, results, monkeypatch):
    render, result = results[command]
    printed: list[FitTable] = []
    original = FitTable.print

    def spy(self, console):
        printed.append(self)
        original(self, console)

    monkeypatch.setattr(FitTable, "print", spy)
    console, buf = _console(mode, width, monkeypatch)
    render(result, console)
    out = buf.getvalue()
    assert ("\x1b[" in out) == (mode in ("terminal", "NO_COLOR")), "styles only where a terminal takes them"
    out = ANSI.sub("", out)
    assert "…" not in out
    assert printed and all(t.rows for t in printed)
    for table in printed:
        assert_table_fits(out, table, console.width)
    assert console.width == width


def test_columns_are_left_out_by_priority_and_named():
    table = FitTable([Column("name", "left"), Column("a", drop=2, long="column a"), Column("b", drop=1),
                      Column("kept")], title="t")
    table.add_row("x" * 50, "1" * 6, "2" * 6, "3" * 4)
    assert table.shown_columns(120) == [0, 1, 2, 3]
    assert table.shown_columns(64) == [0, 2, 3]  # "a" (drop 2) goes before "b" (drop 1)
    assert table.shown_columns(60) == [0, 3]
    table.add_row("y" * 70, "", "", "")
    assert table.shown_columns(70) is None  # even the kept columns do not fit: one value per line
    assert table.shown_columns(59) is None
    buf = io.StringIO()
    table.print(Console(file=buf, width=80))
    assert "not shown at 80 columns: column a, b (--json has every column)" in buf.getvalue()


def test_cells_are_printed_literally():
    """A file name with rich markup or emoji codes in it is a name, not a style."""
    table = FitTable([Column("model", "left"), Column("n")])
    table.add_row("[red]x[/red] :smile:", "1")
    buf = io.StringIO()
    table.print(Console(file=buf, width=80))
    assert "[red]x[/red] :smile:" in buf.getvalue()


@pytest.mark.parametrize("columns, env", [(None, {"NO_COLOR": "1", "TERM": "dumb"}), ("40", {"NO_COLOR": "1"})])
def test_norms_piped_prints_whole_cells(columns, env):
    """The measured case: `artifactscan norms | cat` (80 columns when piped) and `NO_COLOR=1 COLUMNS=40`."""
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR", "TERM")}
    environ.update(env, PYTHONPATH=str(REPO))
    if columns:
        environ["COLUMNS"] = columns
    out = subprocess.run([sys.executable, "-m", "artifactscan", "norms", "phantom", "synthetic:8"], cwd=REPO,
                         env=environ, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "…" not in out.stdout and "\x1b[" not in out.stdout
    lines = out.stdout.splitlines()
    width = int(columns or 80)
    if columns is None:
        rows = [ln for ln in lines if re.match(r"^(block \d+|final norm)\s{2,}\S", ln)]
        assert len(rows) == 7 and all(cell_len(ln) <= width for ln in rows)
        assert re.search(r"^block 5\s+\S+\s+\S+\s+\S+\s+\d+\.\dx\s+\S+\s+1\.56%\s+8/8", "\n".join(rows), re.M)
    else:
        assert lines.count("block 5") == 1
        assert any(re.match(r"^  % flagged\s+1\.56%$", ln) for ln in lines[lines.index("block 5"):])
