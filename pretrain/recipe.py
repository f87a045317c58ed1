"""A recipe is one YAML file that is a whole run.

Typed sections (data, model, objective, optim, run) as dataclasses; OmegaConf
merges the YAML and dotted command-line overrides (`optim.base_lr=3e-4`) onto
the schema, so every value has a type and a default. An unknown key is an error
that lists the valid keys of its section; out-of-range values are errors before
any compute starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class RecipeError(ValueError):
    """A recipe that cannot run: unknown key, wrong type or out-of-range value."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RecipeError(msg)


def _one_of(value: str, allowed: tuple[str, ...], name: str) -> None:
    _check(value in allowed, f"{name}={value!r}: must be one of {list(allowed)}")


@dataclass
class DataConfig:
    train: str = ""  # shard-set folder, glob, brace pattern or URL list (comma-separated)
    val: str = ""  # held-out shard set (optional)
    batch_size: int = 64  # per process
    num_workers: int = 2
    mode: str = "exact"  # "exact": each sample once per epoch; "resampled": shards drawn with replacement
    epoch_samples: int = 0  # resampled mode: samples per epoch (all ranks together)
    shuffle_buffer: int = 1000
    remainder: str = "drop"  # exact mode: equalise ranks by dropping ("drop") or repeating ("pad") samples
    max_bad_fraction: float = 0.01  # stop when more than this fraction of samples is unreadable
    caption_templates: list[str] = field(default_factory=list)  # CLIP on class-labelled shards

    def validate(self) -> None:
        _check(self.batch_size > 0, f"data.batch_size={self.batch_size}: must be > 0")
        _check(self.num_workers >= 0, f"data.num_workers={self.num_workers}: must be >= 0")
        _one_of(self.mode, ("exact", "resampled"), "data.mode")
        _one_of(self.remainder, ("drop", "pad"), "data.remainder")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0")
        _check(0.0 <= self.max_bad_fraction < 1.0, f"data.max_bad_fraction={self.max_bad_fraction}: must be in [0, 1)")
        if self.mode == "resampled":
            _check(self.epoch_samples > 0, "data.mode=resampled needs data.epoch_samples > 0")


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
        _check(self.img_size > 0 and self.patch_size > 0, "model.img_size and model.patch_size must be > 0")
        _check(
            self.img_size % self.patch_size == 0,
            f"model.img_size={self.img_size} is not a multiple of model.patch_size={self.patch_size}",
        )
        _check(self.in_chans in (1, 3), f"model.in_chans={self.in_chans}: must be 1 or 3")
        _one_of(self.pos_embed, ("learn", "sincos"), "model.pos_embed")
        _check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate must be in [0, 1)")
        if self.embed_dim and self.num_heads:
            _check(
                self.embed_dim % self.num_heads == 0,
                f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads={self.num_heads}",
            )


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area range
    hflip: bool = True
    mean: list[float] = field(default_factory=list)  # per-channel Normalize; [] = ImageNet (gray: its average)
    std: list[float] = field(default_factory=list)
    mask_tokens_in_encoder: bool = False  # the paper's baseline: every token (mask tokens too) through the encoder

    def validate(self) -> None:
        _check(0.0 < self.mask_ratio < 1.0, f"objective.mae.mask_ratio={self.mask_ratio}: must be in (0, 1)")
        _check(self.decoder_depth >= 1, "objective.mae.decoder_depth must be >= 1")
        _check(self.decoder_num_heads >= 1, "objective.mae.decoder_num_heads must be >= 1")
        _check(
            self.decoder_embed_dim > 0 and self.decoder_embed_dim % self.decoder_num_heads == 0,
            "objective.mae.decoder_embed_dim must be > 0 and divisible by decoder_num_heads",
        )
        _check(
            self.decoder_embed_dim % 4 == 0,
            f"objective.mae.decoder_embed_dim={self.decoder_embed_dim}: must be divisible by 4 (2-D sin-cos)",
        )
        _check(
            len(self.crop_scale) == 2 and 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
            f"objective.mae.crop_scale={self.crop_scale}: two values with 0 < min <= max <= 1",
        )
        _check(
            len(self.mean) == len(self.std) and len(self.mean) in (0, 1, 3),
            f"objective.mae.mean/std={self.mean}/{self.std}: equal lengths, 0 (default), 1 or 3 values",
        )
        _check(all(s > 0 for s in self.std), f"objective.mae.std={self.std}: must be > 0")


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
    global_crops_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crops_number: int = 8
    local_crop_size: int = 96
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    hflip: bool = True
    color_jitter_prob: float = 0.8  # RGB: brightness/contrast/saturation/hue; 1 channel: brightness/contrast
    grayscale_prob: float = 0.2  # RGB only
    blur_prob: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # global 1, global 2, locals
    solarize_prob: float = 0.2  # global 2 only
    mean: list[float] = field(default_factory=list)  # per-channel Normalize; [] = ImageNet (gray: its average)
    std: list[float] = field(default_factory=list)
    collapse_warn_std: float = 0.05  # warn when embedding std x sqrt(dim) falls below this (1 = spread out)
    collapse_warn_every: int = 100  # steps between two collapse warnings

    def validate(self) -> None:
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
            _check(getattr(self, name) >= 1, f"objective.dino.{name}={getattr(self, name)}: must be >= 1")
        _check(self.freeze_last_layer >= 0, "objective.dino.freeze_last_layer must be >= 0")
        _check(0.0 <= self.momentum_teacher <= 1.0, "objective.dino.momentum_teacher must be in [0, 1]")
        for name in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
            _check(getattr(self, name) > 0, f"objective.dino.{name}={getattr(self, name)}: must be > 0")
        _check(self.warmup_teacher_temp_epochs >= 0, "objective.dino.warmup_teacher_temp_epochs must be >= 0")
        _check(0.0 <= self.center_momentum < 1.0, "objective.dino.center_momentum must be in [0, 1)")
        _check(self.global_crop_size >= 0, "objective.dino.global_crop_size must be >= 0 (0 = model.img_size)")
        _check(self.local_crops_number >= 0, "objective.dino.local_crops_number must be >= 0")
        _check(self.local_crop_size > 0, "objective.dino.local_crop_size must be > 0")
        for name in ("global_crops_scale", "local_crops_scale"):
            v = getattr(self, name)
            _check(len(v) == 2 and 0.0 < v[0] <= v[1] <= 1.0,
                   f"objective.dino.{name}={v}: two values with 0 < min <= max <= 1")
        _check(len(self.blur_prob) == 3, f"objective.dino.blur_prob={self.blur_prob}: three probabilities "
               "(global 1, global 2, locals)")
        for name, v in (("color_jitter_prob", self.color_jitter_prob), ("grayscale_prob", self.grayscale_prob),
                        ("solarize_prob", self.solarize_prob), *(("blur_prob", b) for b in self.blur_prob)):
            _check(0.0 <= v <= 1.0, f"objective.dino.{name}={v}: a probability in [0, 1]")
        _check(
            len(self.mean) == len(self.std) and len(self.mean) in (0, 1, 3),
            f"objective.dino.mean/std={self.mean}/{self.std}: equal lengths, 0 (default), 1 or 3 values",
        )
        _check(all(s > 0 for s in self.std), f"objective.dino.std={self.std}: must be > 0")
        _check(self.collapse_warn_std >= 0, "objective.dino.collapse_warn_std must be >= 0")
        _check(self.collapse_warn_every >= 1, "objective.dino.collapse_warn_every must be >= 1")


@dataclass
class CLIPConfig:
    """CLIP (Radford et al. 2021): image tower = the backbone + a linear projection; text tower = open_clip's."""

    embed_dim: int = 512  # joint image-text embedding width
    proj_bias: bool = False  # bias in the image projection (open_clip's timm_proj_bias)
    text_context_length: int = 77  # tokens per caption: open_clip's tokenizer pads / truncates to this
    text_vocab_size: int = 49408  # open_clip's BPE vocabulary; must cover every id its tokenizer emits
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    text_mlp_ratio: float = 4.0
    init_logit_scale: float = 2.6592600369327779  # log(1 / 0.07), as CLIP
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped to this after every step, as CLIP
    local_loss: bool = True  # each rank's rows against all ranks' columns (open_clip --local-loss)
    gather_with_grad: bool = True  # all-gather features with their gradient (open_clip --gather-with-grad)
    captions: str = "auto"  # "captions" (.txt), "classes" (class names in data.caption_templates), "auto"
    class_names: list[str] = field(default_factory=list)  # "classes": index -> name; [] = the train manifest's
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop area range
    hflip: bool = False
    mean: list[float] = field(default_factory=list)  # per-channel Normalize; [] = ImageNet (gray: its average)
    std: list[float] = field(default_factory=list)

    def validate(self) -> None:
        for key in ("embed_dim", "text_context_length", "text_vocab_size", "text_width", "text_heads", "text_layers"):
            _check(getattr(self, key) >= 1, f"objective.clip.{key}={getattr(self, key)}: must be >= 1")
        _check(
            self.text_width % self.text_heads == 0,
            f"objective.clip.text_width={self.text_width} is not divisible by text_heads={self.text_heads}",
        )
        _check(self.text_context_length >= 3, "objective.clip.text_context_length must be >= 3 (start, a token, end)")
        _check(self.text_mlp_ratio > 0, "objective.clip.text_mlp_ratio must be > 0")
        _check(self.max_logit_scale > 1.0, f"objective.clip.max_logit_scale={self.max_logit_scale}: must be > 1")
        _check(
            0.0 <= self.init_logit_scale <= math.log(self.max_logit_scale),
            f"objective.clip.init_logit_scale={self.init_logit_scale}: must be in [0, log(max_logit_scale)]",
        )
        _one_of(self.captions, ("auto", "captions", "classes"), "objective.clip.captions")
        _check(
            len(self.crop_scale) == 2 and 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
            f"objective.clip.crop_scale={self.crop_scale}: two values with 0 < min <= max <= 1",
        )
        _check(
            len(self.mean) == len(self.std) and len(self.mean) in (0, 1, 3),
            f"objective.clip.mean/std={self.mean}/{self.std}: equal lengths, 0 (default), 1 or 3 values",
        )
        _check(all(s > 0 for s in self.std), f"objective.clip.std={self.std}: must be > 0")

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


@dataclass
class SupervisedConfig:
    """Supervised fine-tuning (classification) of a backbone: backbone + head, cross-entropy, Mixup/CutMix."""

    init_from: str = ""  # pretrained backbone to start from: run folder, checkpoint or export; "" = random init
    num_classes: int = 0  # 0 = the class count in the train shards' manifest
    head: str = "linear"  # "linear" or "cosine" (downstream.heads.CosineClassifier)
    cosine_scale: float = 16.0  # cosine head: logits = scale * cos
    learn_scale: bool = False  # cosine head: train the scale
    pool: str = "cls"  # "cls" token or "mean" of patch tokens (MAE fine-tunes with the mean)
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Mixup alpha (DeiT/MAE fine-tune: 0.8); 0 = off
    cutmix: float = 0.0  # CutMix alpha (DeiT/MAE fine-tune: 1.0); 0 = off
    mixup_prob: float = 1.0  # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    mixup_mode: str = "batch"  # timm Mixup mode: one lambda per "batch", "pair" or "elem"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    hflip: bool = True
    mean: list[float] = field(default_factory=list)  # [] = what the pretrained backbone recorded (else ImageNet's)
    std: list[float] = field(default_factory=list)

    def validate(self) -> None:
        _check(self.num_classes >= 0, f"objective.supervised.num_classes={self.num_classes}: must be >= 0 (0 = auto)")
        _one_of(self.head, ("linear", "cosine"), "objective.supervised.head")
        _check(self.cosine_scale > 0, f"objective.supervised.cosine_scale={self.cosine_scale}: must be > 0")
        _one_of(self.pool, ("cls", "mean"), "objective.supervised.pool")
        _check(0.0 <= self.label_smoothing < 1.0, "objective.supervised.label_smoothing must be in [0, 1)")
        _check(self.mixup >= 0 and self.cutmix >= 0, "objective.supervised.mixup/cutmix alphas must be >= 0")
        for name in ("mixup_prob", "mixup_switch_prob"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"objective.supervised.{name} must be in [0, 1]")
        _one_of(self.mixup_mode, ("batch", "pair", "elem"), "objective.supervised.mixup_mode")
        _check(
            len(self.crop_scale) == 2 and 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
            f"objective.supervised.crop_scale={self.crop_scale}: two values with 0 < min <= max <= 1",
        )
        _check(
            len(self.mean) == len(self.std) and len(self.mean) in (0, 1, 3),
            f"objective.supervised.mean/std={self.mean}/{self.std}: equal lengths, 0 (default), 1 or 3 values",
        )
        _check(all(s > 0 for s in self.std), f"objective.supervised.std={self.std}: must be > 0")


@dataclass
class ObjectiveConfig:
    name: str = "mae"
    mae: MAEConfig = field(default_factory=MAEConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)

    def validate(self) -> None:
        from pretrain.objectives import known_objectives

        _one_of(self.name, tuple(known_objectives()), "objective.name")
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
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9  # SGD-family optimizers
    warmup_epochs: float = 0.0
    warmup_steps: int = 0  # takes precedence over warmup_epochs when > 0
    clip_grad: float = 0.0  # max global grad norm; 0 = off
    accum_steps: int = 1
    layer_decay: float = 0.0  # layer-wise lr decay (fine-tuning); 0 = off

    def validate(self) -> None:
        _check(self.base_lr > 0, f"optim.base_lr={self.base_lr}: must be > 0")
        _check(self.min_lr >= 0, f"optim.min_lr={self.min_lr}: must be >= 0")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay}: must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"optim.betas={self.betas}: two values in [0, 1)")
        _check(self.eps > 0, "optim.eps must be > 0")
        _check(self.warmup_epochs >= 0 and self.warmup_steps >= 0, "optim warmup must be >= 0")
        _check(self.clip_grad >= 0, "optim.clip_grad must be >= 0")
        _check(self.accum_steps >= 1, f"optim.accum_steps={self.accum_steps}: must be >= 1")
        _check(0 <= self.layer_decay <= 1, "optim.layer_decay must be in [0, 1]")


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
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 0.0
    keep_last: int = 3
    resume: str = "auto"  # "auto" (newest complete checkpoint in out_dir), "never", or a checkpoint path
    log_every: int = 10
    nonfinite_patience: int = 5  # this many non-finite losses in a row: reload last good checkpoint and stop
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True
    visualize: bool = True  # objective PNG (MAE reconstructions, ...) at the end of the run
    cpu: bool = False  # force CPU even where a GPU is present
    compile: bool = False  # torch.compile the objective (in place: checkpoint keys unchanged); CPU needs a C++ compiler
    # Shard parameters, gradients and optimizer state over the processes (Accelerate's FSDP2 plugin, every transformer
    # block its own unit); GPUs only. Checkpoints stay whole: they load at any process count, sharded or not.
    fsdp: bool = False

    def validate(self) -> None:
        _check(self.epochs >= 1, f"run.epochs={self.epochs}: must be >= 1")
        _check(self.max_steps >= 0 and self.max_minutes >= 0, "run.max_steps and run.max_minutes must be >= 0")
        _check(not self.fit_to_max_minutes or self.max_minutes > 0, "run.fit_to_max_minutes=true needs run.max_minutes > 0")
        _one_of(self.precision, ("no", "bf16", "fp16"), "run.precision")
        _check(self.keep_last >= 1, "run.keep_last must be >= 1")
        _check(self.log_every >= 1, "run.log_every must be >= 1")
        _check(self.nonfinite_patience >= 1, "run.nonfinite_patience must be >= 1")
        _check(not (self.fsdp and self.compile), "run.fsdp=true with run.compile=true is not supported yet (compile "
               "would have to follow the sharding, which is untested here): pick one")
        for t in self.trackers:
            _one_of(t, ("tensorboard", "jsonl", "wandb", "mlflow", "comet_ml", "aim", "clearml"), "run.trackers[]")


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Recipe:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        # An objective's config may check other sections too (CLIP refuses gradient accumulation).
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


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (or the defaults when `path` is None), apply `key=value` overrides, validate."""
    schema = OmegaConf.structured(Recipe)
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"{p}: a recipe is a mapping of sections (data, model, objective, optim, run)")
        unknown = _find_unknown(schema, data)
        if unknown:
            raise RecipeError(f"{p}: {_explain_key_error(schema, unknown)}")
        layers.append(OmegaConf.create(data))
    overrides = list(overrides or [])
    for o in overrides:
        if "=" not in o:
            raise RecipeError(f"override {o!r} is not of the form section.key=value")
        key = o.split("=", 1)[0].lstrip("+")
        if _find_unknown(schema, _nest(key)):
            raise RecipeError(f"override {o!r}: {_explain_key_error(schema, key)}")
    if overrides:
        layers.append(OmegaConf.from_dotlist(overrides))
    try:
        merged = OmegaConf.merge(schema, *layers)
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ConfigKeyError as e:
        raise RecipeError(_explain_key_error(schema, str(e.full_key))) from None
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise RecipeError(f"{e.full_key}: {msg}" if getattr(e, "full_key", None) else msg) from None
    return recipe.validate()


def _nest(dotted: str) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = None
    return out


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    from shards.atomic import write_text_atomic

    write_text_atomic(path, recipe.to_yaml())
