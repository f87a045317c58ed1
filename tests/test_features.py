"""Feature extraction: values, pooling, exactly-once over ranks (real 2-process gloo run), the cache, bad input."""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers import torchrun_two_cpu
from safetensors.torch import load_file

import downstream.features as features
from downstream.features import FeatureError, extract_features, load_labelled_features
from pretrain.backbone import create_backbone, data_stats, export_backbone, fingerprint
from pretrain.recipe import ModelConfig
from pretrain.transforms import eval_transform
from shards.sources import DIGIT_NAMES, RawSample, digits_source
from shards.writer import write_shard_set

N_DIGITS = 1797


def tiny_backbone(in_chans: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(img_size=8, patch_size=4, in_chans=in_chans, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    return create_backbone(cfg).eval()


@pytest.fixture(scope="module")
def digit_images() -> list:
    return [s.image for s in digits_source()]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """The first 400 digits as 4 shards (for the cache tests, which never damage the shards)."""
    source = digits_source()
    out = tmp_path_factory.mktemp("small") / "digits400"
    write_shard_set((s for s in source if int(s.key) < 400), out, classes=source.classes, source="digits 0..399",
                    samples_per_shard=100)
    return out


def direct_forward(model, images) -> torch.Tensor:
    """Tokens of a plain forward of the images, transformed as the extractor must transform them."""
    transform = eval_transform(8, 1, *data_stats(model))
    with torch.no_grad():
        return model.forward_features(torch.stack([transform(im) for im in images]))


def test_values_equal_a_direct_forward_for_each_pooling(digits_shards, digit_images):
    model = tiny_backbone()
    tokens = direct_forward(model, digit_images)
    cls = extract_features(model, digits_shards, pooling="cls", batch_size=200)
    assert cls.feats.shape == (N_DIGITS, 32) and not cls.cached
    torch.testing.assert_close(cls.feats, tokens[:, 0], rtol=1e-5, atol=1e-5)
    assert cls.labels.tolist() == [s.label for s in digits_source()]
    assert cls.keys == [f"{i:08d}" for i in range(N_DIGITS)] and cls.indices.tolist() == list(range(N_DIGITS))
    assert cls.classes == DIGIT_NAMES and cls.captions[7] == "a handwritten digit seven"
    assert cls.rank_samples == [N_DIGITS] and cls.num_skipped == 0

    mean = extract_features(model, digits_shards, pooling="mean", batch_size=512)
    torch.testing.assert_close(mean.feats, tokens[:, model.num_prefix_tokens :].mean(1), rtol=1e-5, atol=1e-5)

    # last2: the normed CLS of each of the two blocks (DINO's probe input); the last one is the cls pooling.
    last2 = extract_features(model, digits_shards, pooling="last2", batch_size=300)
    assert last2.feats.shape == (N_DIGITS, 64)
    torch.testing.assert_close(last2.feats[:, 32:], cls.feats, rtol=1e-5, atol=1e-5)
    transform = eval_transform(8, 1, *data_stats(model))
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(torch.stack([transform(im) for im in digit_images[:50]])))
        first_block = model.norm(model.blocks[0](x))[:, 0]
    torch.testing.assert_close(last2.feats[:50, :32], first_block, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        last1 = features.embed_batch(model, torch.stack([transform(im) for im in digit_images[:50]]), "last1")
    torch.testing.assert_close(last1, cls.feats[:50], rtol=1e-5, atol=1e-5)


def test_pooling_and_precision_errors(digits_shards):
    model = tiny_backbone()
    with pytest.raises(FeatureError, match="use cls, mean or lastN"):
        extract_features(model, digits_shards, pooling="max")
    with pytest.raises(FeatureError, match="use cls, mean or lastN"):
        extract_features(model, digits_shards, pooling="last0")
    with pytest.raises(FeatureError, match="only 2 blocks"):
        extract_features(model, digits_shards, pooling="last3")
    with pytest.raises(FeatureError, match="precision='fp32'"):
        extract_features(model, digits_shards, precision="fp32")


def test_bf16_features_are_close_to_fp32_and_cached_apart(small_shards, tmp_path):
    model = tiny_backbone()
    full = extract_features(model, small_shards, cache_dir=tmp_path)
    half = extract_features(model, small_shards, cache_dir=tmp_path, precision="bf16")
    assert not half.cached and half.cache_path != full.cache_path
    assert half.feats.dtype == torch.float32
    torch.testing.assert_close(half.feats, full.feats, rtol=0.05, atol=0.05)


def _mtimes(f) -> tuple[int, int]:
    p = Path(f.cache_path)
    return p.stat().st_mtime_ns, p.with_suffix(".json").stat().st_mtime_ns


def test_second_call_reads_the_cache_without_embedding(small_shards, tmp_path, monkeypatch):
    model = tiny_backbone()
    first = extract_features(model, small_shards, pooling="last2", cache_dir=tmp_path)
    assert not first.cached and Path(first.cache_path).is_file()
    assert Path(first.cache_path).parent == tmp_path and not list(tmp_path.glob("*.tmp"))
    before = _mtimes(first)

    def no_embedding(*args, **kwargs):
        raise AssertionError("the cache should have answered: nothing may be embedded")

    monkeypatch.setattr(features, "embed_batch", no_embedding)
    second = extract_features(model, small_shards, pooling="last2", cache_dir=tmp_path, batch_size=7)
    assert second.cached and _mtimes(second) == before
    assert torch.equal(second.feats, first.feats) and torch.equal(second.labels, first.labels)
    assert torch.equal(second.indices, first.indices)
    assert (second.keys, second.captions, second.classes) == (first.keys, first.captions, first.classes)
    assert second.to_dict() | {"cached": False} == first.to_dict()


def test_cache_is_never_used_for_other_weights_normalisation_pooling_or_data(small_shards, tmp_path):
    model = tiny_backbone()
    base = extract_features(model, small_shards, cache_dir=tmp_path)

    other = tiny_backbone()
    with torch.no_grad():
        other.blocks[1].mlp.fc2.bias[0] += 1e-3  # one weight, barely moved: another checkpoint all the same
    changed = extract_features(other, small_shards, cache_dir=tmp_path)
    assert not changed.cached and changed.fingerprint != base.fingerprint
    assert changed.cache_path != base.cache_path and not torch.equal(changed.feats, base.feats)

    renormed = tiny_backbone()
    renormed.pretrained_cfg = {**renormed.pretrained_cfg, "mean": (0.3,), "std": (0.2,)}
    moved = extract_features(renormed, small_shards, cache_dir=tmp_path)
    assert not moved.cached and moved.fingerprint == base.fingerprint and not torch.equal(moved.feats, base.feats)

    assert not extract_features(model, small_shards, cache_dir=tmp_path, pooling="mean").cached

    source = digits_source()
    subset = tmp_path / "subset"
    write_shard_set((s for s in source if int(s.key) < 300), subset, classes=source.classes, source="subset",
                    samples_per_shard=60)
    part = extract_features(model, subset, cache_dir=tmp_path)
    assert not part.cached and len(part) == 300
    torch.testing.assert_close(part.feats, base.feats[:300])
    # Shards given as a glob (no manifest consulted): keyed by the files themselves.
    globbed = extract_features(model, f"{subset}/*.tar", cache_dir=tmp_path)
    assert not globbed.cached and extract_features(model, f"{subset}/*.tar", cache_dir=tmp_path).cached
    # The original set, once more, still hits its own entry, also when the caller hands the fingerprint in.
    assert extract_features(model, small_shards, cache_dir=tmp_path).cached
    again = extract_features(model, small_shards, cache_dir=tmp_path, fingerprint=fingerprint(model))
    assert again.cached and again.cache_path == base.cache_path


@pytest.mark.parametrize("damage", ["truncate", "garbage_json", "mismatched_pair", "missing_json"])
def test_damaged_cache_is_recomputed(small_shards, tmp_path, damage):
    model = tiny_backbone()
    good = extract_features(model, small_shards, cache_dir=tmp_path)
    path = Path(good.cache_path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage_json":
        path.with_suffix(".json").write_text("{not json")
    elif damage == "mismatched_pair":  # as if a crash fell between the two renames of a rewrite
        side = json.loads(path.with_suffix(".json").read_text())
        side["write_id"] = "0" * 32
        path.with_suffix(".json").write_text(json.dumps(side))
    else:
        path.with_suffix(".json").unlink()
    with pytest.warns(UserWarning, match="unusable.*re-embedding"):
        again = extract_features(model, small_shards, cache_dir=tmp_path)
    assert not again.cached and again.cache_path == good.cache_path
    torch.testing.assert_close(again.feats, good.feats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten cache is whole again
        assert extract_features(model, small_shards, cache_dir=tmp_path).cached
    assert load_file(str(path))["feats"].shape == (400, 32)


def test_channel_and_resolution_mismatch_are_refused(digits_shards):
    with pytest.raises(FeatureError, match="takes 3-channel images but .* holds L images"):
        extract_features(tiny_backbone(in_chans=3), digits_shards)
    big = create_backbone(ModelConfig(img_size=64, patch_size=16, in_chans=1, embed_dim=32, depth=1, num_heads=2))
    with pytest.raises(FeatureError, match="8x8 images but the backbone expects 64x64"):
        extract_features(big, digits_shards)


def _unlabelled(tmp_path: Path, every: int) -> Path:
    """Digits 0..199 where every `every`-th sample has no label (every=1: none has one)."""
    def samples():
        for s in digits_source():
            if int(s.key) >= 200:
                return
            yield RawSample(s.key, s.image, None if int(s.key) % every == 0 else s.label, s.caption, s.meta)

    out = tmp_path / f"unlabelled{every}"
    write_shard_set(samples(), out, classes=[] if every == 1 else DIGIT_NAMES, source="test",
                    samples_per_shard=100)
    return out


def test_shards_without_labels_are_refused_when_labels_are_required(tmp_path):
    model = tiny_backbone()
    none = _unlabelled(tmp_path, 1)
    with pytest.raises(FeatureError, match="has no labels .*names no classes"):
        extract_features(model, none, require_labels=True)
    with pytest.raises(FeatureError, match="200 of 200 samples have no label"):
        extract_features(model, f"{none}/*.tar", require_labels=True)  # no manifest to tell: found on the way
    plain = extract_features(model, none)  # retrieval does not need labels
    assert plain.labels.tolist() == [-1] * 200
    some = _unlabelled(tmp_path, 50)
    with pytest.raises(FeatureError, match="4 of 200 samples have no label .*the first '00000000'"):
        extract_features(model, some, require_labels=True, cache_dir=tmp_path / "cache")
    assert not extract_features(model, some, cache_dir=tmp_path / "cache").cached  # fine without the need
    with pytest.raises(FeatureError, match="4 of 200"):  # a cache written without the check is checked on read
        extract_features(model, some, require_labels=True, cache_dir=tmp_path / "cache")


def test_load_labelled_features_from_an_exported_backbone(small_shards, tmp_path):
    model = tiny_backbone()
    export_backbone(model, tmp_path / "export", mean=(0.3,), std=(0.25,))
    got = load_labelled_features(tmp_path / "export", small_shards, pooling="mean", cache_dir=tmp_path / "c")
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.3,), "std": (0.25,)}
    want = extract_features(model, small_shards, pooling="mean")
    torch.testing.assert_close(got.feats, want.feats)
    assert got.fingerprint == want.fingerprint and got.pooling == "mean"
    assert got.to_dict()["count"] == 400 and got.num_classes == 10
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_labelled_features(tmp_path / "nowhere", small_shards)


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from safetensors.torch import save_file
    from downstream.features import extract_features
    from pretrain.backbone import load_backbone
    from pretrain.launch import make_accelerator

    export, shards, out = map(Path, sys.argv[1:4])
    acc = make_accelerator(cpu=True)
    model = load_backbone(export)
    runs = [extract_features(model, shards, pooling="last2", batch_size=100, accelerator=acc, cache_dir=out / "cache")
            for _ in range(2)]
    for i, f in enumerate(runs):
        name = f"run{i}_rank{acc.process_index}"
        save_file({"feats": f.feats, "labels": f.labels, "indices": f.indices}, str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps({"keys": f.keys, "cached": f.cached,
                                                      "rank_samples": f.rank_samples, "world": acc.num_processes}))
""")


@pytest.mark.multiprocess
def test_two_process_gloo_run_embeds_every_sample_once_in_order(digits_shards, tmp_path):
    model = tiny_backbone()
    export_backbone(model, tmp_path / "export")
    script = tmp_path / "embed_ranks.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    p = torchrun_two_cpu(script, str(tmp_path / "export"), str(digits_shards), str(out), timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]

    single = extract_features(model, digits_shards, pooling="last2", batch_size=64)
    for rank in (0, 1):
        meta = json.loads((out / f"run0_rank{rank}.json").read_text())
        got = load_file(str(out / f"run0_rank{rank}.safetensors"))
        assert meta["world"] == 2 and not meta["cached"]
        # Each rank embedded its own half (1797 = 898 + 899; rank 0's 899th row was a pad, dropped) ...
        assert meta["rank_samples"] == [898, 899]
        # ... and every rank holds every sample exactly once, in order, equal to the one-process result.
        assert got["indices"].tolist() == list(range(N_DIGITS)) and meta["keys"] == single.keys
        assert torch.equal(got["labels"], single.labels)
        torch.testing.assert_close(got["feats"], single.feats, rtol=1e-5, atol=1e-5)
        again = json.loads((out / f"run1_rank{rank}.json").read_text())
        assert again["cached"] and again["keys"] == single.keys  # the second call: every rank read the cache
        torch.testing.assert_close(load_file(str(out / f"run1_rank{rank}.safetensors"))["feats"], got["feats"])
    assert len(list((out / "cache").glob("*.safetensors"))) == 1
