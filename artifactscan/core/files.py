"""Output files that are never half-written, folders that hold one run's outputs, and names printed safely.

* :func:`atomic_write_text` / :func:`atomic_write_bytes` / :func:`atomic_path` write to a temporary name in the
  target's folder and rename it over the target, so a killed or failing run never leaves a truncated file. Every
  output gets the same mode, the one any new file gets (``0o666 & ~umask``: 0644 under the usual umask).
* :class:`OutputFolder` makes an ``--out`` folder belong to one run: it is validated and locked (``fcntl.flock``,
  released by the OS when the process dies) before any model runs, and it keeps a manifest of the files the run wrote.
  A run into a folder that holds a complete earlier run writes into a hidden staging folder and swaps its files in
  only when it completes, so an interrupted run leaves the earlier one intact; the files the earlier manifest lists,
  and nothing else, are removed then. :func:`listed_files` reads a folder's manifest (image discovery leaves those
  files out: outputs never become inputs) and :func:`open_output_folders` names the folders being written.
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
STAGING_NAME = ".artifactscan-staging"  # a run's new files until it completes, when a complete earlier run is there
MANIFEST_SCHEMA = "artifactscan.manifest/1"
TEMP_SUFFIX = ".partial"
# Temporaries are ``.<name>.<random>.partial`` (mkstemp's random part: 8 characters of [a-z0-9_]).
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.partial$")

_active: contextvars.ContextVar["OutputFolder | None"] = contextvars.ContextVar("artifactscan_output", default=None)
_open: list["OutputFolder"] = []  # every output folder this process holds locked (what it writes is not an input)


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
    target = path
    if folder is not None and folder.relative_name(path) is not None:
        folder.begin()  # the first output of a run clears the previous run's (before our temporary exists)
        target = folder.write_path(path)  # its staging copy while a complete earlier run stays in place
    tmp = _temp_in(target)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # mkstemp creates 0600; outputs are meant to be shared like any other file
        if folder is not None:
            folder.record(path)
        os.replace(tmp, target)
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


# ----------------------------------------------------------------------------------------------- manifests
def read_manifest(folder: str | os.PathLike[str]) -> dict | None:
    """The manifest in ``folder`` as a dict, or ``None`` when there is none or it cannot be read.

    Only a regular file is opened (a FIFO or folder of that name would block or fail); a damaged one reads as none.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        if not path.is_file():
            return None
        data = json.loads(read_regular_text(path))  # checks the open descriptor too: never blocks on a FIFO
    except (OSError, ValueError, InputError):
        return None
    return data if isinstance(data, dict) else None


def listed_files(folder: str | os.PathLike[str], manifest: dict | None = None) -> list[str]:
    """Relative names the manifest in ``folder`` lists: only names inside it (never ``..``, ``.`` or absolute), never
    its own bookkeeping (manifest, lock, staging folder). ``manifest``: that manifest, when already read."""
    data = read_manifest(folder) if manifest is None else manifest
    names = data.get("files", []) if isinstance(data, dict) else []
    safe = []
    for name in names if isinstance(names, list) else []:
        if not isinstance(name, str) or not name or os.path.isabs(name):
            continue
        parts = Path(name).parts
        if not parts or ".." in parts or parts[0] in (MANIFEST_NAME, LOCK_NAME, STAGING_NAME):
            continue
        safe.append(name)
    return safe


def open_output_folders() -> list["OutputFolder"]:
    """The output folders this process holds locked now: what they are being written with is not an input."""
    return list(_open)


def unfinished_runs(folder: str | os.PathLike[str]) -> list[str]:
    """One line for each output folder at or under ``folder`` (hidden folders aside) whose last run did not finish:
    a manifest that says ``complete: false`` (an interrupted run's partial results), or a staging folder left by a
    killed run beside a complete earlier one."""
    lines = []
    for dirpath, dirnames, _ in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        shown = display_name(dirpath)
        data = read_manifest(dirpath)
        if data is not None and data.get("complete") is False:
            lines.append(f"{shown} holds an interrupted run's partial results (`{display_name(str(data.get('command')))}`"
                         f" stopped before it finished; its {MANIFEST_NAME} says complete: false): each file is whole, "
                         "but some may be missing or from the run before; run the command again to complete them")
        elif os.path.lexists(os.path.join(dirpath, STAGING_NAME)):
            lines.append(f"{shown}: a later run into this folder was interrupted; these are the earlier, complete run's "
                         f"results (the unfinished files in {STAGING_NAME}/ are removed by the next run there)")
    return lines


def _remove_tree(path: Path) -> None:
    """Remove our own staging folder (a link of that name is removed, never followed)."""
    import shutil

    with contextlib.suppress(OSError):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _remove_empty_folders(root: Path, names: list[str]) -> None:
    """Remove the folders (inside ``root``) of ``names`` that are empty now, deepest first; a user's file keeps its
    folder."""
    folders = {a for name in names for a in (root / name).parents if root in a.parents}
    for folder in sorted(folders, key=lambda a: len(a.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for a moment (a swap of renames, a child started and registered): each is acted on, as
    it would have been, after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            handler = previous.get(caught[0], signal.SIG_DFL)
            if callable(handler):
                handler(caught[0], None)  # e.g. Python's KeyboardInterrupt, or the CLI's SIGTERM handler
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


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
    files in the folder are never touched. When the previous run is complete, this run's files are written into
    ``DIR/.artifactscan-staging/`` and swapped in when it completes (:meth:`close`): until then the previous run's
    files and manifest stay as they were, whatever happens to this run (a failure removes the staging folder; after
    SIGKILL the next run does).
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
        self._previous: list[str] = []  # the previous run's files (read when this run starts writing)
        self._staging = False  # True: a complete previous run stays in place until this one completes
        self._complete_after = True  # what the manifest says when this run completes (``report`` keeps the run's)

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
        _open.append(self)
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
        return listed_files(self.path)

    @property
    def staging_path(self) -> Path:
        return self.path / STAGING_NAME

    def write_path(self, path: str | os.PathLike[str]) -> Path:
        """Where an output of this run is written now: its place in the folder, or in the staging folder while a
        complete previous run stays in place (the same relative name)."""
        name = self.relative_name(path)
        return self.staging_path / name if self._staging and name is not None else Path(path)

    def begin(self) -> None:
        """The work is done and writing starts: remove the previous run's files and stale temporaries, or, when the
        previous run is complete, leave them in place and write this run's files into the staging folder."""
        if self._began:
            return
        self._began = True
        previous = read_manifest(self.path)
        old = listed_files(self.path, previous or {})
        self._previous = list(old)
        _remove_tree(self.staging_path)  # a killed run's staged files: ours, and never swapped in
        if self.add_to_previous:
            self.files = list(old)
            if previous is not None:
                self.command = str(previous.get("command", self.command))
                self._complete_after = previous.get("complete") is True  # joining a run does not finish it
            old = []
        self._staging = bool(self._previous) and previous is not None and previous.get("complete") is True
        if self._staging:
            remove_stale_temporaries(self.path)
            return
        self._remove_files(old)
        self._write_manifest(complete=False)

    def _remove_files(self, names: list[str]) -> None:
        """Remove exactly these files of a previous run, the temporaries beside them and their folders left empty."""
        folders: set[Path] = set()
        for name in names:
            target = self.path / name
            if target.is_file() or target.is_symlink():
                with contextlib.suppress(OSError):
                    target.unlink()
            folders.update(a for a in target.parents if self.path in a.parents)
        for folder in [self.path, *sorted(folders)]:
            remove_stale_temporaries(folder)
        _remove_empty_folders(self.path, names)  # only when empty: a user's file in maps/ keeps maps/

    def _swap_in(self) -> None:
        """This run completed: move its staged files into place, then remove the previous run's other files.

        The manifest first lists both runs' files (``complete: false``), so a crash during the swap leaves every file
        listed for the next run to remove; then it lists this run's alone, complete. Each move is one rename.
        """
        new = list(self.files)
        with signals_deferred():  # Ctrl-C here would leave two runs' files mixed: it waits for the swap instead
            self._write_manifest(complete=False, files=self._previous + [n for n in new if n not in self._previous])
            for name in new:
                staged = self.staging_path / name
                if os.path.lexists(staged):
                    target = self.path / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, target)
            self._remove_files([n for n in self._previous if n not in new])
            _remove_tree(self.staging_path)
            self._write_manifest(complete=self._complete_after)

    def _discard_staged(self) -> None:
        """This run failed: its staged files go; the previous run's files and manifest stay exactly as they were."""
        _remove_tree(self.staging_path)
        _remove_empty_folders(self.path, self.files)  # e.g. a maps/ folder a figure writer created for nothing

    def relative_name(self, path: str | os.PathLike[str]) -> str | None:
        """``path`` relative to this folder (posix), or ``None`` when it is outside (or is our own bookkeeping)."""
        try:
            name = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.path)).as_posix()
        except ValueError:
            return None
        if name in (MANIFEST_NAME, LOCK_NAME, ".") or name.split("/", 1)[0] == STAGING_NAME:
            return None
        return name

    def record(self, path: str | os.PathLike[str]) -> None:
        """Called by the atomic writers just before a file of this run takes its final name."""
        name = self.relative_name(path)
        if name is None:
            return
        self.begin()
        if name not in self.files:
            self.files.append(name)
            if not self._staging:  # while staging, the folder's manifest stays the complete previous run's
                self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool, files: list[str] | None = None) -> None:
        with refusals_named("cannot write", self.manifest_path):
            self._write_manifest_unnamed(complete, files)

    def _write_manifest_unnamed(self, complete: bool, files: list[str] | None = None) -> None:
        from artifactscan.core.version import __version__

        data = {"schema": MANIFEST_SCHEMA, "command": self.command, "pid": os.getpid(), "complete": complete,
                "artifactscan_version": __version__, "files": self.files if files is None else files}
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
                if self._staging:
                    self._swap_in()
                else:
                    self._write_manifest(complete=self._complete_after)
            elif self._staging:
                self._discard_staged()
            elif self._began:
                self._write_manifest(complete=False)
            else:
                self._remove_created()
        finally:
            with contextlib.suppress(ValueError):
                _open.remove(self)
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
