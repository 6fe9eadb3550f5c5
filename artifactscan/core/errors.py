"""Exceptions raised by the library.

Library code raises these and never exits the process; only the CLI turns them into one red line and a
non-zero exit code (``--debug`` shows the traceback). Each message says what went wrong *and* what to do.

Exit codes (docs/reliability.md): 0 done; 1 a user error (every class here unless it says otherwise); 2 an internal
error (any other exception: a bug); 3 a gate failed (:class:`GateFailedError`); 130 interrupted
(:class:`RunInterrupted`).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any


class ArtifactScanError(Exception):
    """Base class: an expected failure caused by the user's input or environment."""

    exit_code = 1


class InputError(ArtifactScanError):
    """A path, image folder or option value that cannot be used."""


class ModelLoadError(ArtifactScanError):
    """A model name, checkpoint or architecture that cannot be turned into a ViT."""


class NotAViTError(ModelLoadError):
    """The model loaded but has no transformer blocks / prefix tokens artifactscan can hook."""


class CheckpointMismatchError(ModelLoadError):
    """A state dict whose keys or shapes do not match the requested architecture."""


class UntrustedCheckpointError(ModelLoadError):
    """A pickled module that would need arbitrary code execution to load."""


class OfflineError(ModelLoadError):
    """Pretrained weights were requested but the hub cannot be reached."""


class TrainingError(ArtifactScanError):
    """A training configuration or resume folder that cannot be used."""


class OutputLockedError(InputError):
    """An output folder another artifactscan run is writing to (its lock is held)."""


class NonFiniteError(ArtifactScanError):
    """NaN or Inf weights, or non-finite token norms: the numbers would be meaningless (``--allow-nonfinite``)."""


class CheckpointMetadataError(ModelLoadError):
    """A checkpoint whose artifactscan metadata is malformed: ``checkpoint metadata invalid: <field>: <why>``."""

    def __init__(self, field: str, why: str, where: str = ""):
        self.field, self.why = field, why
        super().__init__(f"{where + ': ' if where else ''}checkpoint metadata invalid: {field}: {why}")


class ResourceError(ArtifactScanError):
    """A run that would not fit (e.g. the activation memory of one batch exceeds the memory available)."""


class GateFailedError(ArtifactScanError):
    """A quality gate the user asked for failed (``norms --fail-above``): exit code 3, not a user error."""

    exit_code = 3


class RunInterrupted(ArtifactScanError):
    """The run was stopped (SIGINT / SIGTERM) after saving what can be resumed: exit code 130."""

    exit_code = 130


# ------------------------------------------------------------------------------------ options, as the caller spells them
# A message names the option the caller set: a Python caller of ``fix(top_k=0)`` reads "top_k must be at least 1",
# the CLI user who typed ``--top-k 0`` reads "--top-k must be at least 1". The CLI switches the spelling for the
# duration of a command (cli/app.py); a context variable, so a library call next to it (a notebook, a test) keeps
# the Python names, and forked decoding workers inherit the command's.
_cli_spelling: ContextVar[bool] = ContextVar("artifactscan_cli_spelling", default=False)

# The parameters whose CLI flag is not the mechanical ``--`` + the name with dashes (``top_k`` -> ``--top-k``):
# the one place a renamed flag is retargeted.
FLAG_OF_PARAMETER: dict[str, str] = {
    "num_maps": "--maps",  # scan
    "keep": "--maps",  # discover (0.2: --figure-images)
    "num_images": "--images",  # calibrate
    "gain_over_median": "--gain",  # phantom --build
    "num_workers": "--workers",
    "embed_dim": "--dim", "num_heads": "--heads", "patch_size": "--patch",  # train-reg's config fields
    "class_token": "--no-cls", "global_pool": "--no-cls",
    "baseline_checkpoint": "--baseline", "out_dir": "--out",  # train-reg
}

_NO_VALUE = object()


def option(parameter: str, value: Any = _NO_VALUE, shell_value: Any = _NO_VALUE) -> str:
    """An option named as the caller spells it: ``top_k`` (Python) or ``--top-k`` (the CLI); with a value,
    ``top_k=0`` or ``--top-k 0``, and a switch turned on (``value=True``) ``trust_checkpoint=True`` or
    ``--trust-checkpoint``. ``value`` is written with ``str``: pass ``repr(x)`` where quotes should show;
    ``shell_value`` is the value as typed in a shell where it differs (quoted JSON)."""
    if _cli_spelling.get():
        value = value if shell_value is _NO_VALUE else shell_value
        name = FLAG_OF_PARAMETER.get(parameter, "--" + parameter.replace("_", "-"))
        return name if value is _NO_VALUE or value is True else f"{name} {value}"
    return parameter if value is _NO_VALUE else f"{parameter}={value}"


def uses_cli_spelling() -> bool:
    """Whether messages now name options by their CLI flags (a worker process is told to do the same)."""
    return _cli_spelling.get()


@contextmanager
def cli_spelling() -> Iterator[None]:
    """Messages raised inside name options by their CLI flags (:func:`option`); the CLI wraps each command in it."""
    token = _cli_spelling.set(True)
    try:
        yield
    finally:
        _cli_spelling.reset(token)


# ----------------------------------------------------------------------------------------------- the OS refusing
# The kinds of OSError that describe the machine rather than a bug: (what happened, what to do; {parameter} is an
# option, named as the caller spells it). An OSError of one
# of these kinds is a user/environment error wherever it is raised (exit 1, one line naming the path); any other
# OSError (EBADF, EINVAL, ... on a descriptor artifactscan opened itself) still reads as a bug.
_OS_PROBLEMS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere"),
    errno.EFBIG: ("file too large for this file system or for the file-size limit (ulimit -f)",
                  "write elsewhere or raise the limit"),
    errno.EROFS: ("read-only file system", "choose a writable place"),
    errno.EACCES: ("permission denied", "check the permissions or choose another place"),
    errno.EPERM: ("operation not permitted", "check the permissions or choose another place"),
    errno.EIO: ("input/output error", "the disk or network mount is failing; check it"),
    errno.ENOENT: ("no such file or folder (it was removed or renamed meanwhile?)", "check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("is a folder, not a file", "pass a file"),
    errno.ELOOP: ("a symlink loop", "fix the symlink"),
    errno.ENAMETOOLONG: ("name too long for this file system", "choose a shorter path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer {num_workers}"),
    errno.ENFILE: ("too many open files on this system", "close some programs or use fewer {num_workers}"),
    errno.ENOMEM: ("out of memory", "use a smaller {batch_size} or free memory"),
    errno.ENXIO: ("no such device", "check the path"),
    errno.ENODEV: ("no such device", "check the path"),
    errno.ETXTBSY: ("the file is busy", "try again when the program using it has finished"),
    errno.EAGAIN: ("resource temporarily unavailable", "try again"),
}
for _name, _what in (("EDQUOT", ("disk quota exceeded", "free some space or write elsewhere")),
                     ("ESTALE", ("stale network file handle (the mount changed)", "mount it again"))):
    if hasattr(errno, _name):  # not on every platform
        _OS_PROBLEMS[getattr(errno, _name)] = _what


def is_environment_problem(exc: BaseException) -> bool:
    """An OSError that says something about the machine (a full disk, a read-only file system, no permission ...)."""
    return isinstance(exc, OSError) and exc.errno in _OS_PROBLEMS


def os_problem(exc: OSError) -> str:
    """``exc`` in words with what to do: ``no space left on the device (ENOSPC); free some space or write ...``."""
    what, advice = _OS_PROBLEMS.get(exc.errno, (exc.strerror or type(exc).__name__, ""))  # type: ignore[arg-type]
    code = f" ({errno.errorcode[exc.errno]})" if exc.errno in errno.errorcode else ""
    advice = advice.format(num_workers=option("num_workers"), batch_size=option("batch_size"))
    return f"{what}{code}" + (f"; {advice}" if advice else "")


class FileSystemError(ArtifactScanError):
    """The operating system refused a file operation of artifactscan's own (a full disk, a read-only file system, no
    permission, a closed stdout ...): ``cannot write out/report.json: no space left on the device (ENOSPC); ...``.

    ``errno`` is the refused call's; the original OSError is the ``__cause__``.
    """

    def __init__(self, action: str, shown: str, exc: OSError, advice: str | None = None):
        self.errno = exc.errno
        super().__init__(f"{action} {shown}: {os_problem(exc)}" + (f"; {advice}" if advice else ""))


class NotAFileError(InputError):
    """An input path that exists but is not a regular file (a named pipe, a socket, a device, a folder), refused
    before it is read: reading a named pipe would block the command forever."""
