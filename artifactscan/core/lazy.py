"""Module attributes resolved on first use (PEP 562), for the package and its documented re-export modules.

Why: ``import artifactscan`` used to import timm, torchvision and with them ``torch._dynamo`` (~1.6 s of a ~3 s
process) before the command line had parsed its arguments; resolving the public names lazily lets the command line
choose when that happens (core/startup.py) and keeps ``import artifactscan`` as cheap as ``import torch``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(module_name: str, namespace: dict[str, Any],
                    sources: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for module ``module_name`` whose name ``n`` lives in module ``sources[n]``.

    A resolved name is stored in ``namespace`` (the module's globals), so each is imported once and later lookups
    are plain attribute reads."""

    def __getattr__(name: str) -> Any:
        source = sources.get(name)
        if source is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(sources))

    return __getattr__, __dir__
