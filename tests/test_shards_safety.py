"""Input that must not be trusted: pipe: sources (shell commands), webdataset's GOPEN_REWRITE and other schemes
that run programs, manifests naming files outside their folder, and images that do not fit 8-bit L/RGB (16-bit,
float, transparency, 16-bit transparency keys)."""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.__main__ import main
from shards.info import info
from shards.manifest import MANIFEST_NAME, Manifest, ManifestEntryError, ShardInfo, load_manifest, sha256_file
from shards.record import decode_image
from shards.sources import ALPHA_COMPOSITED, HIGH_BIT_DEPTH_SCALED, ImageFile, RawSample, normalize_image
from shards.stream import ShardStream
from shards.tar import (
    ALLOW_PIPE_ENV,
    REWRITE_ENV,
    PipeSourceError,
    check_pipe_allowed,
    count_tar_samples,
    iter_source_samples,
    iter_tar_samples,
    list_shards,
    open_shard,
    tar_writer,
)
from shards.verify import verify
from shards.writer import write_shard_set


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


# ---- GOPEN_REWRITE and schemes that run programs ---------------------------------------------------------


@pytest.fixture
def rewritten_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A 3-sample shard set whose shard path webdataset's GOPEN_REWRITE would turn into a shell command that
    creates `marker` (and then cats the shard, so the read would even succeed)."""
    monkeypatch.delenv(ALLOW_PIPE_ENV, raising=False)
    folder = tmp_path / "set"
    folder.mkdir()
    shard = tar_of(folder / "shard-000000.tar", [gray(i) for i in range(3)])
    Manifest([ShardInfo(shard.name, 3, sha256_file(shard), shard.stat().st_size)]).save(folder)
    marker = tmp_path / "marker"
    monkeypatch.setenv(REWRITE_ENV, f"{folder}/=pipe:touch {marker} && cat {folder}/")
    return folder, marker


def test_gopen_rewrite_cannot_turn_a_local_shard_into_a_command(rewritten_set, capsys) -> None:
    folder, marker = rewritten_set
    shard = str(folder / "shard-000000.tar")
    named = rf"{re.escape(shard)}' would be rewritten by {REWRITE_ENV}=.* to 'pipe:touch .*never applies"
    for read in (lambda: open_shard(shard), lambda: list_shards(shard), lambda: count_tar_samples(shard),
                 lambda: list(iter_source_samples(str(folder))), lambda: list(ShardStream(str(folder), batch_size=1)),
                 lambda: open_shard(shard, allow_pipe=True)):  # refused even where pipe: sources are allowed
        with pytest.raises(PipeSourceError, match=named):
            read()
    for command in ("verify", "stats", "info"):  # verify used to run the command and print OK
        assert main([command, str(folder)]) == 2
        assert f"would be rewritten by {REWRITE_ENV}" in capsys.readouterr().err
    assert not marker.exists()


def test_local_shards_are_plain_files_whatever_their_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local name that parses as a URL scheme ("v2:...") is a file, not a scheme webdataset would dispatch on;
    a GOPEN_REWRITE rule that does not match the source changes nothing."""
    monkeypatch.chdir(tmp_path)
    tar_of(tmp_path / "v2:shard.tar", [gray(1), gray(2)])
    monkeypatch.setenv(REWRITE_ENV, "http://mirror.invalid/=http://other.invalid/")
    with open_shard("v2:shard.tar") as f:
        assert isinstance(f, io.BufferedReader) and f.name == "v2:shard.tar"
    with open_shard(f"file://{tmp_path}/v2:shard.tar") as f:
        assert f.name == f"{tmp_path}/v2:shard.tar"
    assert list_shards("v2:shard.tar") == [("v2:shard.tar", 2)]
    assert [key for _, key, _ in iter_source_samples("v2:shard.tar")] == ["k0000", "k0001"]


def test_tar_writer_writes_a_plain_file_whatever_gopen_rewrite_says(tmp_path: Path, monkeypatch) -> None:
    """wds.TarWriter(path) opens the path with gopen, so GOPEN_REWRITE could make writing a shard run a command;
    `tar_writer` opens the file itself and writes the very bytes TarWriter writes to a path."""
    marker = tmp_path / "marker"
    monkeypatch.setenv(REWRITE_ENV, f"{tmp_path}/=pipe:touch {marker} && cat > /dev/null #")
    sample = {"__key__": "k0", "png": png(gray(3)), "cls": b"3"}
    with tar_writer(tmp_path / "shard.tar", encoder=False, mtime=0) as writer:
        writer.write(sample)
        stream = writer.own_fileobj
    assert stream.closed and not marker.exists()
    monkeypatch.delenv(REWRITE_ENV)
    with wds.TarWriter(str(tmp_path / "reference.tar"), encoder=False, mtime=0) as writer:
        writer.write(sample)
    assert (tmp_path / "shard.tar").read_bytes() == (tmp_path / "reference.tar").read_bytes()
    with open_shard(str(tmp_path / "shard.tar")) as f:
        assert [(key, sorted(files)) for key, files in iter_tar_samples(f)] == [("k0", ["cls", "png"])]


def test_writing_a_shard_set_never_runs_a_gopen_rewrite(tmp_path: Path, monkeypatch) -> None:
    """The shard writer (and the online evaluator's split, which writes tars too) open their files themselves."""
    marker = tmp_path / "marker"
    monkeypatch.setenv(REWRITE_ENV, f"{tmp_path}/=pipe:touch {marker} && cat > /dev/null #")
    assert main(["write", "digits", "--out", str(tmp_path / "set"), "--samples-per-shard", "600"]) == 0
    assert not marker.exists() and len(list((tmp_path / "set").glob("*.tar"))) == 3
    monkeypatch.delenv(REWRITE_ENV)
    assert main(["verify", str(tmp_path / "set")]) == 0


@pytest.mark.parametrize("url", ["gs://bucket/shard.tar", "hf://datasets/me/set/shard.tar", "sftp://host/shard.tar",
                                 "scp://host/shard.tar", "ftps://host/shard.tar", "ais://bucket/shard.tar",
                                 "htgs://bucket/shard.tar", "GS://bucket/shard-{0..1}.tar"])
def test_schemes_that_run_a_program_are_refused_unless_allowed(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_PIPE_ENV, raising=False)
    scheme = url.split(":")[0].lower()
    named = rf"{re.escape(url)}' has the scheme {scheme}://, which webdataset opens by running an external program; " \
            rf"refused.*allow_pipe=True.*{ALLOW_PIPE_ENV}=1"
    for refuse in (lambda: check_pipe_allowed(url), lambda: open_shard(url), lambda: list_shards(url),
                   lambda: ShardStream(url, batch_size=1)):
        with pytest.raises(PipeSourceError, match=named):
            refuse()
    check_pipe_allowed(url, allow_pipe=True)  # allowed: webdataset's handler for the scheme opens it
    monkeypatch.setenv(ALLOW_PIPE_ENV, "1")
    check_pipe_allowed(url)


def test_schemes_nothing_can_open_are_refused_even_when_allowed() -> None:
    for url in ("s3://bucket/shard.tar", "ftp://host/shard.tar"):
        scheme = url.split(":")[0]
        with pytest.raises(PipeSourceError, match=rf"scheme {scheme}://, which cannot be opened: use a local path"):
            open_shard(url, allow_pipe=True)


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


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(pixels: np.ndarray, key: tuple[int, ...]) -> bytes:
    """A real 16-bit PNG (grayscale (h, w) or RGB (h, w, 3)) with a tRNS transparency key, written with numpy and
    zlib: Pillow cannot write 16-bit RGB."""
    h, w = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))  # filter type 0 per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(f">{len(key)}H", *key)) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_16_bit_gray_png_with_a_transparency_key_is_composited(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 65535], [1000, 30000, 1001]], np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG", transparency=1000)  # Pillow writes the tRNS chunk
    assert b"tRNS" in buf.getvalue()
    composited = [[0, 255, 255], [255, 117, 4]]  # the key (1000) white; the rest v/257: 30000 -> 117, 1001 -> 4
    for data in (buf.getvalue(), png16(values, (1000,))):
        image = reread_bytes(data)
        assert image.mode == "I;16" and image.info["transparency"] == 1000
        out, change = normalize_image(image)
        assert (out.mode, change, np.asarray(out).tolist()) == ("L", ALPHA_COMPOSITED, composited)
        assert np.asarray(decode_image(data)).tolist() == composited  # what the stream reads from a foreign shard
    (tmp_path / "key.png").write_bytes(buf.getvalue())
    sample = RawSample("k0", ImageFile(tmp_path / "key.png", "key.png"), 0)
    manifest = write_shard_set([sample], tmp_path / "set", classes=["a"], source="test")
    assert manifest.conversions == {ALPHA_COMPOSITED: 1}  # counted, not silently scaled
    [(_, _, files)] = list(iter_source_samples(str(tmp_path / "set")))
    assert np.asarray(decode_image(files["png"])).tolist() == composited
    unmatched = reread_bytes(png16(values, (7,)))  # a key no pixel has: only scaled, and counted as that
    out, change = normalize_image(unmatched)
    assert change == HIGH_BIT_DEPTH_SCALED and np.asarray(out).tolist() == [[0, 4, 255], [4, 117, 4]]


def test_16_bit_rgb_png_with_a_transparency_key_is_composited() -> None:
    """Pillow keeps the high byte of 16-bit RGB, so the key is matched at that precision."""
    pixels = np.array([[[1000, 2000, 3000], [65535, 0, 32768]], [[1000, 2000, 3000], [5000, 5000, 5000]]], np.uint16)
    image = reread_bytes(png16(pixels, (1000, 2000, 3000)))
    assert image.mode == "RGB" and image.info["transparency"] == (1000, 2000, 3000)
    out, change = normalize_image(image)
    assert out.mode == "RGB" and change == ALPHA_COMPOSITED
    assert np.asarray(out).tolist() == [[[255, 255, 255], [255, 0, 128]], [[255, 255, 255], [19, 19, 19]]]


def reread_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
