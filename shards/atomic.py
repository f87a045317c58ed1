"""Write files and folders under a temporary name and rename them when complete.

An interrupted writer never leaves a truncated file under its final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shards.ownership import OutputExistsError, is_empty_dir, marked_kind


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds.

    Works for a file or a folder: whatever the block creates at the yielded path is moved.
    The temporary name ends in `.tmp` so that readers globbing `*.tar` never see it.
    A finished folder replaces an existing `final` only when both carry the same output marker
    (`shards.ownership`): a folder the project did not write is never removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f"{suffix}.tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates a file or a folder here
    try:
        yield tmp
        if tmp.is_dir():
            if final.exists() and not is_empty_dir(final):
                _check_replaceable(final, tmp)
                old = final.with_name(f".{final.name}.old.tmp")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)  # rename(2) replaces an empty folder: nothing of anyone's is lost
        else:
            fsync_file(tmp)
            os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush `path`'s bytes to the disk, so that a rename after it never publishes a file the kernel lost."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _check_replaceable(final: Path, new: Path) -> None:
    kind = marked_kind(new)
    if final.is_symlink() or not final.is_dir() or kind is None or marked_kind(final) != kind:
        raise OutputExistsError(f"{final} exists and is not a {kind or 'marked'} output of vitssl; refusing to replace "
                                "it (nothing was changed there)")


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
