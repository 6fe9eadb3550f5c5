"""stdout and stderr as the command line writes them: a reader that goes away, a full or a closed stdout.

Python ignores SIGPIPE, so a write to a pipe whose reader has gone (``artifactscan norms | head -1``) raises
``BrokenPipeError``; a write to ``> /dev/full`` raises ENOSPC, and a stdout closed before the start (``>&-``) is
``None``. :class:`GuardedStream` stands in for the stream while a command runs: the first failure is recorded and
later writes go nowhere, so the work itself is never interrupted by its printing (the ``--out`` files are written
and the output folder closes complete); when the command ends, :meth:`GuardedStream.check` turns the failure into
its exit:

* the reader went away (EPIPE): :class:`ReaderGone`, exit :data:`EXIT_READER_GONE` (141 = 128 + SIGPIPE, what a
  shell reports for a Unix tool that SIGPIPE stopped), with no message - as ``yes | head -1`` ends;
* anything else (a full disk, a closed stdout): :class:`FileSystemError`, one error line, exit 1.

Once a write has failed, the stream's descriptor is pointed at ``/dev/null``, so that the interpreter's own flush at
exit finds nothing left to fail ("Exception ignored ... BrokenPipeError" would follow the command otherwise).
stderr gets the same stand-in, minus the exit: a warning that cannot be shown is no reason to fail a command.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Any, Callable, Iterator

from artifactscan.core.errors import ArtifactScanError, FileSystemError

EXIT_READER_GONE = 141


class ReaderGone(Exception):
    """stdout's reader went away (EPIPE): the command ends quietly with :data:`EXIT_READER_GONE`."""


class GuardedStream:
    """A text stream that records its first write failure instead of raising it (see the module's docstring)."""

    def __init__(self, stream: Any, name: str):
        self.stream = stream  # None: closed before the process started (``>&-``)
        self.name = name
        self.failure: OSError | None = None

    def write(self, text: str) -> int:
        if self.failure is None:
            try:
                if self.stream is None:
                    raise OSError(errno.EBADF, "closed before the start")
                return self.stream.write(text)
            except OSError as exc:
                self._failed(exc)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.failure is None and self.stream is not None:
            try:
                self.stream.flush()
            except OSError as exc:
                self._failed(exc)

    def isatty(self) -> bool:
        try:
            return self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, errors ...: the stream's own
        if self.stream is None:
            raise AttributeError(name)
        return getattr(self.stream, name)

    def _failed(self, exc: OSError) -> None:
        self.failure = exc
        with contextlib.suppress(Exception):  # a stream without a descriptor (a test's buffer) has nothing to keep
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self.stream.fileno())
            finally:
                os.close(null)

    def check(self) -> None:
        """Flush; then raise what the first failure means: :class:`ReaderGone` or :class:`FileSystemError`."""
        self.flush()
        exc = self.failure
        if exc is None or self.name != "stdout":
            return
        if exc.errno == errno.EPIPE:
            raise ReaderGone()
        if exc.errno == errno.EBADF:
            raise FileSystemError("cannot write the results to", "stdout", OSError(errno.EBADF, "it is closed"),
                                  "redirect it to /dev/null to discard them") from exc
        raise FileSystemError("cannot write the results to", "stdout", exc) from exc


@contextlib.contextmanager
def guarded_streams() -> Iterator[GuardedStream]:
    """``sys.stdout`` and ``sys.stderr`` guarded for the duration (re-entrant: an outer guard is reused); yields
    the stdout guard."""
    out, err = sys.stdout, sys.stderr
    if isinstance(out, GuardedStream):
        yield out
        return
    sys.stdout, sys.stderr = GuardedStream(out, "stdout"), GuardedStream(err, "stderr")
    try:
        yield sys.stdout  # type: ignore[misc]
    finally:
        sys.stdout, sys.stderr = out, err


def reserve_closed_descriptors() -> None:
    """Point a descriptor 0-2 that was closed before the start at ``/dev/null``, so that no file artifactscan opens
    later gets that number (a library writing to "stdout" would write into it). ``sys.stdout`` stays ``None``."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def final_exit_code(out: GuardedStream, code: Any, show_error: Callable[[ArtifactScanError], None]) -> Any:
    """The process's exit code once a command ended with ``code``: a command that failed has said so already;
    otherwise a failing stdout decides - :data:`EXIT_READER_GONE` for a reader that went away, 1 (after
    ``show_error`` prints the error line) for anything else."""
    if code not in (None, 0):
        return code
    try:
        out.check()
    except ReaderGone:
        return EXIT_READER_GONE
    except ArtifactScanError as exc:
        show_error(exc)
        return 1
    return code


def forget_caught_interrupts() -> None:
    """Keep the exit code the command chose (130 after a Ctrl-C it handled) from being replaced by death by SIGINT.

    CPython (since 3.8) marks a process-wide "unhandled KeyboardInterrupt" flag whenever a
    KeyboardInterrupt leaves code run by ``exec()`` of a *string*, even when a caller catches it; ``python -m`` reads
    the flag after shutdown and then kills itself with SIGINT (exit -2 / 130 in a shell, whatever ``sys.exit`` said).
    Such an ``exec`` runs at many a lazy import: every ``@dataclass`` builds its methods that way (a Ctrl-C during
    ``import rich.table`` does it). Each ``exec`` of a string clears the flag before it runs, so one that completes
    forgets the caught ones; a KeyboardInterrupt that really leaves ``main`` still sets it again after this."""
    exec("None")  # noqa: S102 - a constant: its only effect is resetting the interpreter's flag
