"""Your own data in one command: sized writers, stem keys, caption-table columns, parallel writing, dataset
statistics, and recipes that read `auto` values off the shards (issue: bring your own data)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pretrain.__main__ import main as pretrain_main
from pretrain.recipe import RecipeError, load_recipe, save_recipe
from shards.__main__ import main as shards_main
from shards.colourise import colourise_image
from shards.manifest import MANIFEST_NAME, load_manifest
from shards.resize import Resize
from shards.sources import DIGIT_NAMES, TableColumns, caption_table_source, digits_source, image_folder_source
from shards.tar import iter_tar_samples, list_shards, open_shard
from shards.writer import write_shard_set, write_split_shard_sets

ROOT = Path(__file__).resolve().parents[1]
OWN_RECIPE = ROOT / "recipes" / "dino_vit_tiny_own.yaml"


def colour_folder(root: Path, n: int, side: int = 24, broken: bool = False) -> Path:
    """ROOT/<digit name>/digit_<i>.jpg: colourised scikit-learn digits, some wider than tall."""
    for i, sample in enumerate(digits_source()):
        if i >= n:
            break
        image, _ = colourise_image(sample.image, side, np.random.default_rng(i))
        image = image.resize((side + (i % 3) * 4, side))
        folder = root / DIGIT_NAMES[sample.label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"digit_{i:04d}.jpg", quality=90)
    if broken:
        (root / "zero" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def stored(folder: Path) -> dict[str, Image.Image]:
    """key -> decoded image, every sample of a shard set."""
    out = {}
    for url, _ in list_shards(str(folder)):
        with open_shard(url) as f:
            for key, files in iter_tar_samples(f):
                ext = "png" if "png" in files else "jpg"
                out[key] = Image.open(io.BytesIO(files[ext])).convert("RGB")
    return out


def shard_hashes(folder: Path) -> list[tuple[str, str, int]]:
    return [(s.name, s.sha256, s.count) for s in load_manifest(folder).shards]


# --------------------------------------------------------------------------------------------- resizing


def test_resize_crop_pad_and_max_size():
    red, blue = (255, 0, 0), (0, 0, 255)
    wide = np.zeros((10, 20, 3), np.uint8)
    wide[:] = red
    wide[:, :5] = blue  # blue bands at both ends: cropped away by "crop", kept (smaller) by "pad"
    wide[:, 15:] = blue
    image = Image.fromarray(wide)
    crop = np.asarray(Resize(10, "crop")(image))
    assert crop.shape == (10, 10, 3) and (crop == red).all()  # the centre 10x10: no blue left
    pad = np.asarray(Resize(10, "pad")(image)).astype(int)
    assert pad.shape == (10, 10, 3)
    assert (pad[:2] == 0).all() and (pad[-2:] == 0).all()  # 10x5 content, black bars above and below
    assert pad[5, 0, 2] > 200 and pad[5, 5, 0] > 200  # blue at the edge, red in the middle
    shrunk = Resize(max_size=10)(Image.new("RGB", (40, 20)))
    assert shrunk.size == (10, 5)
    small = Image.new("L", (6, 4))
    assert Resize(max_size=10)(small) is small and Resize(6)(Image.new("L", (6, 6))).size == (6, 6)
    with pytest.raises(ValueError, match="not both"):
        Resize(8, max_size=16)
    with pytest.raises(ValueError, match="fit"):
        Resize(8, "stretch")


def test_write_folder_at_a_size_records_it_and_its_statistics(tmp_path, capsys):
    photos = colour_folder(tmp_path / "photos", 30)
    out = tmp_path / "pad"
    assert shards_main(["write", "folder", str(photos), "--out", str(out), "--size", "16", "--fit", "pad"]) == 0
    m = load_manifest(out)
    assert (m.image_size, m.image_mode, m.resize) == ([16, 16], "RGB", "pad 16")
    assert m.stats["sizes"] == {"16x16": 30} and m.stats["images"] == 30
    images = stored(out)
    pixels = np.stack([np.asarray(im, np.float64) / 255 for im in images.values()])
    assert m.stats["channels"]["RGB"]["mean"] == pytest.approx(pixels.mean(axis=(0, 1, 2)), abs=1e-4)
    assert m.stats["channels"]["RGB"]["std"] == pytest.approx(pixels.std(axis=(0, 1, 2)), abs=1e-4)
    luminance = np.stack([np.asarray(im.convert("L"), np.float64) / 255 for im in images.values()])
    assert m.stats["channels"]["L"]["mean"] == pytest.approx([luminance.mean()], abs=1e-4)
    per_class = {name: len(list((photos / name).glob("*.jpg"))) for name in sorted(p.name for p in photos.iterdir())}
    assert m.stats["classes"] == per_class and m.stats["unlabelled"] == 0
    assert "RGB mean" in capsys.readouterr().out  # the writer prints the statistics
    # --max-size keeps small images as they are and the aspect of large ones
    assert shards_main(["write", "folder", str(photos), "--out", str(tmp_path / "max"), "--max-size", "26"]) == 0
    sizes = load_manifest(tmp_path / "max").stats["sizes"]
    assert sizes == {"24x24": 10, "22x26": 10, "20x26": 10}  # 24x28 -> 26/28: 22x26; 24x32 -> 20x26 (h x w)


# --------------------------------------------------------------------------------------------- keys


def test_stem_keys_and_refused_duplicates(tmp_path):
    photos = colour_folder(tmp_path / "photos", 12)
    source = image_folder_source(photos, key="stem")
    m = write_shard_set(source, tmp_path / "stems", classes=source.classes, source=source.description)
    assert sorted(stored(tmp_path / "stems")) == sorted(p.stem for p in photos.rglob("*.jpg")) and m.total == 12
    # the same file under two classes: two samples, one key
    (photos / "one" / "digit_0000.jpg").write_bytes((photos / "zero" / "digit_0000.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"'digit_0000'.*--key index"):
        image_folder_source(photos, key="stem")
    assert image_folder_source(photos).count == 13  # index keys still work
    (photos / "two" / "my photo.v2.jpg").write_bytes(b"")
    (photos / "one" / "digit_0000.jpg").unlink()
    with pytest.raises(ValueError, match="cannot be keys"):
        image_folder_source(photos, key="stem")


def test_same_image_gets_the_same_stem_key_from_a_folder_and_a_table(tmp_path):
    photos = colour_folder(tmp_path / "photos", 6)
    rows = [{"path": p.relative_to(tmp_path).as_posix(), "text": f"photo {p.stem}"} for p in sorted(photos.rglob("*.jpg"))]
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cols = TableColumns(image="path", caption="text")
    from_table = stored_keys(caption_table_source(table, key="stem", columns=cols), tmp_path / "t")
    from_folder = stored_keys(image_folder_source(photos, key="stem"), tmp_path / "f")
    assert from_table == from_folder == sorted(p.stem for p in photos.rglob("*.jpg"))


def stored_keys(source, out: Path) -> list[str]:
    write_shard_set(source, out, classes=source.classes, source=source.description)
    return sorted(stored(out))


# --------------------------------------------------------------------------------------------- caption tables


def test_caption_table_columns_in_every_format(tmp_path, capsys):
    """A TSV whose columns are path, caption, label is read with --image-col; CSV, TSV, JSONL and Parquet copies of
    the same table give the same shards byte for byte."""
    photos = colour_folder(tmp_path / "photos", 8)
    rows = [{"path": p.relative_to(tmp_path).as_posix(), "caption": f"a {p.parent.name}", "label": p.parent.name}
            for p in sorted(photos.rglob("*.jpg"))]
    tsv = tmp_path / "pairs.tsv"
    with open(tsv, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "caption", "label"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    assert shards_main(["write", "captions", str(tsv), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) ['image']" in err and "--image-col" in err
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    hashes = []
    for suffix in ("tsv", "csv", "jsonl", "parquet"):
        out = tmp_path / suffix
        assert shards_main(["write", "captions", str(tmp_path / f"pairs.{suffix}"), "--out", str(out),
                            "--image-col", "path"]) == 0
        hashes.append([(s.sha256, s.count) for s in load_manifest(out).shards])
        assert load_manifest(out).has_captions and load_manifest(out).total == 8
    assert all(h == hashes[0] for h in hashes)
    # no caption column: a labelled image list
    assert shards_main(["write", "captions", str(tsv), "--out", str(tmp_path / "nocap"), "--image-col", "path",
                        "--caption-col", ""]) == 0
    m = load_manifest(tmp_path / "nocap")
    assert not m.has_captions and m.stats["captions"] == 0 and sum(m.stats["classes"].values()) == 8


# --------------------------------------------------------------------------------------------- parallel


def test_parallel_write_equals_serial_byte_for_byte(tmp_path):
    photos = colour_folder(tmp_path / "photos", 60, broken=True)
    options = {"samples_per_shard": 16, "resize": Resize(16), "val_fraction": 0.3, "seed": 1}
    manifests = {}
    for workers in (1, 2):
        source = image_folder_source(photos)
        manifests[workers] = write_split_shard_sets(source, tmp_path / f"w{workers}", classes=source.classes,
                                                    source="photos", workers=workers, **options)
        assert source.skipped == 1  # the broken file, counted wherever it was opened
    for split in ("train", "val"):
        a, b = manifests[1][split], manifests[2][split]
        assert a.to_json() == b.to_json()  # shards (sha256), counts, statistics
        for s in a.shards:
            assert (tmp_path / "w1" / split / s.name).read_bytes() == (tmp_path / "w2" / split / s.name).read_bytes()
    assert manifests[1]["train"].skipped == 1 and manifests[1]["train"].total + manifests[1]["val"].total == 60


# --------------------------------------------------------------------------------------------- stats CLI


def test_stats_cli_recomputes_and_saves(tmp_path, capsys):
    photos = colour_folder(tmp_path / "photos", 20)
    out = tmp_path / "set"
    assert shards_main(["write", "folder", str(photos), "--out", str(out), "--size", "16"]) == 0
    written = load_manifest(out).stats
    # a manifest from before statistics: stats re-measures exactly what the writer measured
    data = json.loads((out / MANIFEST_NAME).read_text())
    data.pop("stats")
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    capsys.readouterr()
    assert shards_main(["stats", str(out), "--save"]) == 0
    assert "RGB mean" in capsys.readouterr().out
    assert load_manifest(out).stats == written
    assert shards_main(["stats", str(out), "--limit", "5"]) == 0
    assert "measured 5 samples" in capsys.readouterr().out
    assert shards_main(["verify", str(out)]) == 0  # --save changed no shard


# --------------------------------------------------------------------------------------------- auto


@pytest.fixture(scope="module")
def own_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    photos = colour_folder(root / "photos", 240)  # ~180 train images: more than the recipe's batch of 128
    assert shards_main(["write", "folder", str(photos), "--out", str(root / "data"), "--size", "32",
                        "--val-fraction", "0.25", "--workers", "2"]) == 0
    return root / "data"


def test_auto_resolves_from_the_manifest_and_the_last_layer_decides(own_shards, tmp_path):
    train = own_shards / "train"
    stats = load_manifest(train).stats
    r = load_recipe(OWN_RECIPE, [f"data.train={train}"])
    assert (r.model.in_chans, r.model.img_size, r.objective.dino.local_crop_size) == (3, 32, 16)
    assert r.objective.dino.mean == stats["channels"]["RGB"]["mean"] and len(r.objective.dino.std) == 3
    assert "model.in_chans=3" in r.auto_note and str(train / MANIFEST_NAME) in r.auto_note
    # a later concrete value wins over the recipe's auto; the statistics follow the channel count
    gray = load_recipe(OWN_RECIPE, [f"data.train={train}", "model.in_chans=1", "model.img_size=24"])
    assert gray.model.in_chans == 1 and gray.objective.dino.mean == stats["channels"]["L"]["mean"]
    assert gray.objective.dino.local_crop_size == 8  # 24 x 96/224 = 10.3 -> the nearest multiple of 8
    # and an override may say auto where the recipe has numbers
    fm = load_recipe(ROOT / "recipes" / "mae_vit_tiny_fmnist.yaml",
                     [f"data.train={train}", "model.in_chans=auto", "objective.mae.mean=auto", "objective.mae.std=auto"])
    assert fm.model.in_chans == 3 and fm.objective.mae.mean == stats["channels"]["RGB"]["mean"]
    # the saved recipe holds numbers: loading it back needs no data and gives the same recipe
    save_recipe(r, tmp_path / "recipe.yaml")
    saved = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert saved["model"]["in_chans"] == 3 and saved["objective"]["dino"]["mean"] == r.objective.dino.mean
    assert load_recipe(tmp_path / "recipe.yaml").to_dict() == r.to_dict()
    with pytest.raises(RecipeError, match="data.train is not set"):
        load_recipe(OWN_RECIPE, ['data.train=""'])
    with pytest.raises(RecipeError, match="only model.in_chans"):
        load_recipe(OWN_RECIPE, [f"data.train={train}", "optim.base_lr=auto"])


def test_auto_scans_shards_without_statistics(own_shards, tmp_path):
    """Shards without a manifest of ours (another tool's): `auto` measures the first samples of each tar."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for s in load_manifest(own_shards / "train").shards:
        (foreign / s.name).write_bytes((own_shards / "train" / s.name).read_bytes())
    r = load_recipe(OWN_RECIPE, [f"data.train={foreign}"])
    assert (r.model.in_chans, r.model.img_size) == (3, 32) and "a scan of" in r.auto_note
    expected = load_manifest(own_shards / "train").stats["channels"]["RGB"]["mean"]
    assert r.objective.dino.mean == pytest.approx(expected, abs=2e-3)  # fewer samples than the whole set, or all


def test_a_folder_of_colour_photos_trains_with_only_data_and_out_dir(own_shards, tmp_path, capsys):
    """Done means: folder -> shards (above) -> a trained run, overriding only the data and the output folder
    (plus a step cap so that the test is short)."""
    out = tmp_path / "run"
    data = [f"data.train={own_shards / 'train'}", f"data.val={own_shards / 'val'}"]
    assert pretrain_main([str(OWN_RECIPE), *data, f"run.out_dir={out}", "data.batch_size=4096"]) == 2
    assert "fewer than batch_size=4096" in capsys.readouterr().err  # too little data: said, before any compute
    code = pretrain_main([str(OWN_RECIPE), f"data.train={own_shards / 'train'}", f"data.val={own_shards / 'val'}",
                          f"run.out_dir={out}", "run.max_steps=2"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["model"]["in_chans"] == 3 and saved["model"]["img_size"] == 32
    assert (out / "backbone" / "config.json").is_file()


# --------------------------------------------------------------------------------------------- export


def test_export_writes_the_set_back_as_a_folder_that_writes_the_same_images(tmp_path, capsys):
    photos = colour_folder(tmp_path / "photos", 12)
    assert shards_main(["write", "folder", str(photos), "--out", str(tmp_path / "set"), "--size", "16"]) == 0
    assert shards_main(["export", str(tmp_path / "set"), "--out", str(tmp_path / "back")]) == 0
    assert "wrote 12 images" in capsys.readouterr().out
    back = sorted((tmp_path / "back").rglob("*.png"))
    assert [p.parent.name for p in back] == [p.parent.name for p in sorted(photos.rglob("*.jpg"))]
    originals = stored(tmp_path / "set")
    for path in back:  # lossless: the pixels the shards hold, under their class and key
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(originals[path.stem]))
    assert shards_main(["export", str(tmp_path / "set"), "--out", str(tmp_path / "back")]) == 2  # never overwrites
