"""Layer 6, the ``artifactscan`` command line: a thin Typer layer over the library (entry point ``main``).

:mod:`artifactscan.cli.app` holds the app, the shared options and the core commands; the other modules here define
more commands on the same app and are imported below so that every command is registered.
"""

from artifactscan.cli.app import app, main
from artifactscan.cli import attention, calibrate, discover, fix, monitor, phantom, probe, report, signatures  # noqa: F401,E402  (their commands register on `app`)

__all__ = ["app", "main"]
