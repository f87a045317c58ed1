"""Fine-tuning: the supervised objective through the one trainer, layer decay, Mixup/CutMix, position-embedding
resampling, refusals, evaluation and exact resume. Tiny backbone (dim 32, depth 2), real digits shards."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, torchrun_two_cpu
from PIL import Image
from safetensors.torch import load_file
from timm.loss import SoftTargetCrossEntropy

from downstream.finetune import FinetuneError, evaluate, finetune, finetune_recipe, load_finetuned
from pretrain.backbone import create_backbone, data_stats, export_backbone, sincos_2d_pos_embed
from pretrain.checkpoint import latest_checkpoint, list_checkpoints
from pretrain.objectives import build_objective
from pretrain.objectives.supervised import Supervised, resample_pos_embed
from pretrain.recipe import ModelConfig, SupervisedConfig, load_recipe
from pretrain.restore import load_backbone_from
from pretrain.trainer import Trainer
from shards.sources import RawSample, digits_source
from shards.writer import write_shard_set

QUIET = ["data.batch_size=32", "data.num_workers=0", "run.progress=false", "run.trackers=[jsonl]",
         "run.log_every=1", "run.visualize=false"]
TINY_MODEL = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def tiny_model(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY_MODEL, **kw})


@pytest.fixture(params=["learn", "sincos"])
def pretrained(request, tmp_path) -> Path:
    """An exported tiny backbone (random weights stand in for pretrained ones) with recorded data stats."""
    torch.manual_seed(0)
    model = create_backbone(tiny_model(pos_embed=request.param))
    if request.param == "learn":
        with torch.no_grad():
            model.pos_embed.normal_(std=0.5)  # a structured embedding, so resampling has something to move
    return export_backbone(model, tmp_path / f"pretrained-{request.param}", mean=(0.25,), std=(0.5,))


@pytest.fixture
def small_val(tmp_path) -> Path:
    """The first 200 digits as a labelled shard set: evaluation tests stay fast."""
    source = digits_source()
    out = tmp_path / "val"
    write_shard_set(itertools.islice(source, 200), out, classes=source.classes, source="digits[:200]")
    return out


def supervised_recipe(shards: Path, out: Path, *extra: str):
    model = [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    return load_recipe(None, [*model, *QUIET, "objective.name=supervised", f"data.train={shards}",
                              f"run.out_dir={out}", *extra])


# ------------------------------------------------------------------------------------------ position embedding


def test_pos_embed_resample_shapes_and_identity():
    model = create_backbone(tiny_model())  # 4x4 grid + cls
    with torch.no_grad():
        model.pos_embed.normal_()
    same = resample_pos_embed(model, (4, 4))
    assert torch.equal(same, model.pos_embed.detach())
    bigger = resample_pos_embed(model, (6, 6))
    assert bigger.shape == (1, 1 + 36, 32)
    assert torch.equal(bigger[:, :1], model.pos_embed.detach()[:, :1])  # the cls row is not interpolated
    assert resample_pos_embed(model, (4, 6)).shape == (1, 1 + 24, 32)
    # A smooth embedding survives a round trip up and back down almost unchanged.
    sincos = create_backbone(tiny_model(pos_embed="sincos"))
    torch.testing.assert_close(resample_pos_embed(sincos, (4, 4)), sincos_2d_pos_embed((4, 4), 32, 1))


@pytest.mark.parametrize("img_size", [16, 24])
def test_builder_loads_pretrained_weights_at_any_resolution(pretrained, digits_shards, tmp_path, img_size):
    source = load_backbone_from(pretrained)
    recipe = supervised_recipe(digits_shards, tmp_path / "run", f"model.img_size={img_size}",
                               f"objective.supervised.init_from={pretrained}")
    objective = build_objective(recipe)
    assert isinstance(objective, Supervised) and objective.num_classes == 10  # from the train manifest
    got, want = objective.backbone.state_dict(), source.state_dict()
    for k in want:
        if k != "pos_embed":
            torch.testing.assert_close(got[k], want[k], msg=k)
    grid = img_size // 4
    assert got["pos_embed"].shape == (1, 1 + grid * grid, 32)
    torch.testing.assert_close(got["pos_embed"], resample_pos_embed(source, (grid, grid)))
    assert objective.data_stats() == ((0.25,), (0.5,))  # the pretrained backbone's normalisation
    loss, metrics = objective({"image": torch.randn(3, 1, img_size, img_size), "label": torch.tensor([0, 4, 9])})
    assert torch.isfinite(loss) and set(metrics) == {"loss", "acc"}


# -------------------------------------------------------------------------------------------------- optimizer


def test_layer_decay_scales_block_lrs_as_timm(digits_shards, tmp_path):
    """timm's layers for a ViT of depth D: 0 = embeddings, 1..D = blocks (final norm with the last), D+1 = head;
    lr scale = layer_decay^(D + 1 - layer)."""
    decay, depth = 0.5, 2
    t = Trainer(supervised_recipe(digits_shards, tmp_path / "run", "optim.layer_decay=0.5", "optim.weight_decay=0.05"))
    logged = t.set_step_schedules(0)
    lr_of, wd_of = {}, {}
    names = {id(p): n for n, p in t.objective.named_parameters()}
    for g in t.optimizer.param_groups:
        for p in g["params"]:
            lr_of[names[id(p)]], wd_of[names[id(p)]] = g["lr"], g["weight_decay"]
    head = lr_of["head.weight"]
    assert head == pytest.approx(t.lr) and logged == pytest.approx(t.lr)  # the log shows the unscaled lr
    for name, lr in lr_of.items():
        if name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed")):
            layer = 0
        elif name.startswith("backbone.norm."):
            layer = depth
        else:
            assert name.startswith("head."), name
            layer = depth + 1
        assert lr == pytest.approx(head * decay ** (depth + 1 - layer)), name
    assert lr_of["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(head * decay**depth)
    assert wd_of["head.weight"] == 0.05 and wd_of["head.bias"] == 0.0
    assert wd_of["backbone.pos_embed"] == 0.0 and wd_of["backbone.cls_token"] == 0.0


# ---------------------------------------------------------------------------------------------- mixup / loss


def test_mixup_makes_soft_targets_and_the_loss_uses_them():
    torch.manual_seed(0)
    cfg = SupervisedConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    obj = Supervised(create_backbone(tiny_model()), cfg, num_classes=10)
    images = torch.randn(7, 1, 16, 16)  # odd: the last sample stays unmixed
    original = images.clone()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    np.random.seed(0)
    mixed, targets = obj.mix(images, labels)
    assert torch.equal(images, original), "the batch itself is not modified"
    assert targets.shape == (7, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(7))
    # Pairs (i, 5 - i) share their mass: both labels weigh more than the smoothing floor 0.01.
    for i in range(6):
        assert targets[i, labels[i]] > 0.01 and targets[i, labels[5 - i]] > 0.01
        assert targets[i].max() < 0.91 - 1e-4
    torch.testing.assert_close(targets[6], F.one_hot(torch.tensor(6), 10).float() * 0.9 + 0.01)
    assert not torch.equal(mixed[:6], original[:6]) and torch.equal(mixed[6], original[6])

    # forward in training mode: soft-target cross-entropy on the same mix (same numpy draw)
    obj.train()
    np.random.seed(1)
    torch.manual_seed(1)
    loss, _ = obj({"image": images, "label": labels})
    np.random.seed(1)
    torch.manual_seed(1)
    mixed, targets = obj.mix(images, labels)
    torch.testing.assert_close(loss, SoftTargetCrossEntropy()(obj.logits(mixed), targets))
    # eval mode: no mixing, plain label-smoothed cross-entropy
    obj.eval()
    loss, _ = obj({"image": images, "label": labels})
    torch.testing.assert_close(loss, F.cross_entropy(obj.logits(images), labels, label_smoothing=0.1))


def test_labels_outside_the_head_are_refused():
    obj = Supervised(create_backbone(tiny_model()), SupervisedConfig(), num_classes=3)
    with pytest.raises(ValueError, match=r"labels in \[-1, 2\].*3 classes"):
        obj({"image": torch.randn(2, 1, 16, 16), "label": torch.tensor([-1, 2])})


# -------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("head,metric_loss", [("linear", "none"), ("cosine", "none"), ("centre", "none"),
                                              ("cosine", "triplet"), ("centre", "centre")])
def test_supervised_training_lowers_the_loss(digits_shards, tmp_path, head, metric_loss):
    out = tmp_path / "run"
    r = supervised_recipe(digits_shards, out, f"objective.supervised.head={head}", "run.max_steps=80",
                          f"objective.supervised.metric_loss={metric_loss}",
                          "optim.base_lr=6e-2", "optim.warmup_steps=5", "objective.supervised.label_smoothing=0",
                          "objective.supervised.crop_scale=[0.8,1.0]", "objective.supervised.hflip=false",
                          "objective.supervised.pool=mean", "model.drop_path_rate=0.1")
    result = Trainer(r).fit()
    assert result.steps == 80
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([x["loss"] for x in rows[:10]]), np.mean([x["loss"] for x in rows[-10:]])
    assert last < first - 0.15, (first, last)
    assert np.mean([x["acc"] for x in rows[-10:]]) > 0.2  # chance is 0.1
    if metric_loss != "none":  # both terms are logged, and the metric term falls too
        assert all(x["loss"] == pytest.approx(x["ce_loss"] + x["metric_loss"], rel=1e-5) for x in rows)
        assert np.mean([x["metric_loss"] for x in rows[-10:]]) < np.mean([x["metric_loss"] for x in rows[:10]])


def test_centre_head_scores_scaled_cosine_to_ema_centres_and_metric_losses_add():
    """The centre head: the first training batch of a class sets its centre to the class mean of the normalised
    pooled features, logits are cosine_scale x cos; an unseen class scores -scale; the loss is the label-smoothed
    cross-entropy of those logits plus weight x the metric loss (centre: 1 - cos to the centre)."""
    from pretrain.heads import ClassCentreHead, TripletLoss

    torch.manual_seed(0)
    cfg = SupervisedConfig(head="centre", cosine_scale=10.0, centre_momentum=0.5, metric_loss="centre",
                           metric_loss_weight=0.5, label_smoothing=0.1)
    obj = Supervised(create_backbone(tiny_model()), cfg, num_classes=4).train()
    images, labels = torch.randn(6, 1, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    loss, metrics = obj({"image": images, "label": labels})
    obj.backbone.eval()  # drop path off: the same features again
    with torch.no_grad():
        feats = F.normalize(obj.features(images), dim=-1)
    means = F.normalize(torch.stack([feats[labels == c].mean(0) for c in range(3)]), dim=-1)
    torch.testing.assert_close(obj.head.centres[:3], means)
    assert obj.head.seen.tolist() == [True, True, True, False]
    with torch.no_grad():
        logits = obj.logits(images)
    expected = 10.0 * torch.cat([feats @ means.t(), -torch.ones(6, 1)], dim=1)
    torch.testing.assert_close(logits, expected)
    ce = F.cross_entropy(expected, labels, label_smoothing=0.1)
    centre = (1 - (feats * means[labels]).sum(1)).mean()
    assert metrics["ce_loss"] == pytest.approx(float(ce), rel=1e-4)
    assert metrics["metric_loss"] == pytest.approx(float(centre), rel=1e-4)
    assert float(loss) == pytest.approx(float(ce + 0.5 * centre), rel=1e-4)
    # A second batch moves the centres by the EMA rule; an eval forward does not move them.
    before = obj.head.centres.clone()
    obj.eval()
    obj({"image": images, "label": labels})
    torch.testing.assert_close(obj.head.centres, before)
    # The triplet term is pretrain.heads.TripletLoss on the same pooled features; its own centres are separate.
    obj = Supervised(create_backbone(tiny_model()), SupervisedConfig(head="linear", metric_loss="triplet",
                                                                     triplet_margin=0.3), num_classes=4).eval()
    _, metrics = obj.train()({"image": images, "label": labels})
    assert isinstance(obj.triplet, TripletLoss) and obj.triplet.margin == 0.3 and obj.centres is None
    assert metrics["metric_loss"] >= 0
    assert isinstance(Supervised(create_backbone(tiny_model()), SupervisedConfig(metric_loss="centre"), 4).centres,
                      ClassCentreHead)


@pytest.mark.parametrize("extra,match", [
    (("head=centre", "mixup=0.8"), r"head=centre need each sample's own label.*mixup=0"),
    (("metric_loss=triplet", "cutmix=1.0"), r"metric_loss=triplet need each sample's own label"),
    (("head=centroid",), r"objective.supervised.head='centroid': must be one of \['linear', 'cosine', 'centre'\]"),
    (("metric_loss=arcface",), r"metric_loss='arcface': must be one of"),
    (("centre_momentum=1.0",), r"centre_momentum=1(\.0)?: must be in \[0, 1\)"),
])
def test_head_and_metric_loss_refusals_name_the_key(digits_shards, tmp_path, extra, match):
    from pretrain.recipe import RecipeError

    with pytest.raises(RecipeError, match=match):
        supervised_recipe(digits_shards, tmp_path / "r", *(f"objective.supervised.{e}" for e in extra))


def test_finetune_at_new_resolution_trains_evaluates_and_reports(pretrained, digits_shards, small_val, tmp_path):
    out = tmp_path / "ft"
    result = finetune(pretrained, str(digits_shards), str(small_val), out_dir=out, img_size=24,
                      overrides=[*QUIET, "run.max_steps=3", "optim.warmup_steps=1"])
    assert result.protocol == "finetune" and result.num_test == 200 and result.num_train == 1797
    assert 0.0 <= result.top1 <= result.top5 <= 1.0
    assert np.asarray(result.confusion_matrix).sum() == 200
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["top1"] == result.top1 and saved["settings"]["img_size"] == 24 and saved["settings"]["steps"] == 3
    assert (out / "finetune_confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The run folder is a whole run: its recipe names the pretrained backbone and the new resolution.
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.objective.name == "supervised" and recipe.model.img_size == 24
    assert Path(recipe.objective.supervised.init_from) == Path(pretrained).resolve()
    assert recipe.objective.supervised.num_classes == 10 and recipe.optim.layer_decay == 0.75
    # The exported fine-tuned backbone: 6x6 grid, the pretrained normalisation.
    exported = load_backbone_from(out / "backbone")
    assert exported.pos_embed.shape == (1, 37, 32) and data_stats(exported) == ((0.25,), (0.5,))
    # Rebuilt from its checkpoint alone, the classifier scores the same.
    again = evaluate(out, str(small_val))
    assert again.top1 == pytest.approx(result.top1) and again.confusion_matrix == result.confusion_matrix
    assert load_finetuned(out).data_stats() == ((0.25,), (0.5,))


def test_finetune_resumes_exactly(digits_shards, tmp_path):
    """Straight 8 steps == 4 steps, a fresh resume from the step-4 checkpoint, 4 more (Mixup/CutMix and drop path
    on: their randomness comes back with the checkpoint)."""
    torch.manual_seed(0)
    pre = export_backbone(create_backbone(tiny_model()), tmp_path / "pre")
    common = [*QUIET, "run.max_steps=8", "run.checkpoint_every_steps=4", "optim.warmup_steps=2",
              "objective.supervised.mixup=0.8", "objective.supervised.cutmix=1.0", "model.drop_path_rate=0.2"]

    def run(out: Path):
        return Trainer(finetune_recipe(pre, str(digits_shards), out_dir=out, overrides=common)).fit()

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    run(resumed)
    for c in list_checkpoints(resumed):
        if c.name != "step_00000004":
            shutil.rmtree(c)
    torch.manual_seed(123)
    np.random.seed(123)  # disturb both RNGs: the checkpoint must restore them
    result = run(resumed)
    assert result.steps == 8
    a = load_file(str(latest_checkpoint(straight) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(resumed) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs after resume")


# -------------------------------------------------------------------------------------------------- refusals


def test_refusals_are_clear(digits_shards, tmp_path):
    torch.manual_seed(0)
    pre = export_backbone(create_backbone(tiny_model()), tmp_path / "pre")
    ok = dict(out_dir=tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no checkpoint, run or exported backbone"):
        finetune_recipe(tmp_path / "nowhere", str(digits_shards), **ok)
    with pytest.raises(FileNotFoundError, match="shard"):
        finetune_recipe(pre, str(tmp_path / "no-shards"), **ok)
    with pytest.raises(FinetuneError, match="val shards"):
        finetune(pre, str(digits_shards), "", **ok)

    # Shards without labels: refused by finetune and by the objective's builder (a plain `python -m pretrain`).
    unlabelled = tmp_path / "unlabelled"
    write_shard_set((RawSample(f"{i:04d}", Image.new("L", (8, 8), i)) for i in range(8)), unlabelled,
                    classes=[], source="blank")
    with pytest.raises(FinetuneError, match="no labels"):
        finetune_recipe(pre, str(unlabelled), **ok)
    with pytest.raises(ValueError, match="has no labels"):
        Trainer(supervised_recipe(unlabelled, tmp_path / "run2"))

    # A 3-channel backbone on grayscale shards.
    rgb = export_backbone(create_backbone(tiny_model(in_chans=3)), tmp_path / "rgb")
    with pytest.raises(FinetuneError, match="3-channel"):
        finetune_recipe(rgb, str(digits_shards), **ok)
    # A recipe whose model section contradicts the pretrained backbone.
    with pytest.raises(ValueError, match=r"depth 2 vs 3"):
        Trainer(finetune_recipe(pre, str(digits_shards), overrides=[*QUIET, "model.depth=3"], **ok))
    with pytest.raises(ValueError, match=r"in_chans|channel"):
        build_objective(supervised_recipe(digits_shards, tmp_path / "run3", "model.in_chans=3",
                                          f"objective.supervised.init_from={pre}"))


def test_fmnist_recipe_matches_the_pretraining_architecture():
    ft = load_recipe(ROOT / "recipes" / "finetune_vit_tiny_fmnist.yaml")
    mae = load_recipe(ROOT / "recipes" / "mae_vit_tiny_fmnist.yaml")
    assert ft.objective.name == "supervised" and ft.objective.supervised.num_classes == 10
    for key in ("name", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        assert getattr(ft.model, key) == getattr(mae.model, key), key
    assert ft.objective.supervised.init_from == mae.run.out_dir
    assert ft.optim.layer_decay == 0.9 and ft.run.precision == "no"
    assert ft.run.fit_to_max_minutes and ft.run.max_minutes == 30


TWO_RANK_SCRIPT = '''
import json, os, sys
from pathlib import Path
from downstream.finetune import finetune
pre, train, val, out = sys.argv[1:5]
result = finetune(pre, train, val, out_dir=out, overrides=sys.argv[5:])
Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(result.to_dict()))
'''


@pytest.mark.multiprocess
def test_finetune_on_two_processes_agrees_with_one(digits_shards, small_val, tmp_path):
    """torchrun, 2 CPU processes (gloo): DDP fine-tuning runs; both ranks report the same result over all 200 val
    samples, equal to a one-process evaluation of the same checkpoint."""

    torch.manual_seed(0)
    pre = export_backbone(create_backbone(tiny_model()), tmp_path / "pre")
    script = tmp_path / "two_rank_finetune.py"
    script.write_text(TWO_RANK_SCRIPT)
    out = tmp_path / "ft"
    p = torchrun_two_cpu(script, str(pre), str(digits_shards), str(small_val), str(out), *QUIET, "run.max_steps=3",
                         "data.batch_size=16", "optim.warmup_steps=1", timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["num_test"] == ranks[1]["num_test"] == 200
    assert ranks[0]["confusion_matrix"] == ranks[1]["confusion_matrix"]
    single = evaluate(out, str(small_val))
    assert single.confusion_matrix == ranks[0]["confusion_matrix"]
    assert single.top1 == pytest.approx(ranks[0]["top1"])


def test_cli_finetune_with_centre_head_and_triplet_loss(pretrained, digits_shards, small_val, tmp_path, capsys):
    """`finetune ... --head centre --metric-loss triplet` trains a real run whose recipe, report and restored
    classifier carry that head."""
    from downstream.__main__ import main

    if "sincos" in str(pretrained):
        pytest.skip("one pretrained backbone is enough for the CLI")
    out = tmp_path / "ft"
    assert main(["finetune", str(pretrained), str(digits_shards), str(small_val), "--out", str(out), "--head",
                 "centre", "--metric-loss", "triplet", *QUIET, "run.max_steps=4", "optim.warmup_steps=1"]) == 0
    assert "finetune: top-1" in capsys.readouterr().out
    recipe = load_recipe(out / "recipe.yaml")
    assert (recipe.objective.supervised.head, recipe.objective.supervised.metric_loss) == ("centre", "triplet")
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["settings"]["head"] == "centre" and saved["settings"]["metric_loss"] == "triplet"
    # The centres are buffers of the checkpoint: the classifier rebuilt from it scores the same.
    assert evaluate(out, str(small_val)).top1 == pytest.approx(saved["top1"])


def test_cli_takes_overrides_before_or_after_options(tmp_path, monkeypatch, capsys):
    """`finetune RUN TRAIN VAL --out X run.epochs=5` and `... run.epochs=5 --out X` both reach the recipe."""
    from types import SimpleNamespace

    import downstream.finetune as ft_module
    from downstream.__main__ import main

    seen = []

    def record(*args, overrides=(), **kwargs):  # stands in for the training run: only the parsing is under test
        seen.append(list(overrides))
        return SimpleNamespace(top1=0.5, top5=None, num_train=1, num_test=1)

    monkeypatch.setattr(ft_module, "finetune", record)
    assert main(["finetune", "c", "t", "v", "--out", str(tmp_path), "run.epochs=5", "optim.base_lr=1e-3"]) == 0
    assert main(["finetune", "c", "t", "v", "run.epochs=5", "--out", str(tmp_path), "optim.base_lr=1e-3"]) == 0
    assert seen == [["run.epochs=5", "optim.base_lr=1e-3"]] * 2
    with pytest.raises(SystemExit):
        main(["knn", "c", "t", "v", "run.epochs=5"])  # a verb without overrides refuses them
    assert "unrecognized arguments" in capsys.readouterr().err
