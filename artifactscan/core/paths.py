"""File-system names and kinds: names printed safely, what a path is in words, and reading only regular files.

* :func:`display_name` / :func:`name_hex` turn a file-system name (which on Linux may hold newlines, rich markup or
  bytes that are not UTF-8) into one readable, printable line, plus the exact bytes as hex where they differ. Every
  name that goes into a message goes through :func:`display_name`: a newline in a name prints as ``\\n``.
* :func:`path_kind` / :func:`what_it_is` say what a path is when it is not the file a command wanted: a named pipe,
  a socket, a device, a symlink loop - not "does not exist" for something that exists.
* :func:`open_regular` / :func:`read_regular_bytes` / :func:`read_regular_text` open a path only if it is a regular
  file. A named pipe (FIFO) blocks whoever opens it for reading until a writer comes, so an input that is one would
  hang the command; it is opened without blocking, checked and refused instead (:class:`NotAFileError`).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from artifactscan.core.errors import NotAFileError


# ----------------------------------------------------------------------------------------------- names
def display_name(name: str | os.PathLike[str]) -> str:
    """``name`` as one printable line: non-UTF-8 bytes as ``\\xNN``, control characters escaped (``\\n``).

    Rich markup needs no escaping here (callers print with markup off); this only guarantees one readable line.
    """
    text = os.fspath(name)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif not ch.isprintable() or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def name_hex(name: str | os.PathLike[str]) -> str | None:
    """The exact bytes of a file-system name as hex, or ``None`` when :func:`display_name` already is the name."""
    text = os.fspath(name)
    raw = text if isinstance(text, bytes) else os.fsencode(text)
    return None if display_name(text) == os.fsdecode(raw) else raw.hex()


def name_from_hex(hex_bytes: str) -> str:
    """Inverse of :func:`name_hex`: the name as Python's file functions take it."""
    return os.fsdecode(bytes.fromhex(hex_bytes))


# ----------------------------------------------------------------------------------------------- kinds
_KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def path_kind(path: str | os.PathLike[str]) -> str:
    """What ``path`` is (after symlinks), in words: ``a file``, ``a folder``, ``a named pipe (FIFO)``, ``a socket``,
    ``a character device``, ``a block device``, ``a symlink loop``, ``a broken symlink`` or ``missing``."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        if os.path.islink(path):
            return "a broken symlink"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "missing"
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    return next((words for test, words in _KINDS if test(mode)), "a special file")


def what_it_is(path: str | os.PathLike[str], wanted: str = "a regular file") -> str | None:
    """``None`` when ``path`` is a regular file (after symlinks); otherwise what it is instead, as the rest of a
    sentence that starts with the name: ``does not exist``, ``is a symlink loop``, ``is a named pipe (FIFO), not
    a regular file`` (``wanted`` names what the caller needed)."""
    kind = path_kind(path)
    if kind == "a file":
        return None
    if kind == "missing":
        return "does not exist"
    if kind in ("a symlink loop", "a broken symlink") or kind.startswith("unreadable"):
        return f"is {kind}"
    return f"is {kind}, not {wanted}"


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for reading in binary if it is a regular file; raise :class:`NotAFileError` for anything else.

    Opened without blocking (a FIFO opens at once instead of waiting for a writer), checked with ``fstat`` on the
    open file (no gap between the check and the use), then switched back to blocking reads.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((words for test, words in _KINDS if test(mode)), "a special file")
            raise NotAFileError(f"{display_name(path)} is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a regular file (:func:`open_regular`: never blocks on a FIFO)."""
    with open_regular(path) as f:
        return f.read()


def read_regular_text(path: str | os.PathLike[str], encoding: str = "utf-8") -> str:
    """The text of a regular file (:func:`open_regular`: never blocks on a FIFO)."""
    return read_regular_bytes(path).decode(encoding)
