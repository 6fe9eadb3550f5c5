"""The package's layering holds: every import (function-local and TYPE_CHECKING ones included) points to the same
layer or one below, the module graph has no cycle, no module borrows another's private name, and none is huge."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "artifactscan"
LAYERS = ["core", "inputs", "models", "analysis", "render", "cli"]  # bottom to top
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _rank(module: str) -> int:
    parts = module.split(".")
    # artifactscan/__init__.py, __main__ and the thin re-export modules at the top sit above every layer.
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def _imports(mods: dict[str, Path]):
    """(importer, imported module, imported name or None) for every import of an artifactscan module."""
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for alias in node.names:
                    sub = f"{src}.{alias.name}"
                    yield (name, sub, None) if sub in mods else (name, src, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield name, alias.name, None


def _owner(target: str, mods: dict[str, Path]) -> str | None:
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def test_every_import_points_down_or_sideways():
    mods = _modules()
    upward = []
    for importer, target, _ in _imports(mods):
        owner = _owner(target, mods)
        if owner and owner != importer and _rank(owner) > _rank(importer):
            upward.append(f"{importer} -> {owner}")
    assert not upward, upward


def test_no_import_cycle():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for importer, target, _ in _imports(mods):
        owner = _owner(target, mods)
        if owner and owner != importer and owner != "artifactscan":
            graph[importer].add(owner)
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_no_private_name_imported_across_modules():
    mods = _modules()
    borrowed = [f"{importer} <- {target}.{name}" for importer, target, name in _imports(mods)
                if name and target in mods and target != importer and name.startswith("_")
                and not name.startswith("__")]
    assert not borrowed, borrowed


def test_no_module_is_huge():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert max(sizes.values()) <= MAX_LINES, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
