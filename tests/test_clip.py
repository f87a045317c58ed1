"""CLIP: loss against hand computation, captions from class names, logit-scale clamp, accumulation refusal,
2 gloo ranks seeing the global batch, trainer steps, the open_clip export round trip, zero-shot and retrieval."""

from __future__ import annotations

import json
import math
import shutil
import socket
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import ROOT, TINY_VIT, torchrun_two_cpu
from PIL import Image
from safetensors.torch import load_file

from downstream.zeroshot import image_text_recall, load_clip, zeroshot, zeroshot_classifier
from pretrain.backbone import create_backbone
from pretrain.objectives import build_objective, known_objectives
from pretrain.objectives.clip import (
    CLIP,
    DEFAULT_TEMPLATES,
    export_open_clip,
    load_open_clip,
    template_index,
)
from pretrain.recipe import CLIPConfig, ModelConfig, RecipeError, load_recipe
from pretrain.restore import load_backbone_from
from pretrain.trainer import Trainer
from shards.ownership import MARKER_NAME
from shards.sources import RawSample, SampleSource
from shards.writer import write_shard_set

TINY = [
    "objective.name=clip",
    "model.img_size=8",
    *TINY_VIT,
    "objective.clip.embed_dim=32",
    "objective.clip.text_width=32",
    "objective.clip.text_heads=2",
    "objective.clip.text_layers=1",
    "objective.clip.text_context_length=16",
    "objective.clip.crop_scale=[1.0,1.0]",
    "optim.base_lr=4e-3",
    "optim.weight_decay=0.0",
    "data.batch_size=32",
    "data.num_workers=0",
    "run.progress=false",
    "run.trackers=[jsonl]",
    "run.log_every=1",
    "run.visualize=false",
]


def tiny_recipe(shards: Path, out: Path, *extra: str):
    return load_recipe(None, [*TINY, f"data.train={shards}", f"run.out_dir={out}", *extra])


def make_clip(img: int = 16, chans: int = 1, **cfg_kw) -> CLIP:
    torch.manual_seed(0)
    backbone = create_backbone(ModelConfig(img_size=img, patch_size=4, in_chans=chans, embed_dim=32, depth=2,
                                           num_heads=2, mlp_ratio=2.0))
    cfg = dict(embed_dim=24, text_width=32, text_heads=2, text_layers=2, text_context_length=16)
    cfg.update(cfg_kw)
    return CLIP(backbone, CLIPConfig(**cfg), captions="auto", class_names=["cat", "dog", "bird"], seed=3)


def toy_batch(n: int = 6, chans: int = 1, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(n, chans, size, size, generator=g),
        "caption": ["a red car", "", "a blue boat", "", "a red car", "two dogs on grass"][:n],
        "label": torch.tensor([-1, 0, -1, 2, -1, -1][:n]),
        "index": torch.arange(100, 100 + n),
        "key": [f"k{i}" for i in range(n)],
    }


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- the loss -------------------------------------------------------------------------------------------------


def test_loss_equals_direct_computation(no_network):
    model = make_clip()
    batch = toy_batch()
    loss, metrics = model(batch)
    captions = model.captions_for(batch)
    assert captions[0] == "a red car" and captions[1].endswith("cat.") and captions[3].endswith("bird.")
    # By hand: every caption through the text tower on its own (no de-duplication), cosine logits x 1/0.07.
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(captions)
    img = F.normalize(model.image_proj(model.backbone(batch["image"])), dim=-1)
    txt = F.normalize(model.text(tokens), dim=-1)
    logits = img @ txt.T / 0.07
    target = torch.arange(len(captions))
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6)
    # The gradient reaches every trainable parameter: both towers, the projection, the temperature.
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert float(model.logit_scale.grad) != 0.0


def test_captions_from_class_names_are_seeded_per_sample_and_epoch():
    model = make_clip()
    n_t = len(DEFAULT_TEMPLATES)
    batch = {"image": torch.zeros(64, 1, 16, 16), "label": torch.arange(64) % 3, "index": torch.arange(64),
             "caption": [""] * 64, "key": [str(i) for i in range(64)]}
    first = model.captions_for(batch)
    for i, c in enumerate(first):
        t = template_index(3, 0, i, n_t)
        assert c == DEFAULT_TEMPLATES[t].format(["cat", "dog", "bird"][i % 3])
    assert len({template_index(3, 0, i, n_t) for i in range(64)}) == n_t  # every template gets used
    # The draw depends on the sample index, not its position in the batch (resume/worker independent) ...
    shuffled = {k: (v.flip(0) if torch.is_tensor(v) else v[::-1]) for k, v in batch.items()}
    assert model.captions_for(shuffled) == first[::-1]
    # ... and changes with the epoch.
    model.on_epoch_start(1, 10)
    assert model.captions_for(batch) != first


def test_caption_modes_and_their_errors(digits_shards, tmp_path):
    model = make_clip()
    model.captions_mode = "captions"
    with pytest.raises(ValueError, match=r"without a caption: \['k1', 'k3'\]"):
        model.captions_for(toy_batch())
    model.captions_mode = "auto"
    bad = toy_batch()
    bad["label"][1] = -1
    with pytest.raises(ValueError, match="sample 'k1' has label -1 and no caption"):
        model.captions_for(bad)
    # auto mode follows the training manifest: digits carry captions, so the shards' text is used.
    obj = build_objective(tiny_recipe(digits_shards, tmp_path / "r"))
    assert obj.captions_mode == "captions" and obj.requires == ("caption",)
    assert obj.class_names[:2] == ["zero", "one"]
    obj = build_objective(tiny_recipe(digits_shards, tmp_path / "r", "objective.clip.captions=classes",
                                      "data.caption_templates=['a picture of {}']"))
    assert obj.requires == ("label",) and obj.templates == ("a picture of {}",)
    with pytest.raises(RecipeError, match="exactly one"):
        tiny_recipe(digits_shards, tmp_path / "r", "data.caption_templates=[no placeholder]")
    with pytest.raises(ValueError, match="text_vocab_size=1000 is smaller"):
        make_clip(text_vocab_size=1000)


def test_gradient_accumulation_is_refused(digits_shards, tmp_path):
    with pytest.raises(RecipeError, match=r"optim.accum_steps=2 is refused for objective clip.*"
                                          r"Raise data.batch_size, or add processes"):
        tiny_recipe(digits_shards, tmp_path / "r", "optim.accum_steps=2")
    assert "clip" in known_objectives()


def test_logit_scale_starts_at_1_over_0_07_and_is_clamped_at_100():
    model = make_clip()
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(7.0)  # exp(7) ~ 1097
    metrics = model.on_step_end(1, 10)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100.0))
    assert metrics["logit_scale"] == pytest.approx(100.0, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.on_step_end(2, 10)
    assert float(model.logit_scale.detach()) == 0.0
    # The temperature gets no weight decay (0-d), nor does the text position embedding.
    assert "text.positional_embedding" in model.no_weight_decay()


# --- export -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chans", [1, 3])
def test_open_clip_export_round_trip(tmp_path, no_network, chans):
    model = make_clip(chans=chans, proj_bias=chans == 3).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.5)
    folder = export_open_clip(model, tmp_path / "export")
    assert {p.name for p in folder.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors", "image_tower",
                                                MARKER_NAME}
    oc = open_clip.create_model(f"local-dir:{folder}").eval()  # open_clip alone, no code of this project
    assert type(oc).__name__ == "CustomTextCLIP"
    x = torch.randn(5, chans, 16, 16)
    captions = ["a photo of a cat.", "dog", "a bird on a wire", "", "x y z"]
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(captions)
    assert torch.equal(tokens, model.tokenize(captions))
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(x, normalize=True), model.encode_image(x, normalize=True))
        torch.testing.assert_close(oc.encode_text(tokens, normalize=True), model.encode_text(tokens, normalize=True))
    assert float(oc.logit_scale.detach()) == pytest.approx(3.5)
    # The image tower alone is a timm model timm rebuilds from its own config (with the training stats).
    trunk = timm.create_model(f"local-dir:{folder / 'image_tower'}", pretrained=False)
    assert trunk.pretrained_cfg["mean"] == list(model.mean) or tuple(trunk.pretrained_cfg["mean"]) == model.mean
    assert tuple(trunk.patch_embed.img_size) == (16, 16) and trunk.embed_dim == 32 and trunk.in_chans == chans
    # Moved elsewhere, `load_open_clip` re-points the tower and gives the same model.
    moved = Path(shutil.move(str(folder), str(tmp_path / "moved")))
    with pytest.raises(Exception):  # noqa: B017 - the absolute tower path in the config is gone
        open_clip.create_model(f"local-dir:{moved}")
    again = load_open_clip(moved)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(x), model.encode_image(x))
    assert not list(tmp_path.rglob("*.tmp"))


# --- training ---------------------------------------------------------------------------------------------------


def test_trainer_steps_with_class_name_captions_lower_the_loss(digits_shards, tmp_path, no_network):
    out = tmp_path / "run"
    trainer = Trainer(tiny_recipe(digits_shards, out, "objective.clip.captions=classes", "run.max_steps=40",
                                  "optim.warmup_steps=5"))
    result = trainer.fit()
    assert result.steps == 40
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < first - 0.3, f"loss {first:.3f} -> {last:.3f}"
    assert all(r["logit_scale"] <= 100.0 for r in rows)
    # The run leaves the timm backbone (every objective) and the whole model for open_clip.
    backbone = load_backbone_from(out)
    oc = load_open_clip(out / "open_clip")
    objective = trainer.unwrapped_objective.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(oc.visual.trunk(x), backbone(x))
        torch.testing.assert_close(oc.encode_image(x), objective.encode_image(x))


@pytest.mark.multiprocess
def test_two_gloo_processes_gather_the_global_batch_and_stay_in_sync(digits_shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    overrides = [*TINY, f"data.train={digits_shards}", f"run.out_dir={out}", "objective.clip.captions=classes",
                 "data.batch_size=8", "run.max_steps=3"]
    p = torchrun_two_cpu(ROOT / "tests" / "clip_two_rank.py", str(out), *overrides, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["global_batch"] == 16

    # One process on the concatenated batch (16 samples), same initial weights.
    reference = build_objective(load_recipe(None, overrides))
    reference.load_state_dict(load_file(str(out / "initial.safetensors")))
    batch = load_file(str(out / "batch.safetensors"))
    loss, _ = reference({**batch, "caption": [""] * 16, "key": [str(i) for i in range(16)]})
    loss.backward()
    full = float(loss.detach())
    for name in ranks[0]["loss"]:
        losses = [r["loss"][name] for r in ranks]
        if name.startswith("local1"):  # each rank: its rows against all columns; their mean is the global loss
            assert np.mean(losses) == pytest.approx(full, rel=1e-5), name
            assert losses[0] != pytest.approx(losses[1]), "the ranks' rows differ"
        else:  # each rank computes the whole global-batch loss
            assert losses == pytest.approx([full, full], rel=1e-5), name
    # With gathering through the gradient, DDP's averaged gradient IS the global-batch gradient.
    for name in ("local1_grad1", "local0_grad1"):
        grads = load_file(str(out / f"grads_{name}.safetensors"))
        for n, p in reference.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {n}")
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    assert ranks[0]["params"] == ranks[1]["params"], "DDP ranks diverged"


# --- zero-shot and retrieval ------------------------------------------------------------------------------------

TOY_CLASSES = ["black", "white", "striped"]


def toy_source(n: int, seed: int, captions: bool = False) -> SampleSource:
    """8x8 gray squares: black, white, or horizontal stripes, with a little noise."""
    rng = np.random.default_rng(seed)

    def generate(skip):
        for i in range(n):
            label = i % 3
            base = np.zeros((8, 8)) if label == 0 else np.full((8, 8), 255.0)
            if label == 2:
                base[::2] = 0
            pixels = np.clip(base + rng.normal(0, 20, (8, 8)), 0, 255).astype(np.uint8)
            yield RawSample(f"{i:06d}", Image.fromarray(pixels, "L"), label,
                            f"a {TOY_CLASSES[label]} square" if captions else None)

    return SampleSource("toy squares", TOY_CLASSES, n, generate)


@pytest.fixture(scope="module")
def toy_clip_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny CLIP trained on class-name captions of toy squares; held-out labelled and caption sets."""
    root = tmp_path_factory.mktemp("toy")
    for name, n, seed, caps in (("train", 480, 0, False), ("val", 60, 1, False), ("captions", 60, 2, True)):
        write_shard_set(toy_source(n, seed, caps), root / name, classes=TOY_CLASSES, source="toy", samples_per_shard=240)
    out = root / "run"
    Trainer(tiny_recipe(root / "train", out, "run.max_steps=60", "optim.warmup_steps=5",
                        "data.caption_templates=['a {} square', 'a photo of a {} square']")).fit()
    return out, root / "val", root / "captions"


def test_zeroshot_on_a_toy_set_with_a_known_answer(toy_clip_run, no_network):
    run, val, captions = toy_clip_run
    result = zeroshot(run, val, retrieval_shards=captions)
    d = result.to_dict()
    assert d["classes"] == TOY_CLASSES and d["num_samples"] == 60
    assert d["templates"] == ["a {} square", "a photo of a {} square"]  # the run's own prompts by default
    assert d["top1"] == 1.0, d["confusion_matrix"]
    assert d["per_class_accuracy"] == [1.0, 1.0, 1.0]
    r = d["retrieval"]
    assert r["num_images"] == 60 and r["num_texts"] == 3  # three distinct captions, 20 images each
    assert r["image_to_text"] == {"R@1": 1.0, "R@5": None, "R@10": None}  # only 3 texts to rank
    assert r["text_to_image"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    json.dumps(d)
    # Checkpoint and open_clip export are the same model: same scores either way.
    from pretrain.checkpoint import latest_checkpoint

    a, b = load_clip(latest_checkpoint(run)), load_clip(run / "open_clip")
    for names in (TOY_CLASSES, ["white", "black"]):
        torch.testing.assert_close(zeroshot_classifier(a, names, ["a {}"]), zeroshot_classifier(b, names, ["a {}"]))
    # The wrong prompt order gives a different (wrong) classifier: labels are checked against manifest names.
    wrong = zeroshot(run, val, class_names=["white", "black", "striped"])
    assert wrong.top1 < 0.5


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_image_embeddings_through_extract_features_equal_encode_image(tmp_path, pool):
    """zero-shot embeds images with downstream.features (pooled backbone features), then the CLIP head."""
    from downstream.features import extract_features
    from pretrain.transforms import eval_transform

    write_shard_set(toy_source(12, 5), tmp_path / "toy", classes=TOY_CLASSES, source="toy", samples_per_shard=6)
    model = make_clip(img=8)
    model.backbone.reset_classifier(0, global_pool=pool)
    clip = load_clip(export_open_clip(model.eval(), tmp_path / "export"))
    assert clip.pooling == {"token": "cls", "avg": "mean"}[pool]
    feats = extract_features(clip.backbone, tmp_path / "toy", pooling=clip.pooling)
    by_stream = clip.embed_images(feats.feats)
    direct_images = torch.stack([eval_transform(8, 1, model.mean, model.std)(s.image) for s in toy_source(12, 5)])
    with torch.no_grad():
        direct = model.encode_image(direct_images, normalize=True)
    torch.testing.assert_close(by_stream, direct, rtol=1e-4, atol=1e-5)


def test_image_text_recall_by_hand():
    texts = np.eye(3, dtype=np.float32)
    images = np.array([[0.9, 0.7, 0.0],   # caption 0: text 0 first (hit); but text 1 prefers image 0
                       [0.8, 0.6, 0.0],   # caption 1: text 0 ranks first, text 1 second
                       [0.0, 0.1, 0.9],   # caption 2
                       [0.1, 0.0, 0.95]],  # caption 2 too: text 2's best image
                      dtype=np.float32)
    r = image_text_recall(images, texts, [0, 1, 2, 2], ks=(1, 2, 4))
    assert r["image_to_text"] == {"R@1": 0.75, "R@2": 1.0, "R@4": None}  # only 3 texts
    assert r["text_to_image"] == {"R@1": pytest.approx(2 / 3), "R@2": 1.0, "R@4": 1.0}
    with pytest.raises(ValueError, match="text row"):
        image_text_recall(images, texts, [0, 1, 2, 3])


# --- recipes ----------------------------------------------------------------------------------------------------


def test_laion_recipe_is_paper_scale():
    from pretrain.backbone import backbone_config
    from pretrain.trainer import scaled_lr

    r = load_recipe(ROOT / "recipes" / "clip_vit_b16_laion.yaml")
    processes = 128  # the recipe's documented launch: 256 per process x 128 processes
    assert r.objective.name == "clip" and r.run.precision == "bf16"
    vit = backbone_config(r.model)
    assert (vit["embed_dim"], vit["depth"], vit["num_heads"], vit["patch_size"], vit["img_size"]) == (
        768, 12, 12, [16, 16], [224, 224])
    c = r.objective.clip
    assert (c.embed_dim, c.text_width, c.text_heads, c.text_layers, c.text_context_length, c.text_vocab_size) == (
        512, 512, 8, 12, 77, 49408)
    assert c.init_logit_scale == pytest.approx(math.log(1 / 0.07)) and c.max_logit_scale == 100.0
    assert c.local_loss and c.gather_with_grad and c.captions == "captions"
    global_batch = r.data.batch_size * processes * r.optim.accum_steps
    assert global_batch == 32768
    assert scaled_lr(r.optim.base_lr, global_batch) == pytest.approx(5e-4)  # the effective lr
    o = r.optim
    assert (o.name, o.betas, o.eps, o.weight_decay, o.warmup_steps) == ("adamw", [0.9, 0.98], 1e-6, 0.2, 2000)


def test_fmnist_recipe_fits_its_captions_and_builds():
    from shards.sources import resolve_classes

    r = load_recipe(ROOT / "recipes" / "clip_vit_tiny_fmnist.yaml")
    assert r.optim.accum_steps == 1 and r.run.precision == "no" and r.run.max_minutes == 30
    assert r.objective.clip.captions == "classes" and r.model.img_size == 28 and r.model.in_chans == 1
    model = CLIP(create_backbone(r.model), r.objective.clip, captions="classes",
                 class_names=resolve_classes("fashion-mnist"), templates=r.data.caption_templates)
    # Every caption fits the context: the end token is never cut off.
    captions = [t.format(c) for t in model.templates for c in model.class_names]
    assert bool((model.tokenize(captions) == 49407).any(dim=1).all())


def test_text_query_on_an_index_in_clip_space(toy_clip_run, tmp_path, no_network):
    """Index the toy squares in the CLIP run's joint space; a text query finds the squares it describes."""
    from downstream.retrieval import RetrievalError
    from downstream.search import build_index, query_index

    run, val, _ = toy_clip_run
    build_index(run, str(val), tmp_path / "index", space="clip")
    result = query_index(tmp_path / "index", texts=["a white square", "a striped square"], k=10,
                         sheet=tmp_path / "sheet.png")
    assert [h["label_name"] for h in result.hits[0]] == ["white"] * 10
    assert [h["label_name"] for h in result.hits[1]] == ["striped"] * 10
    assert all(a["score"] >= b["score"] for a, b in zip(result.hits[0], result.hits[0][1:]))
    assert (tmp_path / "sheet.png").read_bytes()[:4] == b"\x89PNG"
    build_index(run, str(val), tmp_path / "plain")  # backbone space: text has no meaning there
    with pytest.raises(RetrievalError, match="--space clip"):
        query_index(tmp_path / "plain", texts=["a white square"])
