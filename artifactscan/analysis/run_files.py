"""The files train-reg writes into a run folder whose names changed in 0.3, and their old names.

Both kinds of file live in the same run folder, so a new name never reuses an old one: ``comparison.json`` held the
trained variants (now ``variants.json``) while ``verdict.json`` held the comparison of those variants on held-out
images (now ``held_out_comparison.json``). The old names are still written, with the same content, for one version;
readers look for the new name first.
"""

from __future__ import annotations

from pathlib import Path

VARIANTS_FILE = "variants.json"  # the trained variants: config, one entry per register count, step-time ratios
HELD_OUT_COMPARISON_FILE = "held_out_comparison.json"  # the variants scanned side by side, with the verdict

# new name -> the name it had before 0.3 (written too, for one version)
OLD_NAMES = {VARIANTS_FILE: "comparison.json", HELD_OUT_COMPARISON_FILE: "verdict.json"}


def existing_run_file(folder: Path, name: str) -> Path:
    """``folder/name``, or the same file under its old name when only that exists (a run written before 0.3)."""
    path = folder / name
    old = folder / OLD_NAMES.get(name, name)
    return old if not path.exists() and old.exists() else path


def shadowed_by_new_name(path: Path) -> bool:
    """Whether ``path`` is an old-named copy of a file whose new name sits beside it (read that one instead)."""
    return any(path.name == old and (path.parent / new).exists() for new, old in OLD_NAMES.items())
