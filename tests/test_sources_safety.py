"""An image folder's odd entries are read or counted, never silently dropped, and a FIFO is never opened:
symlinked folders are followed (each real folder once, so a loop ends), and dangling symlinks, symlink loops,
FIFOs and links back to a folder already read are skipped with their reason in the log and the manifest."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.__main__ import main
from shards.manifest import load_manifest
from shards.sources import ImageFile, image_entries, image_files, image_folder_source
from shards.tar import iter_source_samples

pytestmark = pytest.mark.timeout(60)  # opening a FIFO would block for ever: fail instead


def save(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8), "L").save(path)


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """ROOT/cat and ROOT/dog holding 3 + 1 plain images, 2 more in a folder elsewhere linked into cat, and four
    entries that cannot be read: a dangling symlink, a symlink loop, a FIFO, a link from dog back to itself."""
    root = tmp_path / "root"
    save(root / "cat" / "a.png", 10)
    save(root / "cat" / "b.png", 20)
    save(root / "cat" / "sub" / "c.png", 30)
    save(root / "dog" / "d.png", 40)
    save(tmp_path / "elsewhere" / "e.png", 50)
    save(tmp_path / "elsewhere" / "f.png", 60)
    (root / "cat" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "cat" / "dangling.png").symlink_to(root / "cat" / "gone.png")
    (root / "cat" / "loop.png").symlink_to("loop.png")
    os.mkfifo(root / "dog" / "fifo.png")
    (root / "dog" / "again").symlink_to(".", target_is_directory=True)
    return root


def test_image_entries_follow_symlinked_folders_and_name_what_cannot_be_read(odd_folder: Path) -> None:
    entries = {p.relative_to(odd_folder).as_posix(): why for p, why in image_entries(odd_folder)}
    readable = ["cat/a.png", "cat/b.png", "cat/linked/e.png", "cat/linked/f.png", "cat/sub/c.png", "dog/d.png"]
    assert sorted(k for k, why in entries.items() if not why) == readable
    assert entries["cat/dangling.png"] == f"dangling symlink (its target {odd_folder / 'cat' / 'gone.png'} does not exist)"
    assert entries["cat/loop.png"] == "symlink loop (the link leads back to itself)"
    assert entries["dog/fifo.png"] == "a FIFO (named pipe), not a regular file: not opened"
    assert entries["dog/again"] == f"symlink to a folder already read ({odd_folder / 'dog'}): not followed again"
    assert len(entries) == 10
    assert [p.relative_to(odd_folder).as_posix() for p in image_files(odd_folder)] == readable  # the query-by-folder list


def test_write_folder_counts_every_odd_entry_in_the_manifest_and_the_log(odd_folder: Path, tmp_path: Path,
                                                                          caplog, capsys) -> None:
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING, logger="shards"):
        assert main(["write", "folder", str(odd_folder), "--out", str(out)]) == 0
    manifest = load_manifest(out)
    assert manifest.total == 6 and manifest.skipped == 4
    sources = sorted(json.loads(files["json"])["source"] for _, _, files in iter_source_samples(str(out)))
    assert sources == ["cat/a.png", "cat/b.png", "cat/linked/e.png", "cat/linked/f.png", "cat/sub/c.png", "dog/d.png"]
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(skips) == 4
    for name, why in [("cat/dangling.png", "dangling symlink"), ("cat/loop.png", "symlink loop"),
                      ("dog/fifo.png", "a FIFO (named pipe)"), ("dog/again", "symlink to a folder already read")]:
        assert any(f"skipped {odd_folder / name}: " in m and why in m for m in skips), (name, skips)
    assert "skipped 4 of 10 entries" in capsys.readouterr().out


def test_stem_keys_ignore_entries_that_are_never_written(odd_folder: Path) -> None:
    """A dangling "d.jpg" link beside a real "d.png" is no key clash: only readable files need keys."""
    (odd_folder / "dog" / "d.jpg").symlink_to(odd_folder / "dog" / "missing.jpg")
    source = image_folder_source(odd_folder, classes=["dog"], key="stem")
    assert source.count == 4  # d.png, the dangling d.jpg, the FIFO, the link back to dog
    assert [s.key for s in source if not s.image.problem] == ["d"]


def test_a_fifo_in_a_files_place_is_refused_not_opened(tmp_path: Path) -> None:
    """Listed as a file, then replaced by a FIFO before the writer opens it: the open itself refuses it."""
    save(tmp_path / "x.png", 1)
    [(path, why)] = image_entries(tmp_path)
    assert why == ""
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(OSError, match="not a regular file \\(a FIFO\\)"):
        ImageFile(path, str(path)).open()
