"""Helpers of the fault-injection suite (tests/test_faults*.py): run a command, check the exit code, the one-line
message, the absence of a traceback, and what the output folder holds afterwards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from typer.testing import CliRunner

from artifactscan.cli import app

from .conftest import TINY, TINY_DATA_CONFIG, tiny_vit

runner = CliRunner()
ARGS = ["--arch", "vit_small_patch16_224", "--arch-kwargs", json.dumps(TINY)]
LABELS = ("error:", "internal error:", "gate failed:", "interrupted")


def invoke(*args):
    return runner.invoke(app, [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args])


def check(result, code: int, match: str | None = None, label: str | None = None) -> str:
    """Exit ``code``; no traceback anywhere; exactly one final message line on stderr (warnings may precede it).

    Returns that line.
    """
    assert result.exit_code == code, (result.exit_code, result.output, repr(result.exception))
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"unexpected exception {result.exception!r}")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    if code == 0:
        assert not any(ln.startswith(LABELS) for ln in lines), result.stderr
        return ""
    assert lines, "no message on stderr"
    last = lines[-1]
    assert sum(ln.startswith(LABELS) for ln in lines) == 1, result.stderr  # one message, not a spill-over
    expected = label or {1: "error:", 2: "internal error:", 3: "gate failed:", 130: "interrupted"}[code]
    assert last.startswith(expected), result.stderr
    assert all(ln.startswith(("warning:",) + LABELS) for ln in lines), result.stderr  # one line each
    if match is not None:
        assert match.lower() in last.lower(), last
    return last


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes: the state to compare before and after."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_partial_files(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if p.name.endswith((".partial", ".tmp"))] if folder.exists() else []
    assert not left, left


def manifest(folder: Path) -> dict:
    return json.loads((folder / ".artifactscan-manifest.json").read_text())


def save_tiny(path: Path, mutate=None, meta_overrides: dict | None = None, data_config=None) -> Path:
    """A self-describing checkpoint of the tiny ViT; ``mutate(model)`` edits its weights first."""
    from artifactscan.models.checkpoint import CheckpointMeta, save_checkpoint

    model = tiny_vit()
    if mutate is not None:
        with torch.no_grad():
            mutate(model)
    meta = CheckpointMeta("vit_small_patch16_224", dict(TINY), dict(data_config or TINY_DATA_CONFIG))
    for k, v in (meta_overrides or {}).items():
        setattr(meta, k, v)
    return save_checkpoint(path, model.state_dict(), meta)


def planted(model) -> None:
    """High-norm patches at 6 grid positions: the scan flags them (onset block 0)."""
    for p in (1, 5, 9, 10, 14, 15):
        model.pos_embed[0, 1 + p] += 60.0


def forbid_models(monkeypatch) -> None:
    """Any model load from now on is a test failure: proves a check ran before the work."""
    import artifactscan.analysis.opening as opening_mod  # every pass runner loads its model here, beside its images
    import artifactscan.analysis.compare as compare_mod
    import artifactscan.analysis.discover as discover_mod
    import artifactscan.analysis.emergence as emergence_mod

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the output path was validated")

    for mod in (opening_mod, compare_mod, discover_mod, emergence_mod):
        monkeypatch.setattr(mod, "load_model", boom)
