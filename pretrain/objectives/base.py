"""The objective seam: every training objective (MAE, DINO, CLIP, supervised) has this face.

The trainer never branches on an objective's name. It asks the objective for
  * `train_transform()`: the per-sample view transform (runs in DataLoader workers),
  * `forward(batch) -> (loss, metrics)`: one step's loss on a collated batch,
  * `before_optimizer_step(step, total_steps)`: a hook between backward and the update,
  * `on_step_end(step, total_steps)`: a hook after each optimizer step (DINO's EMA teacher),
  * `on_train_end(out_dir)`: a hook after the backbone export (CLIP writes its open_clip model),
  * `visualize(batch, path)`: an optional PNG for a fixed batch (MAE reconstructions),
and trains whatever parameters the module holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.transforms import eval_transform, normalize_stats


class Objective(nn.Module):
    """Base class. Subclasses set `self.backbone` (a timm VisionTransformer) in `__init__`."""

    #: batch fields this objective needs besides "image" ("label" for supervised, "caption" for CLIP)
    requires: tuple[str, ...] = ()

    backbone: nn.Module
    #: per-channel normalisation of the training views; recorded with the backbone for downstream use
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def data_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the views are normalised with: the subclass's, else the house default."""
        if getattr(self, "mean", None) and getattr(self, "std", None):
            return tuple(self.mean), tuple(self.std)
        return normalize_stats(self.backbone.patch_embed.proj.in_channels)

    def train_transform(self) -> Callable[[Any], Any]:
        """Per-sample transform from a decoded PIL image to the view(s) `forward` expects."""
        raise NotImplementedError

    def eval_transform(self) -> Callable[[Any], Any]:
        """Deterministic per-sample transform (resize, normalise) for fixed visualisation batches."""
        pe = self.backbone.patch_embed
        return eval_transform(pe.img_size[0], pe.proj.in_channels, *self.data_stats())

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (scalar loss, metrics). `batch["image"]` is a tensor or a list of tensors (multi-view)."""
        raise NotImplementedError

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after backward and gradient clipping, before `optimizer.step()` (DINO freezes its last
        layer here by dropping that layer's gradients: `p.grad = None` makes the optimizer skip it)."""

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        """Called after every optimizer step (not on skipped steps); returns extra metrics."""
        return {}

    def on_epoch_start(self, epoch: int, steps_per_epoch: int) -> None:
        """Called at every epoch start, including the epoch a resumed run starts in."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in `named_parameters()`) exempt from weight decay, beyond 1-d params."""
        names = set()
        for n in getattr(self.backbone, "no_weight_decay", lambda: set())():
            names.add(f"backbone.{n}")
        return names

    def on_train_end(self, out_dir: Path) -> list[Path]:
        """Called once, on the main process, after the backbone export at the end of a run: write what else the
        objective leaves behind under `out_dir` (CLIP: the whole model for open_clip). Returns what it wrote."""
        return []

    def visualize(self, batch: dict[str, Any], path: Path) -> Path | None:
        """Write a PNG that shows what the objective learns; None if it has nothing to show."""
        return None
