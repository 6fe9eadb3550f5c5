"""The JSON side of every result: typed dataclasses <-> plain JSON values, and atomic file writes.

Every result type (``ScanReport``, ``ProbeReport``, ``FixReport`` ...) inherits :class:`JsonResult`, so they all
serialise the same way: non-finite floats become ``null`` and read back as ``nan``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from artifactscan.core.html import result_html


def old_key_names(cls: Any) -> dict[str, str]:
    """A dataclass's renamed fields: ``{new name: old JSON key}``, from its ``RENAMED_KEYS`` class variable.

    A renamed field is written under both keys for one version (readers of the old key keep working) and read from
    either (files written before the rename)."""
    return getattr(cls, "RENAMED_KEYS", {})


def to_jsonable(obj: Any) -> Any:
    """Dataclasses -> dicts, recursively; non-finite floats -> None (JSON has no NaN)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        old_keys = old_key_names(type(obj))
        out = {}
        for f in dataclasses.fields(obj):
            out[f.name] = to_jsonable(getattr(obj, f.name))
            if f.name in old_keys:
                out[old_keys[f.name]] = out[f.name]
        return out
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_jsonable(cls: Any, data: Any) -> Any:
    """Inverse of :func:`to_jsonable` for the typed result dataclasses (uses their type hints)."""
    if data is None:
        return math.nan if cls is float else None  # to_jsonable wrote a non-finite float as null
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(cls) if a is not type(None)]
        return from_jsonable(options[0], data) if len(options) == 1 else data
    if origin is list:
        (item,) = typing.get_args(cls) or (Any,)
        return [from_jsonable(item, v) for v in data]
    if origin is dict:
        _, val = typing.get_args(cls) or (Any, Any)
        return {k: from_jsonable(val, v) for k, v in data.items()}
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        renamed = {old: new for new, old in old_key_names(cls).items() if old in data and new not in data}
        data = {renamed.get(k, k): v for k, v in data.items()}
        return cls(**{k: from_jsonable(hints[k], v) for k, v in data.items() if k in names})
    return data


class JsonResult:
    """Mixin for the typed result dataclasses: ``to_dict`` / ``to_json`` / ``from_dict`` round-trip."""

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        return from_jsonable(cls, data)

    def _repr_html_(self) -> str:
        """Jupyter shows the result as its headline and an HTML table (:mod:`artifactscan.core.html`)."""
        return result_html(self)


# Atomic writes live in core/files.py (with the output-folder manifest); kept here under the documented name.
from artifactscan.core.files import atomic_write_text  # noqa: E402,F401
