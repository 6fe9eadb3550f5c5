"""The progress bar every measurement shows on stderr while it iterates over images (or nothing).

The device is resolved in :mod:`artifactscan.core.devices`, torchrun's ranks in :mod:`artifactscan.core.distributed`.
"""

from __future__ import annotations


class ProgressBar:
    """A rich progress bar on stderr (so ``--json`` stdout stays clean), or nothing."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("img"), TimeRemainingColumn(), console=Console(stderr=True),
                                transient=True)
            self.task = self.bar.add_task(label, total=total)

    def __enter__(self) -> "ProgressBar":
        if self.bar:
            self.bar.__enter__()
        return self

    def advance(self, n: int) -> None:
        if self.bar:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.__exit__(*exc)
