"""Every module path named in a docstring of the package or in docs/*.md exists: ``artifactscan/x/y.py``,
``models/x.py`` (under artifactscan/), ``tests/x.py``, ``benchmarks/x.py`` and ``artifactscan.x.y`` (a module, or a
name defined at the top of one)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "artifactscan"
LAYERS = ("core", "inputs", "models", "analysis", "render", "cli")
FILE_PATH = re.compile(r"(?<![\w./-])((?:artifactscan|tests|benchmarks|" + "|".join(LAYERS) + r")/[\w/]*\w\.py)\b")
DOTTED = re.compile(r"(?<![\w./-])(artifactscan(?:\.\w+)+)(?![\w/])")  # not a schema name (artifactscan.scan/4)


def _texts() -> list[tuple[str, str]]:
    """``(where, text)``: every docstring of the package and every page of docs/."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    out.append((f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 1)}", doc))
    for page in sorted((REPO / "docs").glob("*.md")):
        out.append((str(page.relative_to(REPO)), page.read_text()))
    return out


def _file_exists(name: str) -> bool:
    return (REPO / name).is_file() or (name.split("/")[0] in LAYERS and (PACKAGE / name).is_file())


def _module_file(parts: list[str]) -> Path | None:
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.ImportFrom) and node.module and node.names[0].name == "*":  # a re-export module
            star = _module_file(node.module.split("."))
            names.update(_top_level_names(star) if star else ())
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.If):  # TYPE_CHECKING re-exports of the lazy modules
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    names.update(a.asname or a.name for a in sub.names)
    if "__all__" in names:  # lazily resolved names (core/lazy.py) are listed in __all__
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                try:
                    names.update(ast.literal_eval(node.value))
                except ValueError:
                    pass
    return names


def _dotted_exists(dotted: str) -> bool:
    parts = dotted.rstrip(".").split(".")
    for cut in range(len(parts), 0, -1):
        module = _module_file(parts[:cut])
        if module is not None:
            rest = parts[cut:]
            return not rest or rest[0] in _top_level_names(module)
    return False


def test_every_module_path_named_in_docstrings_and_docs_exists():
    missing = []
    for where, text in _texts():
        for name in FILE_PATH.findall(text):
            if not _file_exists(name):
                missing.append(f"{where}: {name}")
        for dotted in DOTTED.findall(text):
            if not _dotted_exists(dotted):
                missing.append(f"{where}: {dotted}")
    assert not missing, "paths that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_the_check_finds_paths():
    found = {m for _, text in _texts() for m in FILE_PATH.findall(text) + DOTTED.findall(text)}
    assert "core/startup.py" in found and any(d.startswith("artifactscan.analysis.") for d in found)
    assert not _dotted_exists("artifactscan.html_report") and not _file_exists("models/no_such_module.py")
