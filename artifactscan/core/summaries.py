"""The vocabulary every result shares: which model (:class:`ModelSummary`), which images (:class:`ImageSummary`),
and the common header (:class:`AnalysisResult`) that each result writes first in its JSON.

Every result of every command starts with the same five keys — ``schema`` (``artifactscan.KIND/N``),
``artifactscan_version`` (the version that wrote it), ``model`` (a summary; a list of summaries for results over
several models), ``images`` (a summary; ``null`` where no images were read) and ``headline`` (one sentence) — and
:meth:`AnalysisResult.from_dict` checks the schema and reads the older versions (docs/json-schemas.md).

The summaries are built where the things they describe live: ``LoadedModel.summary()`` (models/loading.py) and
``image_summary`` (inputs/sources.py); this module only names them, so every layer above can use them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from artifactscan.core.errors import InputError
from artifactscan.core.paths import display_name, name_hex
from artifactscan.core.results import JsonResult
from artifactscan.core.version import __version__

#: ``artifactscan_version`` of a result read from a file written before the header had one.
UNKNOWN_VERSION = "unknown"


@dataclass(frozen=True)
class SkippedImage:
    """A file left out of a scan, for reports (JSON-friendly strings).

    ``path`` is printable (:func:`artifactscan.core.paths.display_name`: control characters and bytes that are not
    UTF-8 escaped); ``path_hex`` holds the name's exact bytes as hex when they differ from ``path``.
    """

    path: str
    reason: str
    path_hex: str | None = None

    @classmethod
    def of(cls, path: str | os.PathLike[str], reason: str) -> "SkippedImage":
        return cls(display_name(path), reason, name_hex(path))


@dataclass
class ModelSummary:
    """What a result says about the model it measured (built by ``LoadedModel.summary()``)."""

    name: str
    source: str
    arch: str | None
    kind: str
    num_blocks: int
    num_prefix_tokens: int
    num_cls_tokens: int
    num_register_tokens: int
    patch_size: list[int]
    grid_size: list[int]
    input_size: list[int]
    calibration_note: str | None = None
    weights: str | None = None
    layout: str | None = None
    inferred: dict[str, Any] | None = None

    @classmethod
    def named_only(cls, name: str, **known: Any) -> "ModelSummary":
        """The summary of a model an older result file named only by ``name`` (kind ``unknown``; what the file did
        not record is 0 or empty, and ``known`` fills what it did)."""
        fields = dict(name=name, source=name, arch=None, kind="unknown", num_blocks=0, num_prefix_tokens=0,
                      num_cls_tokens=0, num_register_tokens=0, patch_size=[], grid_size=[], input_size=[])
        fields.update(known)
        return cls(**fields)


@dataclass
class ImageSummary:
    """Which images a result measured: where from, how many were found and measured, which were skipped."""

    source: str
    num_found: int
    num_scanned: int
    skipped: list[SkippedImage]
    num_other_files: int = 0  # files in the folder left out because they are not images

    @classmethod
    def described_only(cls, source: str, num_images: int = 0) -> "ImageSummary":
        """The summary of images an older result file described only in words (``num_images`` when it counted
        them, else 0)."""
        return cls(source, num_images, num_images, [])


@dataclass(kw_only=True)
class AnalysisResult(JsonResult):
    """The header every result carries first: ``schema``, ``artifactscan_version``, ``model``, ``images``,
    ``headline``.

    A subclass names its current schema in ``SCHEMA`` and the older ones it still reads in ``OLDER_SCHEMAS``, and
    turns an older version's JSON into the current shape in :meth:`upgrade`. A result built in memory is always of
    the current schema; one read from a file keeps the version that wrote it.
    """

    SCHEMA: ClassVar[str] = ""
    OLDER_SCHEMAS: ClassVar[tuple[str, ...]] = ()

    schema: str = ""
    artifactscan_version: str = __version__
    model: ModelSummary  # results over several models redeclare it as list[ModelSummary]
    images: ImageSummary | None  # None only where no images were read (a phantom's description)
    headline: str

    def __post_init__(self) -> None:
        # The schema describes this class's fields, so an object of this class is of its schema, whatever was read.
        self.schema = type(self).SCHEMA

    @classmethod
    def readable_schemas(cls) -> tuple[str, ...]:
        return (*cls.OLDER_SCHEMAS, cls.SCHEMA)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Read a result back: its schema checked (a one-line :class:`InputError` naming the versions this
        version reads), an older version turned into the current shape first."""
        schema = data.get("schema", cls.SCHEMA)
        if schema not in cls.readable_schemas():
            kind = cls.SCHEMA.split("/")[0].removeprefix("artifactscan.")
            raise InputError(f"a {kind} result of schema {schema!r}; this version of artifactscan ({__version__}) "
                             f"reads {', '.join(cls.readable_schemas())}")
        if schema != cls.SCHEMA:
            data = cls.upgrade(dict(data), schema)
            data.setdefault("artifactscan_version", UNKNOWN_VERSION)
        return super().from_dict(data)

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: str) -> dict[str, Any]:
        """An older version's JSON (``schema`` one of ``OLDER_SCHEMAS``) in the current shape."""
        return data


def schema_version(schema: str) -> int:
    """``"artifactscan.scan/4"`` -> 4."""
    return int(schema.rsplit("/", 1)[1])


def header_fields() -> tuple[str, ...]:
    """The header's keys, in the order every result writes them first."""
    return tuple(f.name for f in dataclasses.fields(AnalysisResult))


@dataclass(kw_only=True)
class MultiModelResult(AnalysisResult):
    """A result over several models (compare, emergence, train-reg's verdict, discover, calibrate): ``model`` is a
    list of summaries, one per model, in the result's own order."""

    model: list[ModelSummary]  # type: ignore[assignment]
