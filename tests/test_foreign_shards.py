"""Shard sets written by other tools (img2dataset-style: `00000.tar`, ... with `.jpg`/`.webp` + `.txt` + `.json`
(+ `.cls`), `00000_stats.json` and `00000.parquet` beside them, no manifest.json of ours) are read end to end
without conversion: verify, info, stats, the stream, `auto` in a recipe, a short DINO run, features, a probe and
a FAISS index.

The sets are built here with `tarfile` (not our writer) from scikit-learn digits colourised at 48 px, some cropped
to 40x48 (h x w), half stored as JPEG and half as lossy WebP."""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image

from downstream.features import embed_batch, extract_features
from downstream.probe import probe_checkpoint
from downstream.search import build_index, index_summary, query_index
from pretrain.backbone import data_stats
from pretrain.recipe import load_recipe
from pretrain.restore import load_backbone_from
from pretrain.trainer import train
from pretrain.transforms import eval_transform
from shards.__main__ import main as shards_main
from shards.colourise import colourise_image, first
from shards.info import info
from shards.sources import digits_source
from shards.stream import ShardStream, to_float_tensor
from shards.verify import verify

SIDE = 48  # colourised size; every third image is cropped to 40 rows: 40x48 (h x w)
PER_TAR = 24
TRAIN_TARS = 3  # 72 training samples
VAL_TARS = 1  # 24 validation samples, in a folder of their own
VAL_FIRST = 200  # the validation set's first digit index (train uses 0..71)


@dataclass(frozen=True)
class Item:
    """One sample as written, with what a reader should get back."""

    key: str
    shard: str
    ext: str
    data: bytes
    label: int
    caption: str
    pixels: np.ndarray  # the stored image decoded: (h, w, 3) uint8


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 1_700_000_000, 0o644
    tar.addfile(ti, io.BytesIO(data))


def _encode(image: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if ext == "jpg" else "WEBP", quality=90)
    return buf.getvalue()


def write_img2dataset_set(folder: Path, first_index: int, tars: int) -> list[Item]:
    """`tars` shards of PER_TAR colourised digits (indices from `first_index`), named and laid out as img2dataset
    writes them: keys f"{shard:05d}{n:04d}", members image / .txt / .json / .cls, `NNNNN_stats.json` and
    `NNNNN.parquet` beside each tar."""
    folder.mkdir(parents=True)
    digits = list(first(digits_source(), first_index + tars * PER_TAR))[first_index:]
    items: list[Item] = []
    for t in range(tars):
        shard = f"{t:05d}.tar"
        rows = []
        with tarfile.open(folder / shard, "w") as tar:
            for n, raw in enumerate(digits[t * PER_TAR : (t + 1) * PER_TAR]):
                i = first_index + t * PER_TAR + n
                image, style = colourise_image(raw.image, SIDE, np.random.default_rng(i))
                if i % 3 == 0:
                    image = image.crop((0, 4, SIDE, SIDE - 4))  # 48 wide, 40 high
                ext = "jpg" if i % 2 == 0 else "webp"
                data = _encode(image, ext)
                key = f"{t:05d}{n:04d}"
                caption = f"a {style['colour']} handwritten {raw.label} on a {style['texture']} background"
                meta = {"key": key, "url": f"https://example.com/digits/{i}.png", "caption": caption,
                        "width": image.width, "height": image.height, "original_width": 8, "original_height": 8,
                        "status": "success", "error_message": None, "exif": "{}"}
                _member(tar, f"{key}.{ext}", data)
                _member(tar, f"{key}.txt", caption.encode())
                _member(tar, f"{key}.json", json.dumps(meta).encode())
                _member(tar, f"{key}.cls", str(raw.label).encode("ascii"))
                pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                items.append(Item(key, shard, ext, data, int(raw.label), caption, pixels))
                rows.append(meta)
        stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0,
                 "duration": 0.5, "status_dict": {"success": len(rows)}}
        (folder / f"{t:05d}_stats.json").write_text(json.dumps(stats))
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:  # the parquet file is only there to be ignored
            continue
        pq.write_table(pa.Table.from_pylist(rows), str(folder / f"{t:05d}.parquet"))
    return items


def rgb_stats(items: list[Item]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over every pixel of every decoded image (pixel-weighted), in [0, 1]."""
    px = np.concatenate([it.pixels.reshape(-1, 3) for it in items]).astype(np.float64) / 255.0
    return px.mean(0), px.std(0)


@dataclass
class ForeignSets:
    train: Path
    val: Path
    train_items: list[Item]
    val_items: list[Item]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> ForeignSets:
    root = tmp_path_factory.mktemp("img2dataset")
    train_items = write_img2dataset_set(root / "train", 0, TRAIN_TARS)
    val_items = write_img2dataset_set(root / "val", VAL_FIRST, VAL_TARS)
    return ForeignSets(root / "train", root / "val", train_items, val_items)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    """A copy to damage or write into, leaving the shared set as another tool wrote it."""
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_the_set_is_laid_out_as_img2dataset_writes_it(foreign):
    names = {p.name for p in foreign.train.iterdir()}
    assert {"00000.tar", "00001.tar", "00002.tar", "00000_stats.json"} <= names
    assert "manifest.json" not in names and "stats.json" not in names
    items = foreign.train_items
    assert len(items) == TRAIN_TARS * PER_TAR and len({it.key for it in items}) == len(items)
    assert {it.ext for it in items} == {"jpg", "webp"}
    assert {it.pixels.shape for it in items} == {(40, 48, 3), (48, 48, 3)}
    assert {it.label for it in items} == set(range(10))


# ------------------------------------------------------------------------------------------------------- verify


def test_verify_accepts_a_foreign_set_and_notes_it_has_no_manifest(foreign, capsys):
    report = verify(foreign.train)
    assert report.ok, report.format()
    assert report.problems == []
    assert report.shards_checked == TRAIN_TARS and report.samples_checked == len(foreign.train_items)
    assert any("no manifest.json" in n for n in report.notes), report.notes
    assert shards_main(["verify", str(foreign.train)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and f"{len(foreign.train_items)} samples checked" in out


def test_verify_names_the_key_of_a_damaged_webp(foreign, tmp_path, capsys):
    folder = copy_of(foreign.train, tmp_path)
    victim = next(it for it in foreign.train_items if it.ext == "webp" and it.shard == "00001.tar")
    path = folder / victim.shard
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            _member(tar, name, data[: len(data) // 2] if name == f"{victim.key}.webp" else data)

    report = verify(folder)
    assert not report.ok
    assert report.bad_keys() == {(victim.shard, victim.key)}, report.format()
    assert "undecodable .webp" in report.problems[0].what
    assert report.samples_checked == len(foreign.train_items)
    assert shards_main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"key {victim.key}" in out and "FAILED" in out


# ---------------------------------------------------------------------------------------------- info and stats


def test_info_counts_every_sample_by_scanning(foreign, capsys):
    got = info(foreign.train)
    items = foreign.train_items
    assert not got.has_manifest
    assert got.total == len(items)
    assert got.per_shard == {f"{t:05d}.tar": PER_TAR for t in range(TRAIN_TARS)}
    assert got.classes == [str(i) for i in range(10)]
    assert got.per_class == {str(c): sum(it.label == c for it in items) for c in range(10)}
    assert got.has_captions and got.image_mode == "RGB"
    assert got.image_size == [] and got.encoding == "jpg+webp"  # two sizes and two formats: said, not guessed
    assert shards_main(["info", str(foreign.train)]) == 0
    out = capsys.readouterr().out
    assert f"samples: {len(items)} in {TRAIN_TARS} shards" in out and "size (h x w) mixed" in out


def test_stats_cli_measures_the_tars_and_saves_beside_them(foreign, tmp_path, capsys):
    items = foreign.train_items
    assert shards_main(["stats", str(foreign.train)]) == 0
    out = capsys.readouterr().out
    assert f"measured {len(items)} samples" in out and "RGB mean" in out and "L   mean" in out
    assert not (foreign.train / "stats.json").exists()  # nothing written without --save

    folder = copy_of(foreign.train, tmp_path)
    assert shards_main(["stats", str(folder), "--save"]) == 0
    saved = json.loads((folder / "stats.json").read_text())
    mean, std = rgb_stats(items)
    np.testing.assert_allclose(saved["channels"]["RGB"]["mean"], mean, atol=1e-3)
    np.testing.assert_allclose(saved["channels"]["RGB"]["std"], std, atol=1e-3)
    n_small = sum(it.pixels.shape[0] == 40 for it in items)
    assert saved["images"] == len(items) and saved["captions"] == len(items) and saved["unlabelled"] == 0
    assert saved["modes"] == {"RGB": len(items)}
    assert saved["sizes"] == {"48x48": len(items) - n_small, "40x48": n_small}
    assert saved["classes"] == {str(c): sum(it.label == c for it in items) for c in range(10)}
    assert not (folder / "manifest.json").exists()  # another tool's set stays as it was, plus stats.json


# ------------------------------------------------------------------------------------------------------ stream


def test_stream_yields_every_sample_once_with_labels_and_captions(foreign):
    expected = {it.key: it for it in foreign.train_items}
    stream = ShardStream(str(foreign.train), batch_size=1, shuffle=True, seed=3)  # mixed sizes: one per batch
    assert stream.total == len(expected) and len(stream.shards) == TRAIN_TARS
    seen: list[str] = []
    for batch in stream.loader():
        key = batch["key"][0]
        it = expected[key]
        assert not batch["pad"][0] and batch["skipped"] == 0
        assert int(batch["label"][0]) == it.label and batch["caption"][0] == it.caption
        torch.testing.assert_close(batch["image"][0], to_float_tensor(Image.fromarray(it.pixels)), rtol=0, atol=0)
        seen.append(key)
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    assert seen != [it.key for it in foreign.train_items]  # shuffled, yet complete
    assert {expected[k].ext for k in seen} == {"jpg", "webp"}


# -------------------------------------------------------------------------------------------- training (auto)


@pytest.fixture(scope="module")
def trained(foreign, tmp_path_factory):
    """recipes/dino_vit_tiny_own.yaml (everything about the data `auto`) on the foreign set: 2 steps."""
    out = tmp_path_factory.mktemp("dino-foreign") / "run"
    recipe = load_recipe(ROOT / "recipes" / "dino_vit_tiny_own.yaml", [
        f"data.train={foreign.train}", f"run.out_dir={out}", "data.val=", "run.max_steps=2", "data.batch_size=16",
        "data.num_workers=0", "data.shuffle_buffer=64", "run.visualize=false", "run.progress=false",
        "run.trackers=[jsonl]", "run.log_every=1", "run.max_minutes=0", "run.fit_to_max_minutes=false",
        "run.checkpoint_every_minutes=0", "eval.enabled=false", "objective.dino.out_dim=256",
        "objective.dino.hidden_dim=128",
    ])
    return recipe, train(recipe), out


def test_auto_recipe_reads_a_foreign_set_and_trains(foreign, trained):
    recipe, result, out = trained
    mean, std = rgb_stats(foreign.train_items)
    assert recipe.model.in_chans == 3
    assert recipe.model.img_size == 48  # 48 px images outnumber 40x48 ones: the median shorter side is 48
    assert recipe.objective.dino.local_crop_size == 24  # 48 * 96/224 = 20.6, to the nearest multiple of 8
    np.testing.assert_allclose(recipe.objective.dino.mean, mean, atol=1e-3)
    np.testing.assert_allclose(recipe.objective.dino.std, std, atol=1e-3)
    assert "a scan of" in recipe.auto_note and str(foreign.train) in recipe.auto_note  # no manifest, no stats.json

    assert result.steps == 2 and math.isfinite(result.final_loss) and result.skipped_samples == 0
    assert result.backbone_dir is not None
    assert (out / "backbone" / "model.safetensors").is_file() and (out / "backbone" / "config.json").is_file()
    backbone = load_backbone_from(out)
    assert tuple(backbone.patch_embed.img_size) == (48, 48) and backbone.patch_embed.proj.in_channels == 3
    got_mean, got_std = data_stats(backbone)
    np.testing.assert_allclose(got_mean, recipe.objective.dino.mean, atol=1e-6)
    np.testing.assert_allclose(got_std, recipe.objective.dino.std, atol=1e-6)


# ------------------------------------------------------------------------------------------------- downstream


def test_features_of_a_foreign_set_match_a_direct_forward(foreign, trained):
    _, _, out = trained
    model = load_backbone_from(out)
    items = foreign.train_items
    feats = extract_features(model, foreign.train, batch_size=32)
    assert len(feats) == len(items) and feats.num_skipped == 0
    assert feats.keys == [it.key for it in items]  # canonical order: tars by name, members in tar order
    assert feats.labels.tolist() == [it.label for it in items]
    assert feats.captions == [it.caption for it in items]
    assert feats.classes == [] and feats.num_classes == 10  # no manifest: classes from the largest label
    transform = eval_transform(48, 3, *data_stats(model))
    for n in (0, 1, 3):  # a 40x48 JPEG, a 48x48 WebP, a 40x48 WebP
        x = transform(Image.fromarray(items[n].pixels))[None]
        torch.testing.assert_close(feats.feats[n], embed_batch(model, x, "cls")[0], atol=1e-5, rtol=1e-4)


def test_probe_on_foreign_train_and_val_sets(foreign, trained, tmp_path):
    _, _, out = trained
    n_train, n_val = len(foreign.train_items), len(foreign.val_items)
    knn = probe_checkpoint(out, foreign.train, foreign.val, protocol="knn", k=5, out_dir=tmp_path / "eval")
    assert knn.num_train == n_train and knn.num_test == n_val and knn.num_classes == 10
    assert 0.0 <= knn.top1 <= 1.0 and sum(map(sum, knn.confusion_matrix)) == n_val
    assert json.loads((tmp_path / "eval" / "knn.json").read_text())["num_test"] == n_val

    linear = probe_checkpoint(out, foreign.train, foreign.val, protocol="dino", epochs=5, min_steps=20,
                              base_lrs=(0.1,), weight_decays=(0.0,), max_grid_extensions=0, try_whiten=False)
    assert linear.num_train == n_train and linear.num_test == n_val
    assert 0.0 <= linear.top1 <= 1.0 and sum(map(sum, linear.confusion_matrix)) == n_val
    val_labels = [it.label for it in foreign.val_items]
    assert [sum(row) for row in linear.confusion_matrix] == [val_labels.count(c) for c in range(10)]


def test_faiss_index_of_a_foreign_set_finds_its_own_images(foreign, trained, tmp_path):
    _, _, out = trained
    items = foreign.train_items
    index = build_index(out, str(foreign.train), tmp_path / "index")
    assert len(index) == len(items)
    summary = index_summary(tmp_path / "index")
    assert summary["count"] == len(items) and summary["labelled"] == len(items)

    webp = next(it for it in items if it.ext == "webp")
    jpg = next(it for it in items if it.ext == "jpg" and it.pixels.shape[0] == 40)
    queries = []
    for it in (webp, jpg):
        path = tmp_path / f"{it.key}.{it.ext}"
        path.write_bytes(it.data)  # the stored file, as a user would query with it
        queries.append(path)
    result = query_index(tmp_path / "index", images=queries, keys=[webp.key], k=3)
    by_webp, by_jpg, by_key = result.hits
    for hits, it in ((by_webp, webp), (by_jpg, jpg)):
        top = hits[0]
        assert top["key"] == it.key and top["score"] == pytest.approx(1.0, abs=1e-4)
        assert top["label"] == it.label and top["caption"] == it.caption and top["shard"] == it.shard
        assert top["label_name"] is None  # no manifest, so no class names
    assert webp.key not in [h["key"] for h in by_key] and len(by_key) == 3
    assert [h["key"] for h in by_key] == [h["key"] for h in by_webp[1:3]] + [by_key[-1]["key"]]
