"""Lazy enumeration of input files: directories, single files, or a list file.

Nothing here holds the whole archive: directories are walked with ``os.scandir`` one
folder at a time and each file is yielded as soon as it is seen, so prediction starts
before the walk ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Item:
    """One input file as the driver sees it: a path and its stat, no pixels."""

    path: str
    size: int     # -1 when the file could not be stat'ed
    mtime_ns: int  # -1 likewise
    error: str = ""  # why it could not be stat'ed


def _stat_item(path: str, entry: os.DirEntry | None = None) -> Item:
    try:
        st = entry.stat() if entry is not None else os.stat(path)
    except OSError as e:
        return Item(path, -1, -1, e.strerror or str(e))
    return Item(path, st.st_size, st.st_mtime_ns)


def walk(root: str) -> Iterator[Item]:
    """Files under ``root``, depth first, each yielded as ``os.scandir`` sees it.

    Only sub-folder names are kept (sorted, for a stable order between runs); a folder with
    millions of files is streamed, never listed in memory. Symbolic links to files are
    followed; links to folders are not (no cycles).
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        subdirs = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.path)
                            continue
                        if not entry.is_file():  # sockets, fifos, dangling links
                            if entry.is_symlink():
                                yield Item(entry.path, -1, -1, "dangling symbolic link")
                            continue
                    except OSError as e:
                        yield Item(entry.path, -1, -1, e.strerror or str(e))
                        continue
                    yield _stat_item(entry.path, entry)
        except OSError as e:
            yield Item(folder, -1, -1, f"cannot list folder: {e.strerror or e}")
            continue
        stack.extend(sorted(subdirs, reverse=True))


def _nested(path: str, roots: list[str]) -> bool:
    return any(path != r and path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def iter_inputs(inputs: Iterable[str | Path], from_list: str | Path | None = None) -> Iterator[Item]:
    """Every input file once: each INPUT (folder or file), then each line of ``from_list``.

    Paths are made absolute so that rows stay comparable across runs from other folders.
    A folder nested inside another INPUT is not walked twice.
    """
    paths = [os.path.abspath(p) for p in inputs]
    dirs = [p for p in paths if os.path.isdir(p)]
    seen_files: set[str] = set()
    for p in paths:
        if os.path.isdir(p):
            if not _nested(p, dirs):
                yield from walk(p)
        elif not _nested(p, dirs) and p not in seen_files:
            seen_files.add(p)
            yield _stat_item(p)
    if from_list is not None:
        with open(from_list, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n\r")
                if line.strip():
                    yield _stat_item(os.path.abspath(line))
