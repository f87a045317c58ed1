"""`verify` finds each kind of damage and names the shard and key; `info` counts and draws."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits

from shards.__main__ import main
from shards.info import info
from shards.manifest import MANIFEST_NAME, load_manifest, sha256_file
from shards.tar import iter_tar_samples
from shards.verify import verify


def rewrite_shard(folder: Path, index: int, change: Callable[[str, dict[str, bytes]], None]) -> None:
    """Rewrite one shard with `change` applied to each sample, and re-seal the manifest so that
    only the damage done by `change` is left to find."""
    manifest = load_manifest(folder)
    shard = manifest.shards[index]
    path = folder / shard.name
    with open(path, "rb") as f:
        samples = list(iter_tar_samples(f))
    with wds.TarWriter(str(path), encoder=False) as tar:
        for key, files in samples:
            change(key, files)
            tar.write({"__key__": key, **files})
    shard.sha256, shard.bytes = sha256_file(path), path.stat().st_size
    manifest.save(folder)


def test_clean_set_is_ok(digits_shards, capsys):
    report = verify(digits_shards)
    assert report.ok and report.shards_checked == 4 and report.samples_checked == 1797
    assert main(["verify", str(digits_shards)]) == 0
    assert capsys.readouterr().out.startswith("OK:")


def test_flipped_byte_is_a_sha_mismatch(digits_shards, capsys):
    shard = load_manifest(digits_shards).shards[2]
    path = digits_shards / shard.name
    data = bytearray(path.read_bytes())
    data[100_000] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify(digits_shards)
    assert any(p.shard == shard.name and "sha256" in p.what for p in report.problems)
    assert all(p.shard == shard.name for p in report.problems)
    assert main(["verify", str(digits_shards)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {shard.name}: sha256 does not match" in out and "FAILED" in out


def test_corrupt_image_and_bad_labels_are_named_by_key(digits_shards, capsys):
    def damage(key: str, files: dict[str, bytes]) -> None:
        if key == "00000460":
            files["png"] = files["png"][:40]  # cut off mid-stream
        elif key == "00000470":
            files["cls"] = b"12"  # 10 classes
        elif key == "00000480":
            files["cls"] = b"seven"

    rewrite_shard(digits_shards, 1, damage)
    report = verify(digits_shards)
    name = load_manifest(digits_shards).shards[1].name
    assert report.bad_keys() == {(name, "00000460"), (name, "00000470"), (name, "00000480")}
    assert len(report.problems) == 3  # sha and counts agree: only the samples are wrong
    assert main(["verify", str(digits_shards)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {name} key 00000460: undecodable .png image" in out
    assert f"BAD {name} key 00000470: bad label 12: out of range for 10 classes" in out
    assert f"BAD {name} key 00000480: bad label b'seven': not an integer" in out


def test_wrong_image_size_and_missing_caption(digits_shards):
    def damage(key: str, files: dict[str, bytes]) -> None:
        if key == "00000001":
            buf = io.BytesIO()
            Image.new("L", (9, 8)).save(buf, format="PNG")
            files["png"] = buf.getvalue()
        elif key == "00000002":
            del files["txt"]

    rewrite_shard(digits_shards, 0, damage)
    whats = {p.key: p.what for p in verify(digits_shards).problems}
    assert whats == {"00000001": "image size [8, 9], manifest says [8, 8]",
                     "00000002": "no caption (.txt) though the manifest says every sample has one"}


def test_truncated_missing_and_extra_shards(digits_shards):
    names = [s.name for s in load_manifest(digits_shards).shards]
    first = digits_shards / names[0]
    first.write_bytes(first.read_bytes()[:300_000])
    (digits_shards / names[3]).unlink()
    (digits_shards / "shard-000099.tar").write_bytes(b"")
    report = verify(digits_shards)
    whats = [(p.shard, p.what) for p in report.problems]
    assert ("shard-000099.tar", "tar file not listed in the manifest") in whats
    assert (names[3], "missing shard file") in whats
    assert any(s == names[0] and "corrupt or truncated tar" in w for s, w in whats)
    assert any(s == names[0] and w.endswith("manifest says 450") for s, w in whats)
    assert not any(s in names[1:3] for s, _ in whats)


def test_missing_manifest(digits_shards, tmp_path, capsys):
    """Tars without a manifest are another tool's set: every sample is decoded (a damaged one is still found), and
    the report says checksums and counts could not be compared. A folder without tars is a problem."""
    (digits_shards / MANIFEST_NAME).unlink()
    report = verify(digits_shards)
    assert report.ok and report.samples_checked == 1797 and "no manifest.json" in report.notes[0]
    assert main(["verify", str(digits_shards)]) == 0
    assert "no manifest.json" in capsys.readouterr().out
    first = sorted(digits_shards.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[:5000])  # cut mid-sample
    assert main(["verify", str(digits_shards)]) == 1
    assert "corrupt or truncated tar" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nowhere")]) == 1
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 1
    assert "no manifest.json" in capsys.readouterr().out


def test_info_counts_and_grid(digits_shards, tmp_path):
    grid = tmp_path / "grid.png"
    result = info(digits_shards, grid_png=grid, per_class=3)
    expected = np.bincount(load_digits().target)
    assert result.total == 1797 and list(result.per_shard.values()) == [450, 449, 449, 449]
    assert list(result.per_class) == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert list(result.per_class.values()) == expected.tolist()
    assert (result.image_mode, result.image_size, result.has_captions) == ("L", [8, 8], True)
    with Image.open(grid) as png:
        assert png.format == "PNG" and png.height > png.width  # ten rows of three
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    text = result.format()
    assert "1797 in 4 shards" in text and "seven" in text and str(grid) in text


def test_info_without_manifest_scans_the_tars(digits_shards):
    (digits_shards / MANIFEST_NAME).unlink()
    result = info(digits_shards)
    assert not result.has_manifest and result.total == 1797
    assert result.classes == [str(i) for i in range(10)]
    assert result.per_class["7"] == np.bincount(load_digits().target)[7]
    assert (result.image_mode, result.image_size) == ("L", [8, 8])


def test_info_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        info(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither manifest.json nor any .tar"):
        info(tmp_path)
