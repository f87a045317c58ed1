"""The optimizer (timm's, with no-decay groups and layer-wise lr decay) and its per-update lr schedule."""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from pretrain.checkpoint import torch_optimizer


def build_optimizer(model: torch.nn.Module, optim: Any, lr: float, device: torch.device) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"eps": optim.eps}
    if optim.name.lower() in ("adamw", "adam", "lamb", "adan", "lion", "nadamw"):
        kwargs["betas"] = tuple(optim.betas)
    if optim.name.lower() in ("adamw", "adam") and device.type == "cuda":
        kwargs["fused"] = True
    return create_optimizer_v2(
        model,
        opt=optim.name,
        lr=lr,
        weight_decay=optim.weight_decay,
        momentum=optim.momentum,
        layer_decay=optim.layer_decay or None,
        **kwargs,
    )


def decayed_groups(optimizer: torch.optim.Optimizer) -> list[int]:
    """The groups whose weight decay optim.weight_decay_end schedules: those created with decay (no-decay groups
    of biases and norms stay at 0). Kept apart, not as a flag in the param groups: a flag there would go into the
    checkpoint and a fresh optimizer could not load it."""
    return [i for i, g in enumerate(optimizer.param_groups) if g.get("weight_decay", 0.0) > 0.0]


def cosine_schedule(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, lr: float,
                    min_lr: float) -> CosineLRScheduler:
    """timm's per-update warmup + cosine over `total_steps`."""
    return CosineLRScheduler(
        torch_optimizer(optimizer),
        t_initial=max(1, total_steps - warmup_steps),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0 if warmup_steps else lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
