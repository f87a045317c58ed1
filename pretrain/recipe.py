"""A recipe is one YAML file that is a whole run.

Typed sections (data, model, objective, optim, run, eval, alarm) as dataclasses; OmegaConf
merges the YAML and dotted command-line overrides (`optim.base_lr=3e-4`) onto
the schema, so every value has a type and a default. An unknown key is an error
that lists the valid keys of its section; out-of-range values are errors before
any compute starts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pretrain.auto import AUTO, may_be_auto, resolve_auto
from pretrain.pooling import POOLINGS
from shards.atomic import write_text_atomic


class RecipeError(ValueError):
    """A recipe that cannot run: unknown key, wrong type or out-of-range value."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RecipeError(msg)


def _show(value: Any) -> str:
    """A value as a message quotes it: strings quoted (so '' and ' ' are visible), YAML words for None/bools."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return repr(value)


def _one_of(value: str, allowed: tuple[str, ...], name: str) -> None:
    _check(value in allowed, f"{name}={_show(value)}: must be one of {list(allowed)}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)  # "-1: must be in [0, 1)", not "-1.0 ... [0.0, 1.0)"


def _min(name: str, value: float, lo: float, *, strict: bool = False, note: str = "") -> None:
    """`name=value: must be >= lo` (or `> lo` when strict); `note` says what the boundary value means."""
    ok = value > lo if strict else value >= lo
    _check(ok, f"{name}={_num(value)}: must be {'>' if strict else '>='} {_num(lo)}{note}")


def _within(name: str, value: float, lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False,
            note: str = "") -> None:
    ok = (lo < value if open_lo else lo <= value) and (value < hi if open_hi else value <= hi)
    interval = f"{'(' if open_lo else '['}{_num(lo)}, {_num(hi)}{')' if open_hi else ']'}"
    _check(ok, f"{name}={_num(value)}: must be in {interval}{note}")


def _scale_range(name: str, v: list[float]) -> None:
    _check(len(v) == 2 and 0.0 < v[0] <= v[1] <= 1.0,
           f"{name}={_show(v)}: must be two values with 0 < min <= max <= 1, e.g. {name}=[0.4,1.0]")


def _stats(prefix: str, mean: list[float], std: list[float]) -> None:
    _check(
        len(mean) == len(std) and len(mean) in (0, 1, 3),
        f"{prefix}.mean={_show(mean)} / {prefix}.std={_show(std)}: must have equal lengths of 0 (the default), "
        "1 or 3 values",
    )
    _check(all(s > 0 for s in std), f"{prefix}.std={_show(std)}: every value must be > 0")


def _stats_fit(prefix: str, mean: list[float], in_chans: int) -> None:
    """A normalisation of 1 value applies to every channel; otherwise one value per channel."""
    allowed = "1 value" if in_chans == 1 else f"1 or {in_chans} values"
    _check(len(mean) in (0, 1, in_chans),
           f"{prefix}.mean={_show(mean)}: {len(mean)} values for model.in_chans={in_chans}; give {allowed} (or [])")


def _multiple_of_patch(name: str, size: int, patch: int, note: str = "") -> None:
    if size % patch:
        lower, upper = size // patch * patch, (size // patch + 1) * patch
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        _check(False, f"{name}={size}{note} is not a multiple of the patch size model.patch_size={patch}: crops must "
               f"tile into whole patches, e.g. {name}={nearest}")


def _f(default: Any, *, example: Any = None, length: int | None = None) -> Any:
    """A dataclass field (a list default is copied per instance) with hints for type-error messages:
    `example`, the value a message suggests when the default is empty; `length`, a list's fixed length."""
    meta = {k: v for k, v in (("example", example), ("length", length)) if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    # Shard-set folder, glob, brace pattern or URL list (comma-separated).
    train: str = _f("", example="data/fmnist/train")
    # Held-out shard set; null or '' = none (normalised to '' by validate()).
    val: str | None = _f("", example="data/fmnist/val")
    batch_size: int = 64  # per process
    num_workers: int = 2
    mode: str = "exact"  # "exact": each sample once per epoch; "resampled": shards drawn with replacement
    epoch_samples: int = 0  # resampled mode: samples per epoch (all ranks together)
    shuffle_buffer: int = 1000
    remainder: str = "drop"  # exact mode: equalise ranks by dropping ("drop") or repeating ("pad") samples
    max_bad_fraction: float = 0.01  # stop when more than this fraction of samples is unreadable
    caption_templates: list[str] = _f([], example=["a photo of a {}."])  # CLIP on class-labelled shards
    # `pipe:` shard sources run a shell command: refused unless this is true (a recipe from elsewhere must not run
    # commands on the training machines just by being loaded and trained).
    allow_pipe: bool = False

    def validate(self) -> None:
        if self.val is None:  # null and '' both mean "no validation set"; readers see one value
            self.val = ""
        _min("data.batch_size", self.batch_size, 0, strict=True)
        _min("data.num_workers", self.num_workers, 0, note=" (0 = load in the training process)")
        _one_of(self.mode, ("exact", "resampled"), "data.mode")
        _min("data.epoch_samples", self.epoch_samples, 0, note=" (samples per epoch in resampled mode)")
        _min("data.shuffle_buffer", self.shuffle_buffer, 0)
        _one_of(self.remainder, ("drop", "pad"), "data.remainder")
        _within("data.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0, open_hi=True)
        if self.mode == "resampled":
            _check(self.epoch_samples > 0, f"data.epoch_samples={self.epoch_samples}: data.mode='resampled' needs "
                   "data.epoch_samples > 0 (samples per epoch, all ranks together)")


@dataclass
class ModelConfig:
    """The backbone: a timm VisionTransformer by name, with optional dimension overrides (0 = the name's own)."""

    name: str = "vit_tiny_patch16_224"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    mlp_ratio: float = 0.0
    pos_embed: str = "learn"  # "learn" or "sincos" (fixed 2-D sin-cos, as MAE)
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False

    def validate(self) -> None:
        _check(bool(self.name.strip()), f"model.name={_show(self.name)}: must name a timm VisionTransformer, "
               "e.g. model.name=vit_tiny_patch16_224")
        _min("model.img_size", self.img_size, 0, strict=True)
        _min("model.patch_size", self.patch_size, 0, strict=True)
        if self.img_size % self.patch_size:
            lower, upper = self.img_size // self.patch_size * self.patch_size, (self.img_size // self.patch_size + 1) * self.patch_size
            _check(False, f"model.img_size={self.img_size} is not a multiple of model.patch_size={self.patch_size}: "
                   f"images must tile into whole patches, e.g. model.img_size={f'{lower} or {upper}' if lower else upper}")
        _check(self.in_chans in (1, 3), f"model.in_chans={self.in_chans}: must be 1 or 3")
        for name in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
            _min(f"model.{name}", getattr(self, name), 0, note=" (0 = model.name's own)")
        _one_of(self.pos_embed, ("learn", "sincos"), "model.pos_embed")
        _within("model.drop_path_rate", self.drop_path_rate, 0.0, 1.0, open_hi=True)
        if self.embed_dim and self.num_heads:
            _check(
                self.embed_dim % self.num_heads == 0,
                f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads={self.num_heads}",
            )
        if self.embed_dim and self.pos_embed == "sincos":
            _check(self.embed_dim % 4 == 0, f"model.embed_dim={self.embed_dim}: model.pos_embed='sincos' needs an "
                   "embed_dim divisible by 4 (2-D sin-cos: a sin and a cos per axis)")


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True
    crop_scale: list[float] = _f([0.2, 1.0], length=2)  # RandomResizedCrop area range
    hflip: bool = True
    # per-channel Normalize; [] = ImageNet (gray: its average)
    mean: list[float] = _f([], example=[0.485, 0.456, 0.406])
    std: list[float] = _f([], example=[0.229, 0.224, 0.225])
    mask_tokens_in_encoder: bool = False  # the paper's baseline: every token (mask tokens too) through the encoder

    def validate(self) -> None:
        _within("objective.mae.mask_ratio", self.mask_ratio, 0.0, 1.0, open_lo=True, open_hi=True)
        _min("objective.mae.decoder_embed_dim", self.decoder_embed_dim, 0, strict=True)
        _min("objective.mae.decoder_depth", self.decoder_depth, 1)
        _min("objective.mae.decoder_num_heads", self.decoder_num_heads, 1)
        _check(
            self.decoder_embed_dim % self.decoder_num_heads == 0,
            f"objective.mae.decoder_embed_dim={self.decoder_embed_dim} is not divisible by "
            f"objective.mae.decoder_num_heads={self.decoder_num_heads}",
        )
        _check(
            self.decoder_embed_dim % 4 == 0,
            f"objective.mae.decoder_embed_dim={self.decoder_embed_dim}: must be divisible by 4 (2-D sin-cos)",
        )
        _scale_range("objective.mae.crop_scale", self.crop_scale)
        _stats("objective.mae", self.mean, self.std)

    def validate_recipe(self, recipe: Recipe) -> None:
        """The patch grid the model makes: at least one visible patch, and targets a norm can be taken of."""
        model = recipe.model
        n = (model.img_size // model.patch_size) ** 2
        keep = int(n * (1 - self.mask_ratio))  # as pretrain.objectives.mae.num_kept (MAE's random_masking)
        _check(keep >= 1, f"objective.mae.mask_ratio={self.mask_ratio}: keeps int({n} x (1 - {self.mask_ratio})) = "
               f"{keep} of the {n} patches that model.img_size={model.img_size} / "
               f"model.patch_size={model.patch_size} make; "
               f"the encoder needs at least one visible patch: mask_ratio <= 1 - 1/{n} = {1 - 1 / n:.4g}")
        if self.norm_pix_loss:
            _check(model.patch_size**2 * model.in_chans >= 2, "objective.mae.norm_pix_loss=true: a patch of "
                   f"model.patch_size={model.patch_size} x model.in_chans={model.in_chans} has one value and no "
                   "variance; use a larger patch or objective.mae.norm_pix_loss=false")
        _stats_fit("objective.mae", self.mean, model.in_chans)


@dataclass
class DINOConfig:
    """DINO (Caron et al. 2021); defaults are the paper's ViT-S/16 values."""

    out_dim: int = 65536  # prototypes K of the head's weight-normalised last layer
    hidden_dim: int = 2048  # the head's MLP width
    bottleneck_dim: int = 256
    head_layers: int = 3  # Linear layers before the last layer (GELU between)
    norm_last_layer: bool = True  # fix the last layer's weight-norm gain g = 1 (more stable)
    freeze_last_layer: int = 1  # epochs during which the last layer gets no update
    momentum_teacher: float = 0.996  # teacher EMA momentum, cosine schedule to 1 over the run
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30  # linear warmup_teacher_temp -> teacher_temp, then constant
    student_temp: float = 0.1
    center_momentum: float = 0.9
    global_crop_size: int = 0  # 0 = model.img_size
    global_crops_scale: list[float] = _f([0.4, 1.0], length=2)
    local_crops_number: int = 8
    local_crop_size: int = 96
    local_crops_scale: list[float] = _f([0.05, 0.4], length=2)
    hflip: bool = True
    color_jitter_prob: float = 0.8  # RGB: brightness/contrast/saturation/hue; 1 channel: brightness/contrast
    # ColorJitter strengths: brightness, contrast, saturation, hue (hue <= 0.5 turns; 0.5 = any hue). DINO's
    # (0.4, 0.4, 0.2, 0.1) keeps colour as a cue; what any hue does on colour Fashion-MNIST: docs/results.md
    color_jitter: list[float] = _f([0.4, 0.4, 0.2, 0.1], length=4)
    grayscale_prob: float = 0.2  # RGB only
    blur_prob: list[float] = _f([1.0, 0.1, 0.5], length=3)  # global 1, global 2, locals
    solarize_prob: float = 0.2  # global 2 only
    # per-channel Normalize; [] = ImageNet (gray: its average)
    mean: list[float] = _f([], example=[0.485, 0.456, 0.406])
    std: list[float] = _f([], example=[0.229, 0.224, 0.225])
    collapse_warn_std: float = 0.05  # warn when embedding std x sqrt(dim) falls below this (1 = spread out)
    collapse_warn_every: int = 100  # steps between two collapse warnings
    # where the multi-crop views are made: "pil", per sample in the DataLoader workers (pretrain.multicrop);
    # "batched", workers only decode (resized to the global crop size) and the views are made on the training
    # device, a batch at a time (pretrain.augment; per-sample seeds, so resume stays exact)
    augment: str = "pil"

    def validate(self) -> None:
        p = "objective.dino."
        _one_of(self.augment, ("pil", "batched"), p + "augment")
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
            _min(p + name, getattr(self, name), 1)
        _min(p + "freeze_last_layer", self.freeze_last_layer, 0, note=" (epochs; 0 = never frozen)")
        _within(p + "momentum_teacher", self.momentum_teacher, 0.0, 1.0)
        for name in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
            _min(p + name, getattr(self, name), 0, strict=True)
        _min(p + "warmup_teacher_temp_epochs", self.warmup_teacher_temp_epochs, 0)
        _within(p + "center_momentum", self.center_momentum, 0.0, 1.0, open_hi=True)
        _min(p + "global_crop_size", self.global_crop_size, 0, note=" (0 = model.img_size)")
        _min(p + "local_crops_number", self.local_crops_number, 0)
        _min(p + "local_crop_size", self.local_crop_size, 0, strict=True)
        _scale_range(p + "global_crops_scale", self.global_crops_scale)
        _scale_range(p + "local_crops_scale", self.local_crops_scale)
        _check(len(self.blur_prob) == 3, f"{p}blur_prob={_show(self.blur_prob)}: must be three probabilities "
               f"(global 1, global 2, locals), e.g. {p}blur_prob=[1.0,0.1,0.5]")
        for name in ("color_jitter_prob", "grayscale_prob", "solarize_prob"):
            _within(p + name, getattr(self, name), 0.0, 1.0, note=" (a probability)")
        _check(len(self.color_jitter) == 4 and min(self.color_jitter) >= 0 and self.color_jitter[3] <= 0.5,
               f"{p}color_jitter={_show(self.color_jitter)}: must be four strengths >= 0 (brightness, contrast, "
               f"saturation, hue), hue at most 0.5, e.g. {p}color_jitter=[0.4,0.4,0.2,0.1]")
        _check(all(0.0 <= b <= 1.0 for b in self.blur_prob),
               f"{p}blur_prob={_show(self.blur_prob)}: each must be in [0, 1] (a probability)")
        _stats("objective.dino", self.mean, self.std)
        _min(p + "collapse_warn_std", self.collapse_warn_std, 0)
        _min(p + "collapse_warn_every", self.collapse_warn_every, 1)

    def validate_recipe(self, recipe: Recipe) -> None:
        """Crops go through the backbone's patch embedding: each must tile into whole patches."""
        model = recipe.model
        note = f" (0 = model.img_size={model.img_size})" if not self.global_crop_size else ""
        _multiple_of_patch("objective.dino.global_crop_size", self.global_crop_size or model.img_size,
                           model.patch_size, note)
        if self.local_crops_number:
            _multiple_of_patch("objective.dino.local_crop_size", self.local_crop_size, model.patch_size)
        _stats_fit("objective.dino", self.mean, model.in_chans)


# open_clip's BPE tokenizer emits ids below this; the text tower's embedding table must cover them.
OPEN_CLIP_VOCAB_SIZE = 49408


@dataclass
class CLIPConfig:
    """CLIP (Radford et al. 2021): image tower = the backbone + a linear projection; text tower = open_clip's."""

    embed_dim: int = 512  # joint image-text embedding width
    proj_bias: bool = False  # bias in the image projection (open_clip's timm_proj_bias)
    text_context_length: int = 77  # tokens per caption: open_clip's tokenizer pads / truncates to this
    text_vocab_size: int = OPEN_CLIP_VOCAB_SIZE  # open_clip's BPE vocabulary; must cover every id its tokenizer emits
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    text_mlp_ratio: float = 4.0
    init_logit_scale: float = 2.6592600369327779  # log(1 / 0.07), as CLIP
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped to this after every step, as CLIP
    local_loss: bool = True  # each rank's rows against all ranks' columns (open_clip --local-loss)
    gather_with_grad: bool = True  # all-gather features with their gradient (open_clip --gather-with-grad)
    captions: str = "auto"  # "captions" (.txt), "classes" (class names in data.caption_templates), "auto"
    # "classes": index -> name; [] = the train manifest's
    class_names: list[str] = _f([], example=["t-shirt", "trouser"])
    crop_scale: list[float] = _f([0.9, 1.0], length=2)  # RandomResizedCrop area range
    hflip: bool = False
    # per-channel Normalize; [] = ImageNet (gray: its average)
    mean: list[float] = _f([], example=[0.485, 0.456, 0.406])
    std: list[float] = _f([], example=[0.229, 0.224, 0.225])

    def validate(self) -> None:
        p = "objective.clip."
        for key in ("embed_dim", "text_width", "text_heads", "text_layers"):
            _min(p + key, getattr(self, key), 1)
        _check(
            self.text_width % self.text_heads == 0,
            f"objective.clip.text_width={self.text_width} is not divisible by objective.clip.text_heads={self.text_heads}",
        )
        _min(p + "text_context_length", self.text_context_length, 3, note=" (start, a token, end)")
        _check(self.text_vocab_size >= OPEN_CLIP_VOCAB_SIZE,
               f"objective.clip.text_vocab_size={self.text_vocab_size} is smaller than open_clip's tokenizer "
               f"vocabulary: must be >= {OPEN_CLIP_VOCAB_SIZE}, or token ids would fall outside the embedding table")
        _min(p + "text_mlp_ratio", self.text_mlp_ratio, 0, strict=True)
        _min(p + "max_logit_scale", self.max_logit_scale, 1.0, strict=True)
        hi = math.log(self.max_logit_scale)
        _check(0.0 <= self.init_logit_scale <= hi, f"objective.clip.init_logit_scale={self.init_logit_scale}: must be in "
               f"[0, log(objective.clip.max_logit_scale)] = [0, {hi:.6g}]")
        _one_of(self.captions, ("auto", "captions", "classes"), "objective.clip.captions")
        _scale_range(p + "crop_scale", self.crop_scale)
        _stats("objective.clip", self.mean, self.std)

    def validate_recipe(self, recipe: Recipe) -> None:
        """Checks across sections: a contrastive batch cannot be accumulated from independent micro-batches."""
        _check(
            recipe.optim.accum_steps == 1,
            f"optim.accum_steps={recipe.optim.accum_steps} is refused for objective clip: a contrastive loss "
            "contrasts each micro-batch only within itself, so accumulation would not give the negatives of the "
            "global batch the learning rate is scaled for. Raise data.batch_size, or add processes (features are "
            "gathered across ranks), and set optim.accum_steps=1.",
        )
        for t in recipe.data.caption_templates:
            _check(t.count("{}") == 1, f"data.caption_templates entry {t!r}: needs exactly one '{{}}' for the class name")
        _stats_fit("objective.clip", self.mean, recipe.model.in_chans)


@dataclass
class SupervisedConfig:
    """Supervised fine-tuning (classification) of a backbone: backbone + head, cross-entropy, Mixup/CutMix."""

    # pretrained backbone to start from: run folder, checkpoint or export; "" = random init
    init_from: str = _f("", example="runs/mae_vit_tiny_fmnist")
    num_classes: int = 0  # 0 = the class count in the train shards' manifest
    # "linear"; "cosine" (pretrain.heads.CosineClassifier); "centre": EMA class centres of the normalised
    # features (pretrain.heads.ClassCentreHead), logits = cosine_scale * cos(feature, centre), no weights to learn
    head: str = "linear"
    cosine_scale: float = 16.0  # cosine and centre heads: logits = scale * cos
    learn_scale: bool = False  # cosine head: train the scale
    centre_momentum: float = 0.9  # centre head / centre loss: weight of the old centre in each EMA update
    # an extra loss on the pooled features beside the cross-entropy: "none", "triplet" (batch-hard, margin
    # triplet_margin on normalised features) or "centre" (1 - cos to the class's EMA centre)
    metric_loss: str = "none"
    metric_loss_weight: float = 1.0  # loss = cross-entropy + weight x metric loss
    triplet_margin: float = 0.2
    pool: str = "cls"  # "cls" token or "mean" of patch tokens (MAE fine-tunes with the mean)
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Mixup alpha (DeiT/MAE fine-tune: 0.8); 0 = off
    cutmix: float = 0.0  # CutMix alpha (DeiT/MAE fine-tune: 1.0); 0 = off
    mixup_prob: float = 1.0  # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    mixup_mode: str = "batch"  # timm Mixup mode: one lambda per "batch", "pair" or "elem"
    crop_scale: list[float] = _f([0.08, 1.0], length=2)  # RandomResizedCrop area range
    hflip: bool = True
    # [] = what the pretrained backbone recorded (else ImageNet's)
    mean: list[float] = _f([], example=[0.485, 0.456, 0.406])
    std: list[float] = _f([], example=[0.229, 0.224, 0.225])

    def validate(self) -> None:
        p = "objective.supervised."
        _check(self.num_classes == 0 or self.num_classes >= 2, f"{p}num_classes={self.num_classes}: must be >= 2 "
               "(a classifier needs two classes), or 0 (the train manifest's class count)")
        _one_of(self.head, ("linear", "cosine", "centre"), p + "head")
        _min(p + "cosine_scale", self.cosine_scale, 0, strict=True)
        _within(p + "centre_momentum", self.centre_momentum, 0.0, 1.0, open_hi=True)
        _one_of(self.metric_loss, ("none", "triplet", "centre"), p + "metric_loss")
        _min(p + "metric_loss_weight", self.metric_loss_weight, 0)
        _min(p + "triplet_margin", self.triplet_margin, 0)
        hard_labels = [f"{p}head=centre"] if self.head == "centre" else []
        hard_labels += [f"{p}metric_loss={self.metric_loss}"] if self.metric_loss != "none" else []
        _check(not hard_labels or (self.mixup == 0 and self.cutmix == 0),
               f"{' and '.join(hard_labels)} need each sample's own label, which Mixup/CutMix blend: "
               f"set {p}mixup=0 and {p}cutmix=0 (now {self.mixup} and {self.cutmix})")
        _one_of(self.pool, POOLINGS, p + "pool")
        _within(p + "label_smoothing", self.label_smoothing, 0.0, 1.0, open_hi=True)
        _min(p + "mixup", self.mixup, 0, note=" (a Beta alpha; 0 = off)")
        _min(p + "cutmix", self.cutmix, 0, note=" (a Beta alpha; 0 = off)")
        for name in ("mixup_prob", "mixup_switch_prob"):
            _within(p + name, getattr(self, name), 0.0, 1.0, note=" (a probability)")
        _one_of(self.mixup_mode, ("batch", "pair", "elem"), p + "mixup_mode")
        _scale_range(p + "crop_scale", self.crop_scale)
        _stats("objective.supervised", self.mean, self.std)

    def validate_recipe(self, recipe: Recipe) -> None:
        _stats_fit("objective.supervised", self.mean, recipe.model.in_chans)


@dataclass
class ObjectiveConfig:
    name: str = "mae"
    mae: MAEConfig = field(default_factory=MAEConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)

    def validate(self) -> None:
        # The sections are the objectives (each has a builder in pretrain/objectives/<name>.py): checked here
        # without importing them, so recipe and objectives do not import each other.
        _one_of(self.name, tuple(f.name for f in dataclasses.fields(self) if f.name != "name"), "objective.name")
        sub = getattr(self, self.name, None)
        if sub is not None and hasattr(sub, "validate"):
            sub.validate()


@dataclass
class OptimConfig:
    name: str = "adamw"  # any timm create_optimizer_v2 name
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float = -1.0  # cosine schedule of weight decay to this value; -1 = constant
    betas: list[float] = _f([0.9, 0.95], length=2)
    eps: float = 1e-8
    momentum: float = 0.9  # SGD-family optimizers
    warmup_epochs: float = 0.0
    warmup_steps: int = 0  # takes precedence over warmup_epochs when > 0
    clip_grad: float = 0.0  # max global grad norm; 0 = off
    accum_steps: int = 1
    layer_decay: float = 0.0  # layer-wise lr decay (fine-tuning); 0 = off

    def validate(self) -> None:
        _check(bool(self.name.strip()), f"optim.name={_show(self.name)}: must name a timm optimizer, e.g. optim.name=adamw")
        _min("optim.base_lr", self.base_lr, 0, strict=True)
        _min("optim.min_lr", self.min_lr, 0)
        _min("optim.weight_decay", self.weight_decay, 0)
        _check(self.weight_decay_end == -1 or self.weight_decay_end >= 0,
               f"optim.weight_decay_end={self.weight_decay_end}: must be >= 0, or -1 (constant weight decay)")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas={_show(self.betas)}: must be two values in [0, 1), e.g. optim.betas=[0.9,0.95]")
        _min("optim.eps", self.eps, 0, strict=True)
        _within("optim.momentum", self.momentum, 0.0, 1.0, open_hi=True)
        _min("optim.warmup_epochs", self.warmup_epochs, 0)
        _min("optim.warmup_steps", self.warmup_steps, 0, note=" (0 = optim.warmup_epochs decides)")
        _min("optim.clip_grad", self.clip_grad, 0, note=" (0 = off)")
        _min("optim.accum_steps", self.accum_steps, 1)
        _within("optim.layer_decay", self.layer_decay, 0.0, 1.0, note=" (0 = off)")


# Each rank seeds numpy with run.seed + 1 + 1000 x rank, and numpy takes seeds below 2**32: leave room for ranks.
MAX_SEED = 2**31 - 1


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps; 0 = epochs decide
    max_minutes: float = 0.0  # stop (with a checkpoint) after this wall-clock time; 0 = no limit
    # With max_minutes: measure the update rate once (after 3% of the budget) and shorten the schedule to what
    # the budget holds, so the lr decays fully instead of being cut off.
    fit_to_max_minutes: bool = False
    seed: int = 0
    precision: str = "no"  # "no", "bf16" or "fp16" (fp16 uses a grad scaler)
    checkpoint_every_steps: int = 0  # 0 = off
    checkpoint_every_minutes: float = 0.0  # 0 = off
    keep_last: int = 3
    resume: str = "auto"  # "auto" (newest complete checkpoint in out_dir), "never", or a checkpoint path
    log_every: int = 10
    nonfinite_patience: int = 5  # this many non-finite losses in a row: reload last good checkpoint and stop
    trackers: list[str] = _f(["tensorboard"])
    progress: bool = True
    visualize: bool = True  # objective PNG (MAE reconstructions, ...) at the end of the run
    cpu: bool = False  # force CPU even where a GPU is present
    compile: bool = False  # torch.compile the objective (in place: checkpoint keys unchanged); CPU needs a C++ compiler
    # Shard parameters, gradients and optimizer state over the processes (Accelerate's FSDP2 plugin, every transformer
    # block its own unit); GPUs only. Checkpoints stay whole: they load at any process count, sharded or not.
    fsdp: bool = False

    def validate(self) -> None:
        _check(bool(self.out_dir.strip()), f"run.out_dir={_show(self.out_dir)}: must name a folder, e.g. run.out_dir=runs/x")
        _min("run.epochs", self.epochs, 1)
        _min("run.max_steps", self.max_steps, 0, note=" (0 = run.epochs decides)")
        _min("run.max_minutes", self.max_minutes, 0, note=" (0 = no limit)")
        _check(not self.fit_to_max_minutes or self.max_minutes > 0,
               f"run.fit_to_max_minutes=true needs run.max_minutes > 0 (got run.max_minutes={self.max_minutes})")
        _within("run.seed", self.seed, 0, MAX_SEED)
        _one_of(self.precision, ("no", "bf16", "fp16"), "run.precision")
        _min("run.checkpoint_every_steps", self.checkpoint_every_steps, 0, note=" (0 = off)")
        _min("run.checkpoint_every_minutes", self.checkpoint_every_minutes, 0, note=" (0 = off)")
        _min("run.keep_last", self.keep_last, 1)
        _check(bool(self.resume.strip()), f"run.resume={_show(self.resume)}: must be 'auto', 'never' or a checkpoint path")
        _min("run.log_every", self.log_every, 1)
        _min("run.nonfinite_patience", self.nonfinite_patience, 1)
        _check(not (self.fsdp and self.compile), "run.fsdp=true with run.compile=true is not supported yet (compile "
               "would have to follow the sharding, which is untested here): pick one")
        for t in self.trackers:
            _one_of(t, ("tensorboard", "jsonl", "wandb", "mlflow", "comet_ml", "aim", "clearml"), "run.trackers[]")


@dataclass
class EvalConfig:
    """Online k-NN during pretraining (`pretrain.evaluate`): DINO's weighted k-NN top-1 (cosine, k=20, T=0.07) of a
    labelled query set against a labelled bank, both drawn once by key hash from eval.shards (else data.train, never
    data.val), embedded with the training backbone at the start, every eval.every_steps / eval.every_minutes and
    at the end. Off, with one log line, when the data has no labels."""

    enabled: bool = True
    # labelled shard set to draw query + bank from; "" = data.train
    shards: str = _f("", example="data/fmnist/train")
    holdout: int = 1000  # query samples (the smallest key hashes)
    bank_samples: int = 5000  # bank samples (the next smallest); both shrink in proportion on a smaller set
    every_steps: int = 0  # evaluate every this many updates; 0 = off
    every_minutes: float = 5.0  # evaluate every this many minutes (stretched by max_fraction); 0 = off
    # a time-driven evaluation waits at least (the last one's seconds / this) after it: at most this share of the time
    max_fraction: float = 0.05
    k: int = 20
    temperature: float = 0.07
    pooling: str = "cls"  # "cls" (final CLS token) or "mean" (mean of the final patch tokens)
    batch_size: int = 256  # per process

    def validate(self) -> None:
        p = "eval."
        _min(p + "holdout", self.holdout, 1)
        _min(p + "bank_samples", self.bank_samples, 1)
        _min(p + "every_steps", self.every_steps, 0, note=" (0 = off)")
        _min(p + "every_minutes", self.every_minutes, 0, note=" (0 = off)")
        _within(p + "max_fraction", self.max_fraction, 0.0, 1.0, open_hi=True, note=" (0 = no limit)")
        _min(p + "k", self.k, 1)
        _min(p + "temperature", self.temperature, 0, strict=True)
        _one_of(self.pooling, POOLINGS, p + "pooling")
        _min(p + "batch_size", self.batch_size, 1)


@dataclass
class AlarmConfig:
    """Collapse alarms (`pretrain.alarms.CollapseAlarms`) on the logged rows: a loss or entropy near its ceiling
    (DINO: ln out_dim) or a loss climbing towards it, an effective rank or the online k-NN falling from its best."""

    enabled: bool = True
    # stop the run at the next update, with a checkpoint (stopped_early="collapse"), when an alarm fires
    stop_on_collapse: bool = False
    after_steps: int = -1  # alarms read rows from this step on; -1 = once the lr warmup is over
    window: int = 8  # logged rows (metrics.jsonl lines) the loss slope is fitted over
    loss_rise: float = 0.03  # loss rising: fitted rise over the window >= this x the loss ceiling; 0 = off
    # ... and only while the effective rank falls by this fraction over the same rows (0 = the loss alone): a healthy
    # DINO run can climb for a while after its warmup, its rank steady
    rank_fall: float = 0.1
    near_ceiling: float = 0.95  # loss / teacher entropy >= this x its ceiling (uniform outputs); 0 = off
    near_floor: float = 0.02  # loss / teacher entropy <= this x its ceiling (one output for all); 0 = off
    rank_drop: float = 0.5  # effective rank below (1 - this) x its best; 0 = off
    knn_drop: float = 0.1  # online k-NN top-1 below (1 - this) x its best; 0 = off
    warn_every: int = 100  # steps between two warnings of one signal

    def validate(self) -> None:
        p = "alarm."
        _min(p + "after_steps", self.after_steps, -1, note=" (-1 = once the lr warmup is over)")
        _min(p + "window", self.window, 3, note=" (a slope needs a few points)")
        _min(p + "loss_rise", self.loss_rise, 0, note=" (0 = off)")
        _within(p + "near_ceiling", self.near_ceiling, 0.0, 1.0, note=" (0 = off)")
        _within(p + "near_floor", self.near_floor, 0.0, 1.0, open_hi=True, note=" (0 = off)")
        for name in ("rank_fall", "rank_drop", "knn_drop"):
            _within(p + name, getattr(self, name), 0.0, 1.0, open_hi=True, note=" (0 = off)")
        _min(p + "warn_every", self.warn_every, 1)


# The largest integer a recipe takes: torch, numpy and the products the checks form (patch grids) stay exact.
MAX_INT = 2**63 - 1


def _check_finite(obj: Any, prefix: str) -> None:
    """Every float of every section (list entries too) is a finite number: nan slips past range checks."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
            continue
        values = value if isinstance(value, list) else [value]
        _check(all(math.isfinite(v) for v in values if isinstance(v, float)),
               f"{key}={_show(value)}: {'every value ' if isinstance(value, list) else ''}must be a finite number")


def _check_int(key: str, value: Any) -> None:
    """An integer fits in 64 bits: a 400-digit one overflows the first float it meets (OverflowError, no key)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise RecipeError(f"{key}: a {len(str(abs(value)))}-digit integer is out of range: must be within "
                          f"+-{MAX_INT} (2**63 - 1)")


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    alarm: AlarmConfig = field(default_factory=AlarmConfig)

    # What `auto` values were resolved to, and from where (`pretrain.auto`); "" when the recipe had none. Not a
    # field: the resolved values themselves are in the sections, and a saved recipe.yaml holds them as numbers.
    auto_note = ""

    def validate(self) -> Recipe:
        _check_finite(self, "")
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        # An objective's config checks other sections too: the model's patch grid (MAE, DINO), CLIP's batch.
        sub = getattr(self.objective, self.objective.name, None)
        if hasattr(sub, "validate_recipe"):
            sub.validate_recipe(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _valid_keys(node: Any) -> list[str]:
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain_key_error(schema: DictConfig, dotted: str) -> str:
    """Name the unknown key and the valid keys of the section it was found in."""
    parts = [p for p in dotted.split(".") if p]
    node: Any = schema
    for i, p in enumerate(parts):
        if isinstance(node, DictConfig) and p in node:
            node = node[p]
            continue
        section = ".".join(parts[:i]) or "<top level>"
        return f"unknown recipe key {'.'.join(parts[: i + 1])!r} in section {section!r}; valid keys: {_valid_keys(node)}"
    return f"unknown recipe key {dotted!r}"


def _find_unknown(schema: DictConfig, data: Any, prefix: str = "") -> str | None:
    if not isinstance(data, dict):
        return None
    for k, v in data.items():
        path = f"{prefix}{k}"
        if not isinstance(schema, DictConfig) or k not in schema:
            return path
        sub = schema[k]
        if isinstance(sub, DictConfig):
            found = _find_unknown(sub, v, f"{path}.")
            if found:
                return found
    return None


_NO_VALUE = object()


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_at(key: str) -> tuple[Any, dataclasses.Field | None]:
    """The declared type and dataclass field of a dotted recipe key (`optim.betas`); (None, None) if unknown."""
    cls: Any = Recipe
    tp: Any = Recipe
    fld: dataclasses.Field | None = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls) or part not in _hints(cls):
            return None, None
        tp = _hints(cls)[part]
        fld = next(f for f in dataclasses.fields(cls) if f.name == part)
        cls = tp
    return tp, fld


_NOUNS = {int: ("an integer", "integers"), float: ("a number", "floats"), bool: ("true or false", "booleans"),
          str: ("a string", "strings")}


def _describe(tp: Any, fld: dataclasses.Field | None) -> str:
    """`optim.betas` -> 'a list of 2 floats'; a section -> 'a section (a mapping of its keys: [...])'."""
    if dataclasses.is_dataclass(tp):
        return f"a section (a mapping of its keys: {sorted(f.name for f in dataclasses.fields(tp))})"
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        n = fld.metadata.get("length") if fld is not None else None
        return f"a list of {f'{n} ' if n else ''}{_NOUNS[args[0]][1]}"
    if type(None) in args:  # Optional[X]
        inner = next(a for a in args if a is not type(None))
        return f"{_describe(inner, fld)} or null"
    return _NOUNS[tp][0]


def _flow(value: Any, top: bool = True) -> str:
    """A value as one writes it after `key=` on the command line (YAML flow style)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_flow(v, top=False) for v in value) + "]"
    if isinstance(value, str):
        plain = value and top and not any(c in value for c in " ,[]{}:'\"#")
        return value if plain else repr(value)
    return repr(value)


def _example(key: str, tp: Any, fld: dataclasses.Field | None) -> str:
    if dataclasses.is_dataclass(tp):
        first = dataclasses.fields(tp)[0]
        return _example(f"{key}.{first.name}", *_field_at(f"{key}.{first.name}"))
    value: Any = None
    if fld is not None:
        value = fld.metadata.get("example")
        if value is None:
            value = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()  # type: ignore[misc]
    return f", e.g. {key}={_flow(value)}" if value not in (None, "", []) else ""


def _type_message(key: str, value: Any) -> str:
    """`optim.betas='abc': expected a list of 2 floats, e.g. optim.betas=[0.9,0.95]`."""
    tp, fld = _field_at(key)
    given = "" if value is _NO_VALUE else f"={_show(value)}"
    return f"{key}{given}: expected {_describe(tp, fld)}{_example(key, tp, fld)}"


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return _NO_VALUE
        data = data[part]
    return data


def _is_str(tp: Any) -> bool:
    return tp is str or set(typing.get_args(tp)) == {str, type(None)}


def _check_shapes(cls: Any, data: dict, where: str, prefix: str = "") -> dict:
    """Sections must be mappings, lists lists and scalars scalars (OmegaConf's own errors for these name no key).
    An empty section (`mae:` with everything commented out) means its defaults. Returns the cleaned data."""
    out = {}
    for k, v in data.items():
        key, tp = f"{prefix}{k}", _hints(cls).get(k) if isinstance(k, str) else None
        _check(tp is not None, f"{where}unknown recipe key {key!r} in section {prefix[:-1] or '<top level>'!r}; "
               f"valid keys: {sorted(_hints(cls))}")
        if dataclasses.is_dataclass(tp):
            if v is None:
                continue
            _check(isinstance(v, dict), where + _type_message(key, v))
            out[k] = _check_shapes(tp, v, where, f"{key}.")
            continue
        for x in v if isinstance(v, list) else [v]:  # before OmegaConf turns one into a float: OverflowError
            _check_int(where + key, x)
        is_list = typing.get_origin(tp) is list
        _check(isinstance(v, list) if is_list else not isinstance(v, dict | list), where + _type_message(key, v))
        # ... and a list's entries scalars (OmegaConf lets `[[]]` into a list of floats; the checks then compare a list)
        _check(not is_list or not any(isinstance(x, dict | list) for x in v), where + _type_message(key, v))
        # YAML 1.1 reads an unquoted no/yes/on/off as a boolean; a string field would silently get 'False'.
        _check(not (_is_str(tp) and isinstance(v, bool)), f"{where}{key}={_show(v)}: expected a string, and YAML read "
               f"the unquoted word as a boolean: quote it, e.g. {k}: \"no\"")
        out[k] = v
    return out


def _merge(base: DictConfig, data: dict, where: str) -> DictConfig:
    """Merge one layer (the YAML file, or one override) onto the typed config; a value OmegaConf cannot convert
    becomes one message: the full key, the value given, the type expected and an example."""
    data = _check_shapes(Recipe, data, where)
    try:
        return OmegaConf.merge(base, OmegaConf.create(data))  # type: ignore[return-value]
    except ConfigKeyError as e:
        raise RecipeError(where + _explain_key_error(base, str(e.full_key))) from None
    except (OmegaConfBaseException, TypeError) as e:
        key = re.sub(r"\[\d+\]", "", str(getattr(e, "full_key", None) or ""))  # optim.betas[1] -> optim.betas
        if key and _field_at(key)[0] is not None:
            raise RecipeError(where + _type_message(key, _lookup(data, key))) from None
        raise RecipeError(where + str(e).splitlines()[0]) from None


def _leaves(layer: dict, prefix: str = "") -> Iterator[tuple[str, dict, str]]:
    """(dotted key, the dict holding it, its name there) for every non-mapping value of a layer."""
    for k, v in list(layer.items()):
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", layer, k


def _take_autos(layer: dict, where: str) -> tuple[set[str], set[str]]:
    """Remove the `auto` values from a layer (they are resolved from the data after all layers are merged);
    returns (the keys that said auto, every key the layer set)."""
    autos, keys = set(), set()
    for key, holder, name in _leaves(layer):
        keys.add(key)
        if not (isinstance(holder[name], str) and holder[name].strip().lower() == AUTO):
            continue
        if may_be_auto(key):
            autos.add(key)
            del holder[name]
        elif not _is_str(_field_at(key)[0]):
            raise RecipeError(f"{where}{key}=auto: only model.in_chans, model.img_size, objective.dino.local_crop_size "
                              "and the objectives' mean and std may be auto (read from the training data)")
    return autos, keys


def _resolve_autos(merged: DictConfig, autos: set[str]) -> tuple[DictConfig, str]:
    try:
        values, note = resolve_auto(autos, merged)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(f"resolving auto: {e}") from None
    layer: dict = {}
    for key, value in values.items():
        node = layer
        *parents, name = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    return _merge(merged, layer, "auto: "), note


def _read_yaml(p: Path) -> Any:
    """The file's YAML; a file that is not YAML text is a RecipeError naming it and where the parser stopped."""
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not a text file (byte {e.start} is not UTF-8); a recipe is a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{p}: not valid YAML{where}: {problem}") from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (or the defaults when `path` is None), apply `key=value` overrides, resolve `auto`
    values from the training data (`pretrain.auto`; the last layer to set a key decides), validate."""
    schema = OmegaConf.structured(Recipe)
    merged = schema
    autos: set[str] = set()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe not found: {p}")
        data = _read_yaml(p) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"{p}: a recipe is a mapping of sections (data, model, objective, optim, run, eval, alarm)")
        unknown = _find_unknown(schema, data)
        if unknown:
            raise RecipeError(f"{p}: {_explain_key_error(schema, unknown)}")
        autos = _take_autos(data, f"{p}: ")[0]
        merged = _merge(merged, data, f"{p}: ")
    for o in overrides or []:
        if "=" not in o:
            raise RecipeError(f"override {o!r} is not of the form section.key=value")
        o = o.lstrip("+")  # hydra's "add a key": every key of a recipe already exists
        key = o.split("=", 1)[0]
        if _find_unknown(schema, _nest(key)):
            raise RecipeError(f"override {o!r}: {_explain_key_error(schema, key)}")
        # One override at a time, so a type error names the value that override gave.
        layer: Any = _parse_override(o, key)
        node = layer
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        if _is_str(_field_at(key)[0]) and isinstance(node[parts[-1]], bool | int | float):
            # A string field keeps what was typed: `run.precision=no` is "no", not YAML's False -> 'False'.
            node[parts[-1]] = o.split("=", 1)[1]
        said_auto, set_here = _take_autos(layer, f"override {o!r}: ")
        autos = (autos - set_here) | said_auto
        merged = _merge(merged, layer, "")
    note = ""
    if autos:
        merged, note = _resolve_autos(merged, autos)
    try:
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise RecipeError(f"{e.full_key}: {msg}" if getattr(e, "full_key", None) else msg) from None
    recipe.auto_note = note
    return recipe.validate()


def _parse_override(o: str, key: str) -> dict:
    """`a.b=value` as a nested dict, the value read as YAML (OmegaConf's grammar for `${...}`)."""
    tp, _ = _field_at(key)
    if tp is None:  # `data.train.x` goes below a value; `.data` has an empty part
        known = [k for k in (key.rsplit(".", i)[0] for i in range(1, key.count(".") + 1)) if _field_at(k)[0]]
        what = f"{known[0]} is {_describe(*_field_at(known[0]))}, not a section" if known else \
            "a key is section.name, e.g. run.epochs"
        raise RecipeError(f"override {o!r}: unknown recipe key {key!r}: {what}")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([o]))  # type: ignore[return-value]
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise RecipeError(f"{key}={o.split('=', 1)[1]!r}: cannot be read as a value ({problem}); expected "
                          f"{_describe(tp, _field_at(key)[1])}{_example(key, tp, _field_at(key)[1])}") from None


def _nest(dotted: str) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = None
    return out


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    write_text_atomic(path, recipe.to_yaml())
