"""Supervised fine-tuning of a pretrained backbone, through the one trainer (objective `supervised`).

    finetune("runs/mae-fmnist", "data/fmnist/train", "data/fmnist/val", out_dir="runs/ft")

1. the pretrained backbone (run folder, checkpoint or export) is loaded once to learn its architecture and
   checked against the shards (labels present, channels);
2. a recipe is made: a recipe file (or fine-tuning defaults) < what the backbone dictates (model.* shape,
   objective.supervised.init_from, data, out_dir) < the caller's overrides. It is written to the run folder
   like any run's, so `python -m pretrain RUN/recipe.yaml` resumes it, and `finetune(...)` on the same
   out_dir resumes from its newest checkpoint;
3. `Trainer(recipe).fit()` trains (layer-wise lr decay, Mixup/CutMix, label smoothing, drop path, warmup +
   cosine, checkpoints, exact resume); the fine-tuning resolution may differ from pretraining: the builder
   interpolates the position embedding;
4. the fine-tuned classifier is evaluated on the val shards: top-1 / top-5 / per-class accuracy and the
   confusion matrix, written as RUN/finetune.json (+ RUN/finetune_confusion.png), the shape probes report.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from downstream.features import check_compatible
from downstream.probe import ProbeResult, result_from_scores
from pretrain.backbone import backbone_config
from pretrain.checkpoint import CheckpointError, latest_checkpoint, load_model_state, read_trainer_state
from pretrain.objectives import build_objective
from pretrain.objectives.supervised import Supervised, manifest_classes
from pretrain.recipe import Recipe, load_recipe
from pretrain.restore import load_backbone_from, resolve_weights_dir
from pretrain.trainer import Trainer, to_device
from pretrain.transforms import eval_transform
from shards.stream import ShardStream
from shards.tar import list_shards

# Fine-tuning defaults when no recipe file is given: MAE's fine-tuning recipe (AdamW 0.9/0.999, base lr 5e-4 at
# batch 256 (x batch/256), wd 0.05, drop path 0.1, label smoothing 0.1, warmup + cosine) with layer decay 0.75
# (MAE uses 0.75 for ViT-B, 0.65 for larger); Mixup/CutMix stay off unless asked for: they pay only over long
# schedules.
FINETUNE_DEFAULTS: tuple[str, ...] = (
    "optim.name=adamw",
    "optim.base_lr=5e-4",
    "optim.betas=[0.9,0.999]",
    "optim.weight_decay=0.05",
    "optim.layer_decay=0.75",
    "optim.warmup_epochs=1",
    "optim.min_lr=1e-6",
    "model.drop_path_rate=0.1",
    "model.pos_embed=learn",
    "objective.supervised.label_smoothing=0.1",
    "objective.supervised.pool=mean",
    "run.epochs=10",
)

RESULT_NAME = "finetune"


class FinetuneError(ValueError):
    """Shards or a pretrained backbone that fine-tuning cannot use."""


def check_labelled(source: str, what: str) -> list[str]:
    """The class names of a labelled shard set ([] when it has no manifest to tell); a clear error for one
    whose manifest lists no classes. Shards without a manifest are checked sample by sample by the stream."""
    classes = manifest_classes(source)
    if classes is not None and not classes:
        raise FinetuneError(
            f"{what} shards {source} have no labels (the manifest lists no classes): fine-tuning needs labelled shards"
        )
    return classes or []


def finetune_recipe(
    pretrained: str | Path,
    train: str,
    val: str = "",
    *,
    out_dir: str | Path,
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    img_size: int | None = None,
) -> Recipe:
    """The fine-tuning recipe for `pretrained` on `train`: see the module docstring for the layering."""
    weights = resolve_weights_dir(pretrained)  # FileNotFoundError naming the path when there is nothing
    backbone = load_backbone_from(weights)
    for source in (train, val):
        if source:
            list_shards(source)  # FileNotFoundError naming a missing folder or shard
    classes = check_labelled(train, "train")
    if val:
        val_classes = check_labelled(val, "val")
        if classes and val_classes and len(val_classes) > len(classes):
            raise FinetuneError(f"val shards have {len(val_classes)} classes but train shards only {len(classes)}")
    for source in (train, val):
        if source:
            try:
                check_compatible(backbone, source)
            except ValueError as e:
                raise FinetuneError(f"pretrained backbone {pretrained}: {e}") from None
    cfg = backbone_config(backbone)
    patch = cfg["patch_size"]
    if patch[0] != patch[1]:
        raise FinetuneError(f"pretrained backbone {pretrained} has non-square patches {patch}")
    derived = [
        f"model.name={cfg['model_name']}",
        f"model.img_size={img_size or cfg['img_size'][0]}",
        f"model.patch_size={patch[0]}",
        f"model.in_chans={cfg['in_chans']}",
        f"model.embed_dim={cfg['embed_dim']}",
        f"model.depth={cfg['depth']}",
        f"model.num_heads={cfg['num_heads']}",
        f"model.mlp_ratio={cfg['mlp_ratio']!r}",
        "objective.name=supervised",
        f"objective.supervised.init_from={Path(weights).resolve()}",
        f"data.train={train}",
        f"run.out_dir={out_dir}",
    ]
    if val:
        derived.append(f"data.val={val}")
    layers = [] if recipe is not None else list(FINETUNE_DEFAULTS)
    r = load_recipe(recipe, [*layers, *derived, *overrides])
    sup = r.objective.supervised
    if not sup.num_classes and classes:
        sup.num_classes = len(classes)  # recorded, so the run folder rebuilds without the train manifest
    return r.validate()


def finetune(
    pretrained: str | Path,
    train: str,
    val: str,
    *,
    out_dir: str | Path,
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    img_size: int | None = None,
    eval_batch_size: int = 256,
) -> ProbeResult:
    """Fine-tune `pretrained` on `train`, evaluate on `val`; write OUT/finetune.json (+ confusion PNG).

    A second call with the same `out_dir` resumes the run from its newest checkpoint (or only re-evaluates
    a finished one).
    """
    if not val:
        raise FinetuneError("fine-tuning needs val shards to report accuracy on")
    r = finetune_recipe(pretrained, train, val, out_dir=out_dir, recipe=recipe, overrides=overrides, img_size=img_size)
    trainer = Trainer(r)
    train_result = trainer.fit()
    objective: Supervised = trainer.accelerator.unwrap_model(trainer.model)
    t0 = time.monotonic()
    scores, labels = predict(
        objective, val, batch_size=eval_batch_size, num_workers=r.data.num_workers,
        autocast=trainer.accelerator.autocast(),
    )
    classes = manifest_classes(val) or manifest_classes(train) or []
    result = result_from_scores(
        "finetune",
        scores,
        labels,
        num_classes=objective.num_classes,
        classes=classes,
        num_train=trainer.stream.total,
        seconds=time.monotonic() - t0 + train_result.wall_seconds,
        settings={
            # "" when an override set init_from='' (the baseline from random weights, same architecture)
            "pretrained": str(pretrained) if r.objective.supervised.init_from else "",
            "architecture_from": str(pretrained),
            "run_dir": str(r.run.out_dir),
            "checkpoint": str(train_result.checkpoint),
            "img_size": r.model.img_size,
            "steps": train_result.steps,
            "epochs_done": train_result.epochs_done,
            "stopped_early": train_result.stopped_early,
            "base_lr": r.optim.base_lr,
            "layer_decay": r.optim.layer_decay,
            "drop_path_rate": r.model.drop_path_rate,
            "mixup": r.objective.supervised.mixup,
            "cutmix": r.objective.supervised.cutmix,
            "label_smoothing": r.objective.supervised.label_smoothing,
            "head": r.objective.supervised.head,
            "metric_loss": r.objective.supervised.metric_loss,
            "pool": r.objective.supervised.pool,
        },
    )
    if trainer.is_main:
        result.save(r.run.out_dir, RESULT_NAME)
    return result


@torch.no_grad()
def predict(
    objective: Supervised,
    source: str,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast=None,
    max_bad_fraction: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and labels (N,) of every sample of `source`, in shard-set order, on the objective's device.

    Images get the deterministic eval transform at the fine-tuned resolution with the training normalisation.
    One process reads the whole set: after `Trainer.fit()` the process group is gone (Accelerate's
    `end_training`), so under a multi-process launch every rank evaluates everything and gets the same answer.
    `autocast`: a context manager for the forward (the trainer's `accelerator.autocast()`); default none.
    """
    check_labelled(source, "evaluation")
    device = next(objective.parameters()).device
    stream = ShardStream(
        source,
        batch_size=batch_size,
        num_workers=num_workers,
        transform=eval_transform(objective.img_size[0], objective.in_chans, objective.mean, objective.std),
        mode="exact",
        remainder="pad",
        shuffle=False,
        rank=0,
        world_size=1,
        max_bad_fraction=max_bad_fraction,
        require=("label",),
    )
    was_training = objective.training
    objective.eval()
    scores, labels, index = [], [], []
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            for batch in stream.loader():
                batch = to_device(batch, device)
                scores.append(objective.logits(batch["image"]).float().cpu())
                labels.append(batch["label"].long().cpu())
                index.append(batch["index"].long().cpu())
    finally:
        objective.train(was_training)
    if not scores:
        raise FinetuneError(f"{source} yielded no samples")
    order = torch.argsort(torch.cat(index))
    return torch.cat(scores)[order], torch.cat(labels)[order]


def load_finetuned(path: str | Path) -> Supervised:
    """The fine-tuned classifier (backbone + head) of a run folder or one of its checkpoints, in eval mode.

    Built from the recipe the checkpoint records, with the weights of the checkpoint (not `init_from`).
    """
    p = Path(path)
    ckpt = p if (p / "trainer_state.json").is_file() else latest_checkpoint(p)
    if ckpt is None:
        raise FileNotFoundError(f"no fine-tuning checkpoint in {p}")
    _, meta = read_trainer_state(ckpt)
    recipe_dict = meta.get("recipe") or {}
    if recipe_dict.get("objective", {}).get("name") != "supervised":
        raise CheckpointError(f"{ckpt} is not a fine-tuning (supervised) checkpoint")
    recipe: Recipe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Recipe), recipe_dict))
    sup = recipe.objective.supervised
    sup.init_from = ""  # the checkpoint holds every weight
    if not sup.mean:  # the normalisation trained with (taken from init_from then) is recorded in the checkpoint
        overlay = json.loads((ckpt / "backbone_config.json").read_text()).get("pretrained_cfg_overlay", {})
        if overlay.get("mean") and overlay.get("std"):
            sup.mean, sup.std = list(overlay["mean"]), list(overlay["std"])
    objective = build_objective(recipe.validate())
    state = load_model_state(ckpt)
    missing, unexpected = objective.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt} does not fit its recipe: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return objective.eval()


def evaluate(path: str | Path, val: str, *, batch_size: int = 256, num_workers: int = 0) -> ProbeResult:
    """Top-1 / top-5 of a fine-tuned run (or checkpoint) on `val`, on one process."""
    objective = load_finetuned(path)
    t0 = time.monotonic()
    scores, labels = predict(objective, val, batch_size=batch_size, num_workers=num_workers)
    return result_from_scores(
        "finetune", scores, labels, num_classes=objective.num_classes, classes=manifest_classes(val), num_train=0,
        seconds=time.monotonic() - t0, settings={"run_dir": str(path), "img_size": objective.img_size[0]},
    )
