"""The entries of an image folder, walked safely: what can be read, and why the rest cannot.

Symlinked folders are followed, each real folder once (a loop or a second link is named, not walked again);
dangling symlinks, symlink loops, FIFOs and other special files are found by `stat` alone, never opened (opening a
FIFO blocks until something writes to it), so the writer can skip and count them instead of hanging or losing
them without a word.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def entry_problem(path: Path) -> str:
    """Why the directory entry `path` cannot be read as a file, "" when it is a regular file or a link to one.
    Only `stat`s it, never opens it: opening a FIFO blocks until something writes to it."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (the link leads back to itself)"
        if path.is_symlink():
            return f"dangling symlink (its target {os.readlink(path)} does not exist)"
        return f"cannot stat it ({e.strerror})"
    if stat.S_ISREG(mode):
        return ""
    kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket or device"
    return f"{kind}, not a regular file: not opened"


def folder_entries(root: str | Path, suffixes: frozenset[str]) -> list[tuple[Path, str]]:
    """(path, problem) for the entries under `root` an image folder is made of, sorted by path; problem is ""
    for a readable image file (a regular file, or a link to one, named with an image suffix) and says why an
    entry cannot be read otherwise: a dangling symlink or symlink loop, a FIFO or other special file (whatever
    its name), a folder that cannot be listed, or a link to a folder already read (a loop, or a second way to
    the same images). Symlinked folders are followed, each real folder once. Hidden files (".name") are left
    out, as are regular files without one of `suffixes` (a README)."""
    entries: list[tuple[Path, str]] = []
    seen = {_folder_id(Path(root)): Path(root)} if Path(root).is_dir() else {}

    def unlistable(error: OSError) -> None:
        entries.append((Path(error.filename), f"folder cannot be listed ({error.strerror})"))

    for top, dirs, names in os.walk(root, onerror=unlistable, followlinks=True):
        dirs.sort()
        for name in list(dirs):
            folder = Path(top, name)
            first = seen.setdefault(_folder_id(folder), folder)
            if first != folder:  # already read, or being read (an ancestor): following it again loops
                dirs.remove(name)
                entries.append((folder, f"symlink to a folder already read ({first}): not followed again"))
        for name in names:
            path = Path(top, name)
            if name.startswith("."):
                continue
            problem = entry_problem(path)
            if problem or path.suffix.lower() in suffixes:
                entries.append((path, problem))
    return sorted(entries)


def _folder_id(folder: Path) -> tuple[int, int]:
    st = folder.stat()
    return st.st_dev, st.st_ino
