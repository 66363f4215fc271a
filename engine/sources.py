"""Lazy enumeration of input files: directories, single files, or a list file.

Nothing here holds the whole archive: directories are walked with ``os.scandir`` one
folder at a time and each file is yielded as soon as it is seen, so prediction starts
before the walk ends.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .reasons import NOT_A_REGULAR_FILE, UNREADABLE, file_kind


@dataclass(frozen=True, slots=True)
class Item:
    """One input file as the driver sees it: a path and its stat, no pixels.

    ``path`` is what ``os`` gives: a str whose undecodable bytes (a name that is not UTF-8)
    are surrogate escapes; ``os.fsencode(path)`` is the exact name on disk.
    """

    path: str
    size: int     # -1 when the file could not be stat'ed
    mtime_ns: int  # -1 likewise
    error: str = ""  # why it gets a row without being read (empty: read it)
    reason: str = UNREADABLE
    skipped: bool = False
    listed: bool = False  # named on the command line or in --from-list (may be named twice)


def _stat_item(path: str, entry: os.DirEntry | None = None) -> Item:
    """Stat ``path`` (following links) and decide whether it may be opened at all.

    ``entry`` is the walk's; without one the path was named (command line, list)."""
    listed = entry is None
    is_link = entry.is_symlink if entry is not None else lambda: os.path.islink(path)
    try:
        st = entry.stat() if entry is not None else os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP and is_link():
            return Item(path, -1, -1, "symbolic link loop (too many levels of links)", listed=listed)
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and is_link():
            return Item(path, -1, -1, "dangling symbolic link", listed=listed)
        return Item(path, -1, -1, e.strerror or str(e), listed=listed)
    if not stat.S_ISREG(st.st_mode):
        what = file_kind(st.st_mode)
        msg = (f"symbolic link to a {what}" if is_link() else what) + ": not a regular file, never opened"
        return Item(path, -1, -1, msg, NOT_A_REGULAR_FILE, skipped=True, listed=listed)
    return Item(path, st.st_size, st.st_mtime_ns, listed=listed)


def walk(root: str, exclude: frozenset[tuple[int, int]] = frozenset()) -> Iterator[Item]:
    """Files under ``root``, depth first, each yielded as ``os.scandir`` sees it.

    Only sub-folder names are kept (sorted, for a stable order between runs); a folder with
    millions of files is streamed, never listed in memory. Symbolic links to files are
    followed; links to folders are not (no cycles). Folders whose (device, inode) is in
    ``exclude`` (OUT_DIR) are never entered. FIFOs, sockets and devices are yielded as
    skipped items without being opened.
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
                            if not exclude or _ident(entry.stat(follow_symlinks=False)) not in exclude:
                                subdirs.append(entry.path)
                            continue
                    except OSError as e:
                        yield Item(entry.path, -1, -1, e.strerror or str(e))
                        continue
                    yield _stat_item(entry.path, entry)
        except OSError as e:
            yield Item(folder, -1, -1, f"cannot list folder: {e.strerror or e}")
            continue
        stack.extend(sorted(subdirs, reverse=True))


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _inside(path: str, roots: list[str]) -> bool:
    """``path`` (a real path) is under one of ``roots`` (real paths of folders walked)."""
    return any(path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _identity(path: str) -> int | None:
    """One int for (device, inode): what a file is, however it is named."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev << 64) | st.st_ino


def iter_inputs(inputs: Iterable[str | Path], from_list: str | Path | None = None,
                exclude: Iterable[str | Path] = ()) -> Iterator[Item]:
    """Every input file once: each INPUT (folder or file), then each line of ``from_list``.

    Paths are made absolute so that rows stay comparable across runs from other folders. A folder is
    walked once however it is named (``/data``, ``/data/``, a link to it, one nested in another INPUT:
    compared by real path and by device and inode), and folders in ``exclude`` (OUT_DIR) are never walked.
    A file named on the command line or in the list is left out when a walked folder holds it, or when
    it was named before (by device and inode; this one set grows with the named files, never with the
    walked ones).
    """
    paths = [os.path.abspath(p) for p in inputs]
    skip = frozenset(_ident(os.stat(p)) for p in exclude if os.path.isdir(p))
    walked: list[str] = []          # real paths of the folders walked
    seen_dirs: set[tuple[int, int]] = set()
    for p in paths:
        if os.path.isdir(p):
            real = os.path.realpath(p)
            ident = _ident(os.stat(p))
            if ident not in seen_dirs:
                seen_dirs.add(ident)
                walked.append(real)
    walked = [r for r in walked if not _inside(r, [w for w in walked if w != r])]
    done_dirs: set[str] = set()
    named: set[int] = set()

    def listed(path: str) -> Iterator[Item]:
        real = os.path.realpath(path)
        if _inside(real, walked):
            return
        ident = _identity(path)
        if ident is not None:
            if ident in named:
                return
            named.add(ident)
        yield _stat_item(path)

    for p in paths:
        if os.path.isdir(p):
            real = os.path.realpath(p)
            if real in walked and real not in done_dirs:
                done_dirs.add(real)
                yield from walk(p, skip)
        else:
            yield from listed(p)
    if from_list is not None:
        with open(from_list, "rb") as f:  # names are bytes: a list may hold names that are not UTF-8
            for raw in f:
                line = os.fsdecode(raw.rstrip(b"\n\r"))
                if line.strip():
                    yield from listed(os.path.abspath(line))
