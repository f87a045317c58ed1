"""Supervised fine-tuning as one more objective: backbone + classification head, trained by the same trainer.

The recipe of MAE / BEiT / DeiT fine-tuning, from timm's parts:
  * a head on the CLS token or the mean of the patch tokens: linear (MAE's init, std 2e-5) or cosine
    (`pretrain.heads.CosineClassifier`);
  * cross-entropy with label smoothing; Mixup/CutMix (`timm.data.Mixup`) applied to the batch inside
    `forward`, with `SoftTargetCrossEntropy` on the mixed soft targets;
  * drop path (`model.drop_path_rate`) and layer-wise lr decay: `group_matcher` maps the backbone's
    blocks to layers with the head last, so the trainer's `create_optimizer_v2(..., layer_decay=...)`
    scales block i's lr by layer_decay^(depth - i), the embeddings' by layer_decay^(depth + 1);
  * `objective.supervised.init_from` names the pretrained backbone (run folder, checkpoint or export):
    the builder loads it, interpolating the position embedding when the fine-tuning resolution differs
    (timm's `resample_abs_pos_embed`), so the recipe file is the whole run and a resume rebuilds it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.layers import resample_abs_pos_embed
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pretrain.backbone import create_backbone, data_stats
from pretrain.heads import ClassCentreHead, CosineClassifier, TripletLoss
from pretrain.objectives import register
from pretrain.objectives.base import Objective
from pretrain.pooling import pool_tokens
from pretrain.recipe import SupervisedConfig
from pretrain.restore import load_backbone_from
from pretrain.transforms import crop_transform, resolve_stats
from shards.tar import manifest_for

if TYPE_CHECKING:
    from pretrain.recipe import Recipe

HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head init: start from (almost) uniform predictions


def pos_embed_prefix_tokens(model: VisionTransformer) -> int:
    """Rows of `model.pos_embed` that belong to prefix tokens (cls, registers): 0 when they get none."""
    return model.pos_embed.shape[1] - model.patch_embed.num_patches


def resample_pos_embed(model: VisionTransformer, grid_size: tuple[int, int]) -> torch.Tensor:
    """`model.pos_embed` interpolated (bicubic, prefix rows kept) to a patch grid of `grid_size`."""
    return resample_abs_pos_embed(
        model.pos_embed.detach(),
        new_size=list(grid_size),
        old_size=list(model.patch_embed.grid_size),
        num_prefix_tokens=pos_embed_prefix_tokens(model),
    )


def _shape_of(model: VisionTransformer) -> dict[str, Any]:
    blocks = model.blocks
    return {
        "in_chans": model.patch_embed.proj.in_channels,
        "patch_size": tuple(model.patch_embed.patch_size),
        "embed_dim": model.embed_dim,
        "depth": len(blocks),
        "num_heads": blocks[0].attn.num_heads if len(blocks) else 0,
        "mlp_hidden": blocks[0].mlp.fc1.out_features if len(blocks) else 0,
        "prefix_tokens": model.num_prefix_tokens,
    }


def load_pretrained(backbone: VisionTransformer, pretrained: VisionTransformer, source: str = "pretrained") -> None:
    """Copy `pretrained`'s weights into `backbone` (same architecture, any image size); the position embedding
    is resampled to `backbone`'s patch grid. A different architecture is refused, naming what differs."""
    want, have = _shape_of(backbone), _shape_of(pretrained)
    if want["in_chans"] != have["in_chans"]:
        raise ValueError(
            f"{source} takes {have['in_chans']}-channel images but the recipe's model takes {want['in_chans']} "
            f"(model.in_chans): fine-tune on data with {have['in_chans']} channel(s), or pretrain on this data"
        )
    diff = {k: (have[k], want[k]) for k in want if want[k] != have[k]}
    if diff:
        detail = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
        raise ValueError(f"{source} does not match the recipe's model section (pretrained vs recipe): {detail}")
    state = {k: v for k, v in pretrained.state_dict().items()}
    if "pos_embed" in state and backbone.pos_embed is not None:
        state["pos_embed"] = resample_pos_embed(pretrained, tuple(backbone.patch_embed.grid_size))
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _prefixed_matcher(matcher: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A timm `group_matcher` dict for a submodule, rewritten for parameter names under `prefix`."""
    esc = re.escape(prefix)

    def one(pattern: str) -> str:
        body = pattern[1:] if pattern.startswith("^") else pattern
        return f"^{esc}(?:{body.replace('|^', '|')})"  # re.match anchors every alternative at the start

    out: dict[str, Any] = {}
    for group, spec in matcher.items():
        if spec is None or isinstance(spec, str):
            out[group] = spec if spec is None else one(spec)
        else:
            out[group] = [(one(p), suffix) for p, suffix in spec]
    return out


class Supervised(Objective):
    """Image classification with a timm ViT backbone; `forward(batch)` needs `image` (B, C, H, W) and `label` (B,)."""

    requires = ("label",)

    def __init__(
        self,
        backbone: VisionTransformer,
        cfg: SupervisedConfig,
        num_classes: int,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        cfg.validate()
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"supervised needs a timm VisionTransformer backbone, got {type(backbone).__name__}")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        self.backbone = backbone
        self.cfg = cfg
        self.num_classes = num_classes
        self.in_chans: int = backbone.patch_embed.proj.in_channels
        self.img_size: tuple[int, int] = tuple(backbone.patch_embed.img_size)
        self.mean, self.std = resolve_stats(mean, std, self.in_chans, "objective.supervised.mean")

        dim = backbone.embed_dim
        if cfg.head == "cosine":
            self.head: nn.Module = CosineClassifier(dim, num_classes, cfg.cosine_scale, cfg.learn_scale)
        elif cfg.head == "centre":
            self.head = ClassCentreHead(dim, num_classes, cfg.centre_momentum)
        else:
            self.head = nn.Linear(dim, num_classes)
            nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(self.head.bias)
        # the centre loss pulls features to EMA centres: the centre head's own, else a set kept for the loss alone
        self.centres: nn.Module | None = None
        if cfg.metric_loss == "centre" and cfg.head != "centre":
            self.centres = ClassCentreHead(dim, num_classes, cfg.centre_momentum)
        self.triplet = TripletLoss(cfg.triplet_margin) if cfg.metric_loss == "triplet" else None
        self.mixup: Mixup | None = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                mode=cfg.mixup_mode,
                label_smoothing=cfg.label_smoothing,
                num_classes=num_classes,
            )
        self.soft_ce = SoftTargetCrossEntropy()

    # --- the seam -------------------------------------------------------------------------------------------

    def train_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> normalised (C, H, W) tensor: RandomResizedCrop to the backbone's img_size (+ flip)."""
        return crop_transform(self.img_size, self.in_chans, self.mean, self.std, crop_scale=self.cfg.crop_scale,
                              hflip=self.cfg.hflip)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = self._inputs(batch)
        out: dict[str, float] = {}
        if self.training and self.mixup is not None:
            images, targets = self.mix(images, labels)
            logits = self.logits(images)
            loss = self.soft_ce(logits, targets)
        else:
            feats = self.features(images)
            if self.training:
                # EMA centres move with this batch's features before they score it, so every class in the batch
                # has a centre (the first batch of a class starts its centre at the class mean)
                for centres in self._ema_centres():
                    centres.update(feats.detach(), labels)
            logits = self.head_logits(feats)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
            if self.training and self.cfg.metric_loss != "none":
                extra = self.metric_loss(feats, labels)
                out["ce_loss"], out["metric_loss"] = loss.detach(), extra.detach()
                loss = loss + self.cfg.metric_loss_weight * extra
        acc = (logits.detach().argmax(dim=1) == labels).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc, **out}  # tensors: read at log rows only

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's own layer grouping (embeddings, blocks.i, final norm with the last block), under
        `backbone.`; the head matches nothing, so timm puts it in the last layer (lr scale 1)."""
        return _prefixed_matcher(self.backbone.group_matcher(coarse), "backbone.")

    # --- the method -----------------------------------------------------------------------------------------

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, D): the CLS token or the mean of the patch tokens (after the final norm)."""
        return pool_tokens(self.backbone.forward_features(images), self.backbone.num_prefix_tokens, self.cfg.pool)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.features(images))

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Class scores of pooled features. The centre head scores cosine_scale x cos(feature, centre); a class
        with no centre yet gets cos = -1 (finite, so label smoothing's sum over every class stays finite)."""
        if self.cfg.head == "centre":
            return self.cfg.cosine_scale * self.head(feats).clamp_min(-1.0)
        return self.head(feats)

    def metric_loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The recipe's metric_loss on pooled features: batch-hard triplet, or 1 - cos to the class centre."""
        if self.triplet is not None:
            return self.triplet(feats, labels)
        return self._ema_centres()[-1].centre_loss(feats, labels)

    def _ema_centres(self) -> list[nn.Module]:
        """The ClassCentreHeads whose centres follow the training features (the head, the centre loss's)."""
        return [m for m in ((self.head if self.cfg.head == "centre" else None), self.centres) if m is not None]

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix the batch; returns (mixed images, soft targets (B, num_classes), smoothed).

        timm mixes sample i with sample B-1-i and needs an even batch: an odd last sample (the partial
        last batch of an epoch) is left unmixed with its smoothed one-hot target.
        """
        if self.mixup is None:
            raise RuntimeError("mix() needs objective.supervised.mixup or cutmix > 0")
        images = images.clone()  # timm mixes in place
        n = images.shape[0] - images.shape[0] % 2
        targets = mixup_target(labels, self.num_classes, 1.0, self.cfg.label_smoothing)
        if n >= 2:
            images[:n], targets[:n] = self.mixup(images[:n], labels[:n])
        return images, targets

    # --- helpers --------------------------------------------------------------------------------------------

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch.get("image") if isinstance(batch, dict) else None
        labels = batch.get("label") if isinstance(batch, dict) else None
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError("supervised expects batch['image'] as a float tensor (B, C, H, W)")
        if images.shape[1] != self.in_chans:
            raise ValueError(f"supervised expects {self.in_chans}-channel images, got {tuple(images.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],):
            raise ValueError("supervised expects batch['label'] as an integer tensor (B,)")
        labels = labels.long()
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()  # one host read
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(
                f"labels in [{lo}, {hi}] but the head has {self.num_classes} classes (-1 = unlabelled sample); "
                "check objective.supervised.num_classes and the shards"
            )
        return images, labels


def manifest_classes(source: str) -> list[str] | None:
    """The class names a shard source's manifest lists; None when it has no manifest to read."""
    manifest = manifest_for(source)
    return None if manifest is None else list(manifest.classes)


def resolve_num_classes(cfg: SupervisedConfig, train: str) -> int:
    classes = manifest_classes(train) if train else None
    if classes is not None and not classes:
        raise ValueError(
            f"{train} has no labels (its manifest lists no classes): supervised fine-tuning needs labelled shards "
            "(write them with class labels, e.g. `python -m shards write ... --classes ...`)"
        )
    if cfg.num_classes:
        if classes and cfg.num_classes < len(classes):
            raise ValueError(
                f"objective.supervised.num_classes={cfg.num_classes} but {train} has {len(classes)} classes"
            )
        return cfg.num_classes
    if classes is None:
        raise ValueError(
            f"objective.supervised.num_classes=0 (auto) but {train or 'data.train'} has no manifest to count "
            "classes in: set objective.supervised.num_classes"
        )
    return len(classes)


@register("supervised")
def build(recipe: Recipe) -> Supervised:
    cfg = recipe.objective.supervised
    num_classes = resolve_num_classes(cfg, recipe.data.train)
    backbone = create_backbone(recipe.model)
    mean, std = (tuple(cfg.mean), tuple(cfg.std)) if cfg.mean else (None, None)
    if cfg.init_from:
        pretrained = load_backbone_from(cfg.init_from)
        load_pretrained(backbone, pretrained, f"objective.supervised.init_from={cfg.init_from}")
        if mean is None:
            mean, std = data_stats(pretrained)  # the normalisation the backbone was trained with
    return Supervised(backbone, cfg, num_classes, mean, std)
