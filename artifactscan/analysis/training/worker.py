"""``python -m artifactscan.analysis.training``: the internal worker process that ``train_reg`` launches per variant.

Users train with ``artifactscan train-reg`` (or ``torchrun -m artifactscan train-reg``); one CLI, one set of flags."""

from __future__ import annotations

import contextlib
import sys
from typing import Sequence

from artifactscan.analysis.training.orchestration import worker_main
from artifactscan.core.errors import cli_spelling


def main(argv: Sequence[str] | None = None) -> int:
    """Internal entry point of the side-by-side worker processes (``python -m artifactscan.analysis.training --_worker``).

    Users train with ``artifactscan train-reg`` (or ``torchrun -m artifactscan train-reg``); one CLI, one set of flags.
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m artifactscan.analysis.training",
                                description="internal worker of `artifactscan train-reg`; run that command instead")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_cli-spelling", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a, _ = p.parse_known_args(argv)
    if not a._worker or not a.out:
        print("error: train with `artifactscan train-reg` (python -m artifactscan.analysis.training is its internal worker)",
              file=sys.stderr)
        return 2
    with cli_spelling() if a._cli_spelling else contextlib.nullcontext():
        return worker_main(a._worker, a.out, a._resume)
