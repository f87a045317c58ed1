"""Input that must not be trusted: pipe: sources (shell commands), manifests naming files outside their
folder, and images that do not fit 8-bit L/RGB (16-bit, float, transparency)."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.__main__ import main
from shards.info import info
from shards.manifest import MANIFEST_NAME, Manifest, ManifestEntryError, ShardInfo, load_manifest, sha256_file
from shards.sources import ALPHA_COMPOSITED, HIGH_BIT_DEPTH_SCALED, normalize_image
from shards.stream import ShardStream
from shards.tar import (
    ALLOW_PIPE_ENV,
    PipeSourceError,
    check_pipe_allowed,
    count_tar_samples,
    list_shards,
    open_shard,
)
from shards.verify import verify


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def tar_of(path: Path, images: list[Image.Image]) -> Path:
    with wds.TarWriter(str(path)) as w:
        for i, image in enumerate(images):
            w.write({"__key__": f"k{i:04d}", "png": png(image), "cls": str(i % 10)})
    return path


def gray(i: int) -> Image.Image:
    return Image.fromarray(np.full((4, 4), i, dtype=np.uint8), "L")


# ---- pipe: sources --------------------------------------------------------------------------------------


@pytest.fixture
def pipe_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A pipe: source whose shell command would create `marker` before it cats a real 3-sample tar."""
    monkeypatch.delenv(ALLOW_PIPE_ENV, raising=False)
    shard = tar_of(tmp_path / "shard.tar", [gray(i) for i in range(3)])
    marker = tmp_path / "marker"
    return f"pipe:touch {marker}; cat {shard}", marker


def test_pipe_source_is_refused_and_runs_nothing(pipe_source, capsys) -> None:
    source, marker = pipe_source
    refusals = [
        lambda: list_shards(source),
        lambda: list_shards([str(marker.parent / "shard.tar"), source]),
        lambda: list_shards(f"{marker.parent / 'shard.tar'},{source}"),
        lambda: count_tar_samples(source),
        lambda: open_shard(source),
        lambda: ShardStream(source, batch_size=2),
    ]
    for refuse in refusals:
        with pytest.raises(PipeSourceError, match=rf"{source}.*runs a shell command.*allow_pipe=True.*{ALLOW_PIPE_ENV}=1"):
            refuse()
    assert isinstance(PipeSourceError("x"), ValueError)
    for command in ("verify", "info"):
        assert main([command, source]) == 2
        assert "runs a shell command" in capsys.readouterr().err
    assert not marker.exists()


def test_pipe_source_reads_when_allowed(pipe_source, monkeypatch: pytest.MonkeyPatch) -> None:
    source, marker = pipe_source
    stream = ShardStream(source, batch_size=3, allow_pipe=True, shuffle=False)
    assert stream.allow_pipe and stream.total == 3
    assert [b["key"] for b in stream.loader()] == [["k0000", "k0001", "k0002"]]
    assert marker.exists()
    marker.unlink()
    monkeypatch.setenv(ALLOW_PIPE_ENV, "1")  # allowed for the whole process (CLIs)
    assert list_shards(source) == [(source, 3)] and count_tar_samples(source) == 3
    with open_shard(source) as f:
        assert f.read(512)
    assert marker.exists()


def test_http_and_plain_paths_need_no_permission(pipe_source) -> None:
    source, marker = pipe_source
    shard = marker.parent / "shard.tar"
    assert list_shards(str(shard)) == list_shards(f"file://{shard}") == [(str(shard), 3)]
    for url in ("http://example.com/shard.tar", "https://example.com/shard.tar", str(shard), "a/pipe:b.tar"):
        check_pipe_allowed(url)  # no error
    for url in ("PIPE:true", "  pipe:true"):  # however it is spelt
        with pytest.raises(PipeSourceError):
            check_pipe_allowed(url)


# ---- manifests confined to their folder -----------------------------------------------------------------


def outside_entry_set(tmp_path: Path, entry: str | None) -> tuple[Path, str]:
    """A shard set `tmp_path/set` of one good shard plus a manifest entry `entry` pointing at a real tar
    outside the folder (`tmp_path/outside.tar`); entry None: a symlink in the folder pointing there."""
    folder = tmp_path / "set"
    folder.mkdir()
    tar_of(folder / "shard-000000.tar", [gray(1), gray(2)])
    outside = tar_of(tmp_path / "outside.tar", [gray(9)])
    if entry is None:
        (folder / "link.tar").symlink_to(outside)
        entry = "link.tar"
    shards = [{"name": "shard-000000.tar", "count": 2, "sha256": "", "bytes": 0},
              {"name": entry, "count": 1, "sha256": "", "bytes": 0}]
    (folder / MANIFEST_NAME).write_text(json.dumps({"shards": shards}))
    return folder, entry


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_manifest_entries_outside_the_folder_are_refused(tmp_path: Path, kind: str, capsys) -> None:
    entry = {"absolute": str(tmp_path / "outside.tar"), "dotdot": "../outside.tar", "symlink": None}[kind]
    folder, entry = outside_entry_set(tmp_path, entry)
    why = {"absolute": "absolute path", "dotdot": "climbs out", "symlink": "resolves to .*outside"}[kind]
    pattern = rf"{re.escape(str(folder / MANIFEST_NAME))}: shard entry '{re.escape(entry)}' (is an )?{why}"
    for read in (lambda: load_manifest(folder), lambda: list_shards(str(folder)),
                 lambda: ShardStream(str(folder), batch_size=1), lambda: info(folder),
                 lambda: list_shards(str(folder / "shard-000000.tar"))):  # the manifest beside a listed tar
        with pytest.raises(ManifestEntryError, match=pattern):
            read()
    report = verify(folder)
    assert not report.ok and report.shards_checked == 0 and entry in report.problems[0].what
    assert main(["verify", str(folder)]) == 1
    assert f"shard entry '{entry}'" in capsys.readouterr().out


def test_manifest_entries_inside_the_folder_are_fine(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    tar_of(folder / "sub" / "a.tar", [gray(1)])
    tar_of(folder / "b.tar", [gray(2), gray(3)])
    shards = [{"name": "sub/a.tar", "count": 1, "sha256": "", "bytes": 0},
              {"name": "sub/../b.tar", "count": 2, "sha256": "", "bytes": 0}]
    (folder / MANIFEST_NAME).write_text(json.dumps({"shards": shards}))
    assert [n for _, n in list_shards(str(folder))] == [1, 2]
    shutil.move(folder, tmp_path / "moved")  # relative entries travel with the folder
    assert ShardStream(str(tmp_path / "moved"), batch_size=3).total == 3


# ---- high bit depth and transparency --------------------------------------------------------------------


def reread(image: Image.Image) -> Image.Image:
    """`image` through a PNG file, as a reader gets it."""
    out = Image.open(io.BytesIO(png(image)))
    out.load()
    return out


def test_16_bit_png_is_scaled_not_clipped() -> None:
    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)  # a full-range gradient
    image = reread(Image.fromarray(values))
    assert image.mode == "I;16"
    out, change = normalize_image(image)
    expected = np.rint(values / 257)
    got = np.asarray(out).astype(float)
    assert out.mode == "L" and change == HIGH_BIT_DEPTH_SCALED
    assert np.abs(got - expected).max() <= 1 and (got == 255).mean() < 0.01  # was 99.3% 255 (clipped)
    big = Image.frombytes("I;16B", (64, 64), values.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(normalize_image(big)[0]), np.asarray(out))
    as_int32 = Image.fromarray(values.astype(np.int32))  # mode I, max <= 65535: read as 16-bit
    assert as_int32.mode == "I" and np.array_equal(np.asarray(normalize_image(as_int32)[0]), np.asarray(out))
    unit = Image.fromarray((values / 65535).astype(np.float32))  # mode F in [0, 1]
    assert np.abs(np.asarray(normalize_image(unit)[0]).astype(float) - expected).max() <= 1
    wide = Image.fromarray(np.array([[-5.0, 100.4, 300.0]], np.float32))  # F beyond 1: the 0..255 scale, clipped
    assert np.asarray(normalize_image(wide)[0]).tolist() == [[0, 100, 255]]


def test_transparency_is_composited_onto_white_and_opaque_alpha_just_dropped() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = [[255, 0], [128, 255]]
    out, change = normalize_image(reread(Image.fromarray(rgba, "RGBA")))
    assert out.mode == "RGB" and change == ALPHA_COMPOSITED
    assert np.asarray(out)[:, :, 0].tolist() == [[200, 255], [227, 200]]  # 200*a + 255*(1-a)
    assert np.asarray(out)[:, :, 1].tolist() == [[0, 255], [127, 0]]
    la = Image.fromarray(np.stack([np.full((1, 2), 10, np.uint8), np.array([[0, 255]], np.uint8)], -1), "LA")
    out, change = normalize_image(la)
    assert (out.mode, change, np.asarray(out).tolist()) == ("L", ALPHA_COMPOSITED, [[255, 10]])
    opaque = Image.fromarray(np.dstack([rgba[..., :3], np.full((2, 2), 255, np.uint8)]), "RGBA")
    out, change = normalize_image(opaque)
    assert change == "" and np.array_equal(np.asarray(out), rgba[..., :3])
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    out, change = normalize_image(reread(palette))
    assert change == ALPHA_COMPOSITED and np.asarray(out).tolist() == [[[255, 255, 255], [255, 0, 0]]]


def test_stream_and_verify_read_foreign_16_bit_and_rgba_shards(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    rgba = np.full((8, 8, 4), 90, np.uint8)
    rgba[..., 3] = 0  # fully transparent: white once composited
    folder = tmp_path / "foreign"
    folder.mkdir()
    shard = tar_of(folder / "shard-000000.tar", [Image.fromarray(values), Image.fromarray(rgba, "RGBA")])
    first, second = ShardStream(str(folder), batch_size=1, shuffle=False).loader()
    assert first["image"].shape == (1, 1, 8, 8)
    assert np.abs(first["image"][0, 0].numpy() * 255 - np.rint(values / 257)).max() <= 1e-3
    assert second["image"].shape == (1, 3, 8, 8) and bool((second["image"] == 1).all())
    Manifest([ShardInfo(shard.name, 2, sha256_file(shard), shard.stat().st_size)]).save(folder)
    report = verify(folder)
    assert report.ok and report.samples_checked == 2  # readable, so not a problem, but not silent either:
    assert report.notes == [
        "1 image(s) stored as I;16: the reader converts them (scaled to 8 bits (not clipped))",
        "1 image(s) stored as RGBA with transparency: the reader converts them (composited onto white)",
    ]
    assert "NOTE 1 image(s) stored as I;16" in report.format() and "OK with 2 note(s)" in report.format()
