"""Shard writers: every source, the shard layout options, atomicity, and the CLI end to end."""

from __future__ import annotations

import gzip
import io
import json
import logging
import struct
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits

from shards.__main__ import main
from shards.info import info
from shards.manifest import load_manifest, sha256_file
from shards.ownership import MARKER_NAME
from shards.record import encode_sample
from shards.sources import (
    FASHION_MNIST_CLASSES,
    RawSample,
    caption_table_source,
    digits_source,
    find_mnist_files,
    idx_source,
    image_folder_source,
    read_idx,
    resolve_classes,
)
from shards.verify import verify
from shards.writer import write_shard_set, write_split_shard_sets


def read_set(folder: Path) -> list[dict]:
    """Every sample of a shard set, in manifest order, as WebDataset delivers it (raw bytes)."""
    manifest = load_manifest(folder)
    urls = [str(folder / s.name) for s in manifest.shards]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def decode(sample: dict) -> Image.Image:
    data = sample.get("png", sample.get("jpg"))
    return Image.open(io.BytesIO(data))


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """An IDX file as the MNIST distribution has them (uint8 data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def expected_digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return np.rint(d.images * 255 / 16).astype(np.uint8), d.target


# --- built-in digits -----------------------------------------------------------------------------


def test_digits_round_trip(tmp_path):
    source = digits_source()
    manifest = write_shard_set(source, tmp_path / "d", classes=source.classes, source=source.description)
    images, labels = expected_digits()
    samples = read_set(tmp_path / "d")
    assert len(samples) == manifest.total == 1797
    assert [s.count for s in manifest.shards] == [1000, 797]
    assert manifest.classes[7] == "seven" and len(manifest.classes) == 10
    assert (manifest.image_mode, manifest.image_size, manifest.has_captions) == ("L", [8, 8], True)
    for s in manifest.shards:
        path = tmp_path / "d" / s.name
        assert (s.sha256, s.bytes) == (sha256_file(path), path.stat().st_size)
    for i, sample in enumerate(samples):
        assert sample["__key__"] == f"{i:08d}"
        assert int(sample["cls"]) == labels[i]
        assert sample["txt"].decode() == f"a handwritten digit {manifest.classes[labels[i]]}"
        assert json.loads(sample["json"]) == {"index": i, "dataset": "sklearn.datasets.load_digits", "source": str(i)}
        image = decode(sample)
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), images[i])
    assert images.max() == 255 and images.min() == 0


def test_same_input_gives_identical_shards(tmp_path):
    source = digits_source()
    a = write_shard_set(islice(source, 300), tmp_path / "a", classes=source.classes, source="x")
    b = write_shard_set(islice(source, 300), tmp_path / "b", classes=source.classes, source="x")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


# --- image folder --------------------------------------------------------------------------------


def make_folder(root: Path) -> dict[str, np.ndarray]:
    """Two classes of real PNG/JPEG files plus an unreadable image and a non-image file."""
    rng = np.random.default_rng(0)
    pixels = {}
    for name, shape in (("dog/b.png", (12, 10, 3)), ("dog/a.png", (12, 10, 3)),
                        ("cat/z.png", (12, 10)), ("cat/sub/y.png", (12, 10))):
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / name)
        pixels[name] = array
    Image.fromarray(rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)).save(root / "dog/c.png")
    (root / "cat/broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "cat/notes.txt").write_text("not an image, ignored")
    return pixels


def test_image_folder(tmp_path, caplog):
    pixels = make_folder(tmp_path / "imgs")
    source = image_folder_source(tmp_path / "imgs")
    assert source.classes == ["cat", "dog"] and source.count == 6
    with caplog.at_level(logging.WARNING):
        manifest = write_shard_set(source, tmp_path / "out", classes=source.classes, source=source.description)
    assert source.skipped == 1 and "broken.jpg" in caplog.text
    samples = read_set(tmp_path / "out")
    paths = [json.loads(s["json"])["path"] for s in samples]
    assert paths == ["cat/sub/y.png", "cat/z.png", "dog/a.png", "dog/b.png", "dog/c.png"]
    assert [json.loads(s["json"])["source"] for s in samples] == paths  # source name: path relative to the root
    assert [int(s["cls"]) for s in samples] == [0, 0, 1, 1, 1]
    assert [s["__key__"] for s in samples] == ["00000001", "00000002", "00000003", "00000004", "00000005"]
    for sample, path in zip(samples, paths):
        image = decode(sample)
        if path in pixels:  # grayscale stays "L", RGB stays "RGB", pixels exact (PNG)
            assert image.mode == ("L" if path.startswith("cat") else "RGB")
            np.testing.assert_array_equal(np.asarray(image), pixels[path])
    assert decode(samples[-1]).mode == "RGB"  # RGBA becomes RGB
    assert manifest.image_mode == "" and manifest.image_size == [12, 10] and not manifest.has_captions
    assert manifest.conversions == {"alpha_composited": 1}  # dog/c.png's random alpha


def test_high_bit_depth_and_transparency_are_converted_and_counted(tmp_path, capsys):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    values = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(values).save(root / "a" / "deep.png")  # a real 16-bit PNG, opened as mode I;16
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[:8, :, 3] = 255  # top half opaque blue, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "a" / "half.png")
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "a" / "opaque.png")  # alpha channel, but nothing to composite
    assert main(["write", "folder", str(root), "--out", str(tmp_path / "out")]) == 0
    assert "converted to 8-bit L/RGB: 1 alpha composited, 1 high bit depth scaled" in capsys.readouterr().out
    manifest = load_manifest(tmp_path / "out")
    assert manifest.conversions == {"alpha_composited": 1, "high_bit_depth_scaled": 1}
    deep, half, opaque = (decode(s) for s in read_set(tmp_path / "out"))
    got = np.asarray(deep).astype(float)
    assert deep.mode == "L" and np.abs(got - np.rint(values / 257)).max() <= 1  # scaled, not clipped to 255
    assert (got == 255).sum() == 1
    assert half.mode == "RGB" and np.asarray(half)[0, 0].tolist() == [0, 0, 255]
    assert np.asarray(half)[15, 0].tolist() == [255, 255, 255]  # transparent: the white background
    assert np.asarray(opaque).tolist() == rgba[..., :3].tolist()
    assert verify(tmp_path / "out").ok
    assert "writer converted images to 8-bit L/RGB: 1 alpha composited" in info(tmp_path / "out").format()


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        image_folder_source(tmp_path / "empty")
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        image_folder_source(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="dog"):
        image_folder_source(tmp_path / "empty", classes=["cat", "dog"])


# --- IDX -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (25, 7, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, 25, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"im-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"lb-idx1-ubyte{suffix}", labels, gz)
    np.testing.assert_array_equal(read_idx(tmp_path / f"im-idx3-ubyte{suffix}"), images)
    source = idx_source(tmp_path / f"im-idx3-ubyte{suffix}", tmp_path / f"lb-idx1-ubyte{suffix}",
                        resolve_classes("fashion-mnist"))
    manifest = write_shard_set(source, tmp_path / "out", classes=source.classes, source=source.description,
                               samples_per_shard=10)
    assert [s.count for s in manifest.shards] == [10, 10, 5]
    assert manifest.classes == FASHION_MNIST_CLASSES and manifest.image_size == [7, 5]
    samples = read_set(tmp_path / "out")
    np.testing.assert_array_equal([int(s["cls"]) for s in samples], labels)
    np.testing.assert_array_equal(np.stack([np.asarray(decode(s)) for s in samples]), images)
    assert [json.loads(s["json"])["source"] for s in samples] == [str(i) for i in range(25)]  # the row


def test_idx_errors(tmp_path):
    good = np.zeros((4, 3, 3), np.uint8)
    write_idx(tmp_path / "im", good, gz=False)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x03" + bytes(100))
    with pytest.raises(ValueError, match="not an IDX file: magic bytes 01 02 08 03"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "im").read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "short.gz").write_bytes(gzip.compress((tmp_path / "im").read_bytes())[:-12])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    write_idx(tmp_path / "lb", np.zeros(5, np.uint8), gz=False)
    with pytest.raises(ValueError, match="4 images but .* 5 labels"):
        idx_source(tmp_path / "im", tmp_path / "lb")
    write_idx(tmp_path / "lb", np.array([0, 1, 2, 9], np.uint8), gz=False)
    with pytest.raises(ValueError, match="out of range for 3 classes"):
        idx_source(tmp_path / "im", tmp_path / "lb", ["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        find_mnist_files(tmp_path)


def test_fashion_mnist_subset(fmnist_dir, tmp_path):
    """Fast check on the real files: counts and histograms from the IDX, then 3,000 samples written."""
    files = find_mnist_files(fmnist_dir)
    train_labels, val_labels = read_idx(files["train"][1]), read_idx(files["val"][1])
    assert (len(train_labels), len(val_labels)) == (60000, 10000)
    assert np.bincount(train_labels).tolist() == [6000] * 10 and np.bincount(val_labels).tolist() == [1000] * 10
    source = idx_source(*files["train"], resolve_classes("fashion-mnist"), "train")
    manifest = write_shard_set(islice(source, 3000), tmp_path / "fm", classes=source.classes,
                               source=source.description, split="train", shard_multiple=4)
    assert [s.count for s in manifest.shards] == [750] * 4 and manifest.image_size == [28, 28]
    samples = read_set(tmp_path / "fm")
    np.testing.assert_array_equal([int(s["cls"]) for s in samples], train_labels[:3000])
    train_images = read_idx(files["train"][0])
    np.testing.assert_array_equal(np.asarray(decode(samples[2999])), train_images[2999])


@pytest.mark.slow
def test_fashion_mnist_full_cli(fmnist_dir, tmp_path, capsys):
    """All 70,000 real images through the CLI: write, info, verify (about 60 s of CPU on 2 cores)."""
    assert main(["write", "idx", str(fmnist_dir), "--classes", "fashion-mnist", "--out", str(tmp_path / "fm")]) == 0
    assert "60 shards, 60000 samples" in capsys.readouterr().out
    train, val = info(tmp_path / "fm" / "train"), info(tmp_path / "fm" / "val")
    assert (train.total, val.total) == (60000, 10000)
    assert train.per_class == dict.fromkeys(FASHION_MNIST_CLASSES, 6000)
    assert val.per_class == dict.fromkeys(FASHION_MNIST_CLASSES, 1000)
    assert main(["verify", str(tmp_path / "fm")]) == 0


# --- caption table -------------------------------------------------------------------------------


def make_table(tmp_path: Path, kind: str) -> Path:
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (6, 4), (0, 0, 255)).save(tmp_path / "blue.png")
    rows = [
        {"image": "red.png", "caption": "a red square", "label": "warm"},
        {"image": str(tmp_path / "blue.png"), "caption": "a blue, cold square", "label": "cold"},
        {"image": "missing.png", "caption": "nothing here", "label": "cold"},
        {"image": "red.png", "caption": "red again", "label": ""},
    ]
    path = tmp_path / f"pairs.{kind}"
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, ["image", "caption", "label"], delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_caption_table(tmp_path, kind):
    source = caption_table_source(make_table(tmp_path, kind))
    assert source.classes == ["cold", "warm"] and source.count == 4
    manifest = write_shard_set(source, tmp_path / "out", classes=source.classes, source=source.description)
    assert source.skipped == 1 and manifest.total == 3 and manifest.has_captions
    samples = read_set(tmp_path / "out")
    assert [s["txt"].decode() for s in samples] == ["a red square", "a blue, cold square", "red again"]
    assert [s["__key__"] for s in samples] == ["00000000", "00000001", "00000003"]
    assert [s.get("cls") for s in samples] == [b"1", b"0", None]
    assert decode(samples[1]).getpixel((0, 0)) == (0, 0, 255)
    assert [json.loads(s["json"])["source"] for s in samples] == ["0", "1", "3"]  # no id column: the row number


def test_caption_table_id_column_is_the_source_name(tmp_path):
    Image.new("L", (4, 4), 9).save(tmp_path / "a.png")
    table = tmp_path / "t.jsonl"
    table.write_text('{"image": "a.png", "caption": "x", "id": "sku-17"}\n{"image": "a.png", "caption": "y"}\n'
                     '{"image": "a.png", "caption": "z", "id": 42}\n')
    write_shard_set(caption_table_source(table), tmp_path / "out", classes=[], source="t")
    metas = [json.loads(s["json"]) for s in read_set(tmp_path / "out")]
    assert [m["source"] for m in metas] == ["sku-17", "1", "42"] and metas[0]["path"] == "a.png"


def test_caption_table_labels_and_errors(tmp_path):
    Image.new("L", (4, 4), 9).save(tmp_path / "a.png")
    table = tmp_path / "t.jsonl"
    table.write_text('{"image": "a.png", "caption": "x", "label": 2}\n{"image": "a.png", "caption": "y", "label": 0}\n')
    assert caption_table_source(table).classes == ["0", "1", "2"]
    assert caption_table_source(table, ["a", "b", "c", "d"]).classes == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="out of range for 2 classes"):
        caption_table_source(table, ["a", "b"])
    (tmp_path / "t.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image'\]"):
        caption_table_source(tmp_path / "t.csv")
    (tmp_path / "t.xlsx").write_text("")
    with pytest.raises(ValueError, match="unknown table type"):
        caption_table_source(tmp_path / "t.xlsx")


# --- shard layout --------------------------------------------------------------------------------


@pytest.mark.parametrize(("multiple", "per_shard", "max_bytes", "expected"), [
    (4, 200, 0, [151, 150, 150, 150]),
    (3, 100, 0, [67] * 7 + [66] * 2),
    (4, 1000, 60_000, None),  # the byte limit forces more shards: still a multiple of 4
])  # fmt: skip
def test_shard_multiple_gives_equal_shards(tmp_path, multiple, per_shard, max_bytes, expected):
    source = digits_source()
    manifest = write_shard_set(islice(source, 601), tmp_path / "s", classes=source.classes, source="digits",
                               samples_per_shard=per_shard, max_shard_bytes=max_bytes, shard_multiple=multiple)
    counts = [s.count for s in manifest.shards]
    assert len(counts) % multiple == 0 and max(counts) - min(counts) <= 1 and sum(counts) == 601
    assert max(counts) <= per_shard
    if expected is not None:
        assert counts == expected
    if max_bytes:
        assert len(counts) > 4 and all(s.bytes <= max_bytes for s in manifest.shards)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted([*(s.name for s in manifest.shards),
                                                                        "manifest.json", MARKER_NAME])
    assert [s["__key__"] for s in read_set(tmp_path / "s")] == [f"{i:08d}" for i in range(601)]
    assert verify(tmp_path / "s").ok


def test_recut_shards_equal_a_direct_write(tmp_path):
    """Re-cutting copies tar blocks: the result is byte-identical to writing those counts directly."""
    source = digits_source()
    recut = write_shard_set(islice(source, 600), tmp_path / "a", classes=source.classes, source="x",
                            samples_per_shard=200, shard_multiple=4)
    direct = write_shard_set(islice(source, 600), tmp_path / "b", classes=source.classes, source="x",
                             samples_per_shard=150)
    assert [s.count for s in recut.shards] == [150] * 4
    assert recut.shards == direct.shards


def test_shard_multiple_larger_than_the_data(tmp_path):
    source = digits_source()
    with pytest.raises(ValueError, match="cannot cut 3 samples into a multiple of 4"):
        write_shard_set(islice(source, 3), tmp_path / "s", classes=source.classes, source="x", shard_multiple=4)
    assert not (tmp_path / "s").exists()


def test_max_shard_bytes(tmp_path):
    source = digits_source()
    manifest = write_shard_set(source, tmp_path / "s", classes=source.classes, source="x", max_shard_bytes=200_000)
    assert all(s.bytes <= 200_000 for s in manifest.shards)
    assert all(s.bytes == (tmp_path / "s" / s.name).stat().st_size for s in manifest.shards)
    assert len(manifest.shards) == -(-1797 // manifest.shards[0].count)  # full shards, then the rest


def test_jpg_encoding(tmp_path):
    y, x = np.mgrid[0:32, 0:32]
    smooth = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)
    samples = [RawSample(f"{i:08d}", Image.fromarray(smooth), None, None, {}) for i in range(3)]
    sizes, errors = {}, {}
    for quality in (95, 10):
        out = tmp_path / f"q{quality}"
        manifest = write_shard_set(samples, out, classes=[], source="gradient", encoding="jpg", jpg_quality=quality)
        assert manifest.encoding == "jpg" and manifest.image_mode == "RGB"
        stored = read_set(out)
        assert all("jpg" in s and "png" not in s for s in stored)
        image = decode(stored[0])
        assert image.format == "JPEG" and image.mode == "RGB"
        sizes[quality] = len(stored[0]["jpg"])
        errors[quality] = np.abs(np.asarray(image, dtype=float) - smooth).mean()
    assert errors[95] < 2.0 < errors[10] and sizes[10] < sizes[95]
    gray = write_shard_set([RawSample("00000000", Image.fromarray(np.ascontiguousarray(smooth[..., 0])))], tmp_path / "g",
                           classes=[], source="g", encoding="jpg")
    assert gray.image_mode == "L" and decode(read_set(tmp_path / "g")[0]).mode == "L"


def test_val_split_is_deterministic(tmp_path):
    source = digits_source()

    def keys(seed: int, out: str) -> dict[str, set[str]]:
        sets = write_split_shard_sets(islice(source, 600), tmp_path / out, val_fraction=0.2, seed=seed,
                                      classes=source.classes, source="digits", samples_per_shard=200)
        assert {m.split for m in sets.values()} == {"train", "val"}
        return {split: {s["__key__"] for s in read_set(tmp_path / out / split)} for split in sets}

    a, again, other = keys(0, "a"), keys(0, "b"), keys(1, "c")
    assert a == again and a != other
    assert not a["train"] & a["val"] and len(a["train"] | a["val"]) == 600
    assert 0.12 < len(a["val"]) / 600 < 0.28
    labels = Counter(int(s["cls"]) for s in read_set(tmp_path / "a" / "val"))
    assert len(labels) == 10  # every class is represented in val


def test_interrupted_writer_leaves_nothing(tmp_path):
    source = digits_source()

    def failing():
        for i, sample in enumerate(source):
            if i == 400:
                raise RuntimeError("source died")
            yield sample

    with pytest.raises(RuntimeError, match="source died"):
        write_shard_set(failing(), tmp_path / "new", classes=source.classes, source="x", samples_per_shard=150)
    assert list(tmp_path.iterdir()) == []  # no shard (complete or not), no manifest, no temporary

    old = write_shard_set(islice(source, 100), tmp_path / "old", classes=source.classes, source="x")
    with pytest.raises(RuntimeError):
        write_split_shard_sets(failing(), tmp_path / "split", val_fraction=0.5, classes=source.classes, source="x")
    with pytest.raises(RuntimeError):
        write_shard_set(failing(), tmp_path / "old", classes=source.classes, source="x", overwrite=True)
    assert list((tmp_path / "split").rglob("*")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "split"]  # the earlier set is untouched
    assert load_manifest(tmp_path / "old") == old and verify(tmp_path / "old").ok


def test_writer_rejects_bad_samples_and_folders(tmp_path):
    image = Image.new("L", (2, 2))
    with pytest.raises(ValueError, match="without dots"):
        encode_sample(RawSample("a.b", image), [])
    with pytest.raises(ValueError, match="out of range for 2 classes"):
        encode_sample(RawSample("k", image, label=2), ["a", "b"])
    with pytest.raises(ValueError, match="duplicate sample key"):
        write_shard_set([RawSample("k", image), RawSample("k", image)], tmp_path / "d", classes=[], source="x")
    with pytest.raises(ValueError, match="no samples"):
        write_shard_set([], tmp_path / "e", classes=[], source="x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="vitssl did not write"):
        write_shard_set([RawSample("k", image)], tmp_path / "mine", classes=[], source="x")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_digits_verify_info(tmp_path, capsys):
    out, grid = tmp_path / "digits", tmp_path / "grid.png"
    assert main(["write", "digits", "--out", str(out), "--samples-per-shard", "600", "--shard-multiple", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 4 shards, 1797 samples, 10 classes" in printed
    assert main(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["info", str(out), "--grid", str(grid), "--per-class", "3"]) == 0
    printed = capsys.readouterr().out
    assert "1797 in 4 shards" in printed and "seven" in printed
    with Image.open(grid) as png:
        assert png.format == "PNG" and png.width > 100 and png.height > 100


def test_cli_idx_folder_and_split(tmp_path, capsys):
    rng = np.random.default_rng(2)
    for prefix, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 6, 6)), gz=True)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz=False)
    out = tmp_path / "out"
    assert main(["write", "idx", str(tmp_path), "--classes", "mnist", "--out", str(out)]) == 0
    assert load_manifest(out / "train").total == 30 and load_manifest(out / "val").total == 10
    assert load_manifest(out / "val").classes[3] == "three"
    assert main(["verify", str(out)]) == 0  # a parent folder: verifies train and val
    assert capsys.readouterr().out.count("OK") == 2

    images = str(tmp_path / "train-images-idx3-ubyte.gz")
    labels = str(tmp_path / "train-labels-idx1-ubyte")
    code = main(["write", "idx", images, "--labels", labels, "--val-fraction", "0.3", "--out", str(tmp_path / "s")])
    assert code == 0
    assert load_manifest(tmp_path / "s" / "train").total + load_manifest(tmp_path / "s" / "val").total == 30


def test_cli_folder_captions_and_errors(tmp_path, capsys):
    make_folder(tmp_path / "imgs")
    assert main(["write", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "f"), "--encoding", "jpg"]) == 0
    assert "skipped 1 of 6" in capsys.readouterr().out
    assert load_manifest(tmp_path / "f").encoding == "jpg"
    table = make_table(tmp_path, "csv")
    assert main(["write", "captions", str(table), "--classes", "warm,cold", "--out", str(tmp_path / "c")]) == 0
    assert [s["cls"] for s in read_set(tmp_path / "c")[:2]] == [b"0", b"1"]

    assert main(["write", "idx", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert main(["write", "folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert main(["write", "digits", "--classes", "mnist", "--out", str(tmp_path / "x")]) == 2
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["write", "digits"])  # --out is required


def test_written_tar_is_plain_webdataset(tmp_path):
    """Members are named <key>.<ext> and readable by any tar reader."""
    source = digits_source()
    write_shard_set(islice(source, 2), tmp_path / "d", classes=source.classes, source="x")
    with tarfile.open(tmp_path / "d" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names == [f"00000000.{e}" for e in ("cls", "json", "png", "txt")] + \
        [f"00000001.{e}" for e in ("cls", "json", "png", "txt")]
    decoded = next(iter(wds.WebDataset(str(tmp_path / "d" / "shard-000000.tar"), shardshuffle=False).decode("pil")))
    assert decoded["png"].size == (8, 8) and decoded["cls"] == 0 and decoded["json"]["index"] == 0
    assert decoded["txt"] == "a handwritten digit zero"
