"""Output files that are never half-written, folders that hold one run's outputs, and names printed safely.

* :func:`atomic_write_text` / :func:`atomic_write_bytes` / :func:`atomic_path` write to a temporary name in the
  target's folder and rename it over the target, so a killed or failing run never leaves a truncated file. Every
  output gets the same mode, the one any new file gets (``0o666 & ~umask``: 0644 under the usual umask).
* :class:`OutputFolder` makes an ``--out`` folder belong to one run: it is validated and locked (``fcntl.flock``,
  released by the OS when the process dies) before any model runs, and it keeps a manifest of the files the run wrote.
  When the next run starts writing, it removes exactly the files the previous manifest lists, and nothing else.
* :func:`check_output_file` validates a single-file output (``fix --out``, ``report -o``) before any work starts.
* :func:`display_name` / :func:`name_hex` (from :mod:`artifactscan.core.paths`, kept importable here) turn a
  file-system name into one readable, printable line, plus the exact bytes as hex where they differ.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from artifactscan.core.errors import FileSystemError, InputError, OutputLockedError, is_environment_problem
from artifactscan.core.paths import (  # noqa: F401  (display_name and the hex pair: documented here too)
    display_name, name_from_hex, name_hex, read_regular_text, what_it_is)

MANIFEST_NAME = ".artifactscan-manifest.json"
LOCK_NAME = ".artifactscan.lock"
MANIFEST_SCHEMA = "artifactscan.manifest/1"
TEMP_SUFFIX = ".partial"
# Temporaries are ``.<name>.<random>.partial`` (mkstemp's random part: 8 characters of [a-z0-9_]).
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.partial$")

_active: contextvars.ContextVar["OutputFolder | None"] = contextvars.ContextVar("artifactscan_output", default=None)


def file_mode() -> int:
    """The mode a newly created file gets here (``0o666`` less the umask), for every output alike."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# ----------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def refusals_named(action: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """An OSError that says something about the machine (a full disk, a read-only file system ...) raised inside
    becomes a :class:`FileSystemError` naming ``path`` - the output's own name, not the temporary that was being
    written, and also for a failed ``write``, whose OSError names no file at all."""
    try:
        yield
    except OSError as exc:
        if not is_environment_problem(exc):
            raise
        raise FileSystemError(action, display_name(path), exc) from exc


def _temp_in(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """:func:`atomic_path_unnamed`, and a full disk (or any refusal of the machine's) while the caller's writer
    writes is a :class:`FileSystemError` naming ``path``."""
    with refusals_named("cannot write", path), atomic_path_unnamed(path) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_path_unnamed(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; on success it is renamed onto ``path``, on failure removed.

    For writers that want a file name (``savefig``, ``torch.save``, safetensors). The file is listed in the active
    :class:`OutputFolder`'s manifest before the rename, so a crash can never leave an output the next run misses.
    """
    path = Path(path)
    folder = _active.get()
    if folder is not None and folder.relative_name(path) is not None:
        folder.begin()  # the first output of a run clears the previous run's (before our temporary exists)
    tmp = _temp_in(path)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # mkstemp creates 0600; outputs are meant to be shared like any other file
        if folder is not None:
            folder.record(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically. ``text`` must be encodable (escape file names with :func:`display_name`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries (``.<name>.<random>.partial``) a killed writer left in ``folder``; return them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if _TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


# ----------------------------------------------------------------------------------------------- validation
def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a temporary file in ``folder``: the only test that catches read-only mounts and /proc."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".artifactscan-probe.", suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise InputError(f"cannot write {what} into {display_name(folder)}: {_why(exc)}; choose another path") from None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def check_output_file(path: str | os.PathLike[str], flag: str = "--out", suffixes: tuple[str, ...] = ()) -> Path:
    """Validate a single output file before any work: not a folder, a known suffix, a writable folder.

    Creates nothing that stays (the parent folders are created by the write itself).
    """
    p = Path(path).expanduser()
    shown = display_name(p)
    if p.is_dir():
        example = display_name(p / ("out" + (suffixes[0] if suffixes else "")))
        raise InputError(f"{flag} {shown} is a folder; pass a file name such as {example}")
    if suffixes and p.suffix.lower() not in suffixes:
        raise InputError(f"{flag} {shown}: the file name must end in {' or '.join(suffixes)}")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise InputError(f"{flag} {shown}: {display_name(base)} is a file, not a folder; choose another path")
    if base == p.parent:
        _probe_writable(base, f"{flag} {shown}")
        return p
    missing = [a for a in reversed(p.parent.parents) if not os.path.lexists(a)] + [p.parent]
    made: list[Path] = []
    try:  # the only sure test: create the missing folders (then remove them again; the write recreates them)
        for folder in missing:
            folder.mkdir()
            made.append(folder)
        _probe_writable(p.parent, f"{flag} {shown}")
    except OSError as exc:
        raise InputError(f"cannot create the folder for {flag} {shown}: {_why(exc)}; choose another path") from None
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return p


# ----------------------------------------------------------------------------------------------- the folder
class OutputFolder:
    """An ``--out`` folder owned by one run: validated, locked, and cleaned of the previous run's files only.

    Use as a context manager around the whole command (validation and the lock come first, before any model runs)::

        with OutputFolder(out, "norms"):
            report = scan(...)                # a second run into the same folder fails now, with a clear line
            write_scan_outputs(report, out)   # the first write removes the files the previous manifest lists;
                                              # every atomic write inside is recorded in the new manifest
        # on success the manifest is marked complete; on failure nothing of this run is left half-written, and
        # if it failed before writing anything, the previous run's outputs are still there, untouched

    Only names that the previous manifest lists (relative paths inside the folder) are ever removed; a user's own
    files in the folder are never touched.
    """

    def __init__(self, path: str | os.PathLike[str], command: str, flag: str = "--out", manifest: bool = True,
                 add_to_previous: bool = False):
        self.path = Path(path).expanduser()
        self.command = command
        self.flag = flag
        self.manifest = manifest  # False: validate and lock only (a train-reg run folder manages its own files)
        # True: this run's files join the previous run's (``report`` writing report.html into a scan's folder: the
        # page is derived from that run, so the next run into the folder removes it with the rest)
        self.add_to_previous = add_to_previous
        self.files: list[str] = []
        self._lock_fd: int | None = None
        self._created: list[Path] = []
        self._began = False
        self._token: contextvars.Token | None = None

    # -------------------------------------------------------------- validation and the lock
    def open(self) -> "OutputFolder":
        p, shown = self.path, display_name(self.path)
        if p.exists() and not p.is_dir():
            raise InputError(f"{self.flag} {shown} exists and is not a folder; pass a folder (it is created if missing)")
        base = _nearest_existing(p)
        if base != p and not base.is_dir():
            raise InputError(f"{self.flag} {shown}: {display_name(base)} is a file, not a folder; choose another path")
        missing = [a for a in (p, *p.parents) if not os.path.lexists(a)]
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create output folder {shown}: {_why(exc)}; choose another {self.flag}") from None
        self._created = sorted(missing, key=lambda a: len(a.parts), reverse=True)
        try:
            why = what_it_is(self.manifest_path, "a manifest file")
            if why is not None and why != "does not exist":  # a folder, a FIFO there: refuse now, not after the work
                raise InputError(f"{self.flag} {shown}: its {MANIFEST_NAME} {why}; remove it or choose another "
                                 f"{self.flag}")
            _probe_writable(p, f"{self.flag} outputs")
            self._lock()
        except BaseException:
            self._remove_created()
            raise
        if self.manifest:
            self._token = _active.set(self)
        return self

    def _lock(self) -> None:
        import fcntl

        lock = self.path / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as exc:
            raise InputError(f"cannot lock output folder {display_name(self.path)}: {_why(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 64, 0).decode().strip()
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputLockedError(
                    f"{self.flag} {display_name(self.path)} is in use by another artifactscan run"
                    + (f" (pid {holder})" if holder else "")
                    + "; wait for it to finish or choose another folder") from None
            raise InputError(f"cannot lock output folder {display_name(self.path)}: {_why(exc)}") from None
        try:
            with refusals_named("cannot write", lock):  # a full disk can take even these few bytes
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing releases the flock (as does the process dying)
            self._lock_fd = None

    def _remove_created(self) -> None:
        """Undo folders this run created, if nothing but our own lock file is in them."""
        for folder in self._created:
            with contextlib.suppress(OSError):
                (folder / LOCK_NAME).unlink(missing_ok=True)
                folder.rmdir()

    # -------------------------------------------------------------- the manifest
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def previous_files(self) -> list[str]:
        """Relative names the previous run's manifest lists (only names inside this folder; never ``..``)."""
        try:
            data = json.loads(read_regular_text(self.manifest_path))  # never blocks on a FIFO of that name
        except (OSError, ValueError, InputError):
            return []
        names = data.get("files", []) if isinstance(data, dict) else []
        safe = []
        for name in names:
            if not isinstance(name, str) or not name or os.path.isabs(name):
                continue
            parts = Path(name).parts
            if not parts or ".." in parts or parts[0] in (MANIFEST_NAME, LOCK_NAME):  # "." names the folder itself
                continue
            safe.append(name)
        return safe

    def begin(self) -> None:
        """The work is done and writing starts: remove the previous run's files and stale temporaries."""
        if self._began:
            return
        self._began = True
        old = self.previous_files()
        if self.add_to_previous:
            self.files = list(old)
            with contextlib.suppress(OSError, ValueError, AttributeError, InputError):
                self.command = json.loads(read_regular_text(self.manifest_path)).get("command", self.command)
            old = []
        folders: set[Path] = set()
        for name in old:
            target = self.path / name
            if target.is_file() or target.is_symlink():
                with contextlib.suppress(OSError):
                    target.unlink()
            folders.update(a for a in target.parents if self.path in a.parents)
        for folder in [self.path, *sorted(folders)]:
            remove_stale_temporaries(folder)
        for folder in sorted(folders, key=lambda a: len(a.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a user's file in maps/ keeps maps/
        self._write_manifest(complete=False)

    def relative_name(self, path: str | os.PathLike[str]) -> str | None:
        """``path`` relative to this folder (posix), or ``None`` when it is outside (or is our own bookkeeping)."""
        try:
            name = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.path)).as_posix()
        except ValueError:
            return None
        return None if name in (MANIFEST_NAME, LOCK_NAME, ".") else name

    def record(self, path: str | os.PathLike[str]) -> None:
        """Called by the atomic writers just before a file of this run takes its final name."""
        name = self.relative_name(path)
        if name is None:
            return
        self.begin()
        if name not in self.files:
            self.files.append(name)
            self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> None:
        with refusals_named("cannot write", self.manifest_path):
            self._write_manifest_unnamed(complete)

    def _write_manifest_unnamed(self, complete: bool) -> None:
        from artifactscan.core.version import __version__

        data = {"schema": MANIFEST_SCHEMA, "command": self.command, "pid": os.getpid(), "complete": complete,
                "artifactscan_version": __version__, "files": self.files}
        tmp = _temp_in(self.manifest_path)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)  # ensure_ascii: any file name survives
            os.chmod(tmp, file_mode())
            os.replace(tmp, self.manifest_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -------------------------------------------------------------- context manager
    def close(self, ok: bool) -> None:
        try:
            if self._token is not None:
                _active.reset(self._token)
                self._token = None
            if not self.manifest:
                if not ok:
                    self._remove_created()
            elif ok:
                self.begin()  # a run that wrote nothing still owns the folder now
                self._write_manifest(complete=True)
            elif self._began:
                self._write_manifest(complete=False)
            else:
                self._remove_created()
        finally:
            self._unlock()

    def __enter__(self) -> "OutputFolder":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


@contextlib.contextmanager
def output_folder(path: str | os.PathLike[str] | None, command: str, flag: str = "--out",
                  manifest: bool = True, add_to_previous: bool = False) -> Iterator[OutputFolder | None]:
    """:class:`OutputFolder` for ``path``, or nothing when there is no ``--out``."""
    if path is None:
        yield None
        return
    with OutputFolder(path, command, flag, manifest, add_to_previous) as folder:
        yield folder
