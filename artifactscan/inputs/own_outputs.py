"""artifactscan's own outputs are never its inputs: the files image discovery leaves out.

An ``--out`` folder inside an image folder would otherwise be scanned by every later run (its figures are PNGs: 4
images became 10, then 12). Left out, and nothing else:

* every file listed in an ``.artifactscan-manifest.json`` that discovery meets: in the folder it walks, in any folder
  below it, or in a folder above it (``IMAGES`` may be a sub-folder of an output folder, e.g. its ``maps/``);
* what the output folders this process holds locked are being written with (:func:`open_output_folders`): the
  files the run has written, and the whole of a folder without a manifest (a train-reg run folder is its own).

A user's own images beside those files are scanned as ever; a file named on the command line is never left out.
Paths are compared canonically (symlinks in the walked folder's own path resolved once), so a folder reached through
a link still matches its manifest.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from artifactscan.core.files import MANIFEST_NAME, display_name, listed_files, open_output_folders

_said: set[str] = set()  # warnings already given by this process (said once, however many passes discover again)


class OwnOutputs:
    """Which files under ``root`` artifactscan wrote, for a discovery walk of ``root``.

    Call :meth:`meet` with every folder the walk visits (it reads a manifest there, if any), :meth:`owns` for each
    file, and :meth:`say` once at the end.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self._root = os.path.abspath(root)
        self._shown = display_name(root)
        self._real_root = os.path.realpath(root)
        self._last_dir: str | None = None
        self._last_canonical = ""
        self._files: dict[str, str] = {}  # canonical path -> where it is listed (for the warning)
        self._folders: dict[str, str] = {}  # canonical folder -> why it is left out whole
        self.left_out: list[Path] = []
        self._places: list[str] = []
        for folder in open_output_folders():
            canon = os.path.realpath(folder.path)
            where = f"the {folder.flag} folder this run writes ({display_name(folder.path)})"
            if not folder.manifest:
                self._folders[canon] = where
            self._add(canon, folder.files, where)
        for above in Path(self._real_root).parents:  # IMAGES inside an output folder: its manifest still counts
            self._meet_canonical(str(above), str(above))

    def _folder(self, folder: str) -> str:
        """A folder's canonical form; a walk asks about many files of one folder in a row, so it is kept."""
        if folder != self._last_dir:
            relative = os.path.relpath(os.path.abspath(folder), self._root)
            self._last_dir, self._last_canonical = folder, os.path.normpath(os.path.join(self._real_root, relative))
        return self._last_canonical

    def _canonical(self, path: str | os.PathLike[str]) -> str:
        head, tail = os.path.split(os.fspath(path))
        return os.path.join(self._folder(head), tail)

    def _add(self, canonical_folder: str, names: list[str], where: str) -> None:
        for name in names:
            self._files.setdefault(os.path.normpath(os.path.join(canonical_folder, name)), where)

    def _meet_canonical(self, canonical_folder: str, shown_folder: str) -> None:
        names = listed_files(canonical_folder)
        if names:
            self._add(canonical_folder, names, f"listed in {display_name(os.path.join(shown_folder, MANIFEST_NAME))}")

    def meet(self, folder: str | os.PathLike[str], filenames: list[str] | None = None) -> None:
        """A folder of the walk; ``filenames`` (when the walk has them) saves a look for the manifest."""
        if filenames is None or MANIFEST_NAME in filenames:
            self._meet_canonical(self._folder(os.fspath(folder)), os.fspath(folder))

    def owns(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` (under ``root``) is an output artifactscan wrote; counted when it is."""
        if not self._files and not self._folders:  # the usual case: no manifest anywhere near
            return False
        canon = self._canonical(path)
        where = self._files.get(canon)
        if where is None:
            where = next((why for folder, why in self._folders.items()
                          if canon.startswith(folder.rstrip(os.sep) + os.sep)), None)
        if where is None:
            return False
        self.left_out.append(Path(path))
        if where not in self._places:
            self._places.append(where)
        return True

    def message(self) -> str | None:
        """The one warning line, or ``None`` when nothing was left out."""
        if not self.left_out:
            return None
        places = "; ".join(self._places[:3]) + (f"; +{len(self._places) - 3} more" if len(self._places) > 3 else "")
        return (f"left out {len(self.left_out)} file(s) under {self._shown} that artifactscan wrote "
                f"({places}): its own outputs are never read as inputs")

    def say(self, warn: Callable[[str], None] | None = None) -> None:
        """Warn once per process about what was left out (a second discovery of the same folder says nothing)."""
        text = self.message()
        if text is None or text in _said:
            return
        _said.add(text)
        (warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr)))(text)
