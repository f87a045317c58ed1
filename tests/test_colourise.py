"""The colour dataset (shards/colourise.py) and the CPU recipes on it with only data, channel and statistics
overrides: the small-scale check of issue 15's item 3 (the 10-minute runs are in docs/results.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image

from pretrain.recipe import load_recipe
from pretrain.trainer import train
from shards.__main__ import main as shards_main
from shards.colourise import TEXTURES, colourise_image, colourised, first, hue_name
from shards.sources import SOURCE_FIELD, digits_source
from shards.stream import ShardStream


def test_colourise_image_is_seeded_rgb_and_separates_object_from_background():
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (2, 2, 6, 6))  # a white square: the object
    a, style = colourise_image(mask, 32, np.random.default_rng(3))
    b, _ = colourise_image(mask, 32, np.random.default_rng(3))
    c, other = colourise_image(mask, 32, np.random.default_rng(4))
    assert a.mode == "RGB" and a.size == (32, 32)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert style["texture"] in TEXTURES and style["colour"] == hue_name(style["hue"])
    pixels = np.asarray(a, np.float32)
    inside, border = pixels[12:20, 12:20].reshape(-1, 3), pixels[:4].reshape(-1, 3)
    assert np.ptp(inside, axis=0).max() < 1.0  # the object is one flat colour
    assert np.abs(inside.mean(0) - border.mean(0)).max() > 20  # and stands apart from the background


def test_colourised_digits_keep_keys_labels_and_sources():
    plain = list(first(digits_source(), 50))
    styled = list(colourised(first(digits_source(), 50), size=24, seed=0, split="train"))
    again = list(colourised(first(digits_source(), 50), size=24, seed=0, split="train"))
    val = list(colourised(first(digits_source(), 50), size=24, seed=0, split="val"))
    assert len(plain) == len(styled) == 50
    for p, s, s2 in zip(plain, styled, again):
        assert (s.key, s.label, s.meta[SOURCE_FIELD]) == (p.key, p.label, p.meta[SOURCE_FIELD])
        assert s.image.mode == "RGB" and s.image.size == (24, 24)
        assert s.image.tobytes() == s2.image.tobytes()
        assert s.caption.startswith(f"a {s.meta['style']['colour']} ") and s.caption.endswith(" background")
    # another split draws other styles for the same positions
    assert sum(s.meta["style"] != v.meta["style"] for s, v in zip(styled, val)) >= 45
    # nuisances spread: every texture and a wide range of hues appear
    assert {s.meta["style"]["texture"] for s in styled} == set(TEXTURES)
    assert np.ptp([s.meta["style"]["hue"] for s in styled]) > 0.8


def test_first_and_size_are_checked():
    assert first(digits_source(), 10_000).count == 1797
    with pytest.raises(ValueError, match="limit 0"):
        first(digits_source(), 0)
    with pytest.raises(ValueError, match="size 4"):
        colourised(digits_source(), size=4)


@pytest.fixture(scope="module")
def colour_digits(tmp_path_factory) -> dict:
    """`python -m shards write digits --val-fraction 0.2 --limit 600 --colourise 32`, and its statistics."""
    out = tmp_path_factory.mktemp("colour") / "digits"
    assert shards_main(["write", "digits", "--val-fraction", "0.2", "--limit", "600", "--colourise", "32",
                        "--samples-per-shard", "200", "--out", str(out)]) == 0
    images = np.concatenate([b["image"].numpy() for b in ShardStream(str(out / "train"), batch_size=256,
                                                                      shuffle=False).loader()])
    return {"out": out, "mean": images.mean((0, 2, 3)).tolist(), "std": images.std((0, 2, 3)).tolist(),
            "shape": images.shape[1:]}


def test_cli_writes_a_colour_shard_set(colour_digits):
    out = colour_digits["out"]
    manifests = [json.loads((out / s / "manifest.json").read_text()) for s in ("train", "val")]
    assert sum(m["total"] for m in manifests) == 600
    assert "colourised(" in manifests[0]["source"] and "[:600]" in manifests[0]["source"]
    assert colour_digits["shape"] == (3, 32, 32)
    # a colour dataset: the channels differ and the pixels spread well beyond grayscale digits on black
    assert min(colour_digits["mean"]) > 0.2 and max(colour_digits["std"]) > 0.1
    assert shards_main(["verify", str(out / "train")]) == 0


@pytest.mark.parametrize("recipe, objective", [("dino_vit_tiny_fmnist.yaml", "dino"), ("mae_vit_tiny_fmnist.yaml", "mae")])
def test_cpu_recipes_take_a_colour_dataset_with_data_overrides_only(colour_digits, tmp_path, recipe, objective):
    """The Fashion-MNIST recipes, told only where the data is, its channels and its statistics (the size stays:
    the 32-px images are cropped and resized to the recipe's 28), train on the colour digits: finite losses,
    3-channel patches, and the online k-NN reads them."""
    out, mean, std = colour_digits["out"], colour_digits["mean"], colour_digits["std"]
    overrides = [
        f"data.train={out / 'train'}", f"data.val={out / 'val'}", "model.in_chans=3",
        f"objective.{objective}.mean=[{','.join(f'{m:.4f}' for m in mean)}]",
        f"objective.{objective}.std=[{','.join(f'{s:.4f}' for s in std)}]",
        # test scale: a few small steps, no workers
        "data.batch_size=32", "data.num_workers=0", "data.shuffle_buffer=64", "run.max_steps=4",
        "run.progress=false", "run.trackers=[jsonl]", "run.log_every=1", f"run.out_dir={tmp_path / 'run'}",
        "eval.bank_samples=200", "eval.holdout=64", "eval.every_steps=2",
    ]
    result = train(load_recipe(ROOT / "recipes" / recipe, overrides))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert result.steps == 4 and len(losses) >= 4 and all(math.isfinite(v) for v in losses)
    knn = [r["knn_top1"] for r in rows if "knn_top1" in r]
    assert knn and all(0.0 <= v <= 1.0 for v in knn)
    assert result.collapse_alarms == []
