"""Every import of product code is declared: each ``import X`` in artifactscan/ names the standard library,
artifactscan itself, or a distribution in pyproject's dependencies; an optional extra's package is imported only
where a missing one can be handled (inside a function, or inside ``try: ... except ImportError``)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "artifactscan"


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {_dist_name(r) for r in project["dependencies"]}
    optional = {_dist_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return required, optional - required


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = [handler.type] if not isinstance(handler.type, ast.Tuple) else handler.type.elts
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception") for n in names)


def _guarded_by_import_error(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body and any(map(_catches_import_error, parent.handlers)):
            return True
        node = parent
    return False


def _fallback(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside an ``except ImportError:`` handler: the older spelling of a declared package (cli/app.py takes
    ``click`` itself where an older Typer does not vendor it, and then Typer depends on it)."""
    return any(isinstance(p, ast.ExceptHandler) and _catches_import_error(p) for p in _ancestors(node, parents))


def _top_level_imports() -> list[tuple[str, str, bool, bool]]:
    """``(file, top-level module, at module level, guarded by except ImportError)`` for every absolute import."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            lazy = any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)) for p in _ancestors(node, parents))
            type_only = any(isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test)
                            for p in _ancestors(node, parents))
            if _fallback(node, parents):
                continue
            for name in names:
                found.append((str(path.relative_to(REPO)), name.split(".")[0], not (lazy or type_only),
                              _guarded_by_import_error(node, parents)))
    return found


def _ancestors(node: ast.AST, parents: dict[ast.AST, ast.AST]):
    while node in parents:
        node = parents[node]
        yield node


def test_every_import_of_product_code_is_declared():
    required, optional = _declared()
    distributions = {k: {d.lower().replace("_", "-") for d in v} for k, v in packages_distributions().items()}
    undeclared, unguarded = [], []
    for path, module, module_level, guarded in _top_level_imports():
        if module in sys.stdlib_module_names or module in ("artifactscan", "__future__"):
            continue
        dists = distributions.get(module, {module.lower().replace("_", "-")})
        if dists & required:
            continue
        if dists & optional:
            if module_level and not guarded:
                unguarded.append(f"{path}: {module} (an optional extra, imported unconditionally)")
            continue
        undeclared.append(f"{path}: {module} (from {', '.join(sorted(dists))})")
    assert not undeclared, "imports not declared in pyproject's dependencies:\n" + "\n".join(undeclared)
    assert not unguarded, "\n".join(unguarded)


def test_the_check_sees_imports_at_all():
    """The scan above reads real imports: torch at module level, scipy inside a function (analysis/lost.py)."""
    imports = _top_level_imports()
    assert ("artifactscan/analysis/scan.py", "torch", True, False) in imports
    assert any(p == "artifactscan/analysis/lost.py" and m == "scipy" and not level for p, m, level, _ in imports)
    required, _ = _declared()
    assert {"torch", "scipy", "scikit-learn"} <= required
