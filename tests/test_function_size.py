"""Function size (issue 21): at most three functions of the package are over 80 lines.

The measure: from a function's ``def`` line to its last line, minus the lines of its docstring. Comments and blank
lines count; a nested function counts inside its parent (and is measured on its own too); decorators do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import artifactscan

PACKAGE = Path(artifactscan.__file__).parent
LONG = 80  # lines
LONG_ALLOWED = 3  # functions over LONG lines


def function_lengths(root: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(length, "path:line name")`` of every function and method under ``root``, by the measure above."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if ast.get_docstring(node, clean=False) is not None:
                docstring = node.body[0]
                length -= docstring.end_lineno - docstring.lineno + 1
            rows.append((length, f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"))
    return rows


def test_the_measure_counts_comments_and_nested_functions_but_not_the_docstring(tmp_path):
    (tmp_path / "m.py").write_text(
        "@decorator\n"
        "def outer():\n"
        '    """Two lines\n'
        '    of docstring."""\n'
        "    # a comment\n"
        "\n"
        "    def inner():\n"
        "        return 1\n"
        "    return inner\n"
    )
    assert sorted(function_lengths(tmp_path)) == [(2, f"{tmp_path.name}/m.py:7 inner"),
                                                   (6, f"{tmp_path.name}/m.py:2 outer")]


def test_at_most_three_functions_are_over_80_lines():
    long = sorted((row for row in function_lengths() if row[0] > LONG), reverse=True)
    shown = "\n".join(f"  {where}: {length} lines" for length, where in long)
    assert len(long) <= LONG_ALLOWED, (
        f"{len(long)} functions are over {LONG} lines (def to last line, docstring not counted); at most "
        f"{LONG_ALLOWED} may be. Split these by meaning:\n{shown}")
