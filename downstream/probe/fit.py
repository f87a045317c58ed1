"""Training a probe's heads: the recipe a protocol trains by, the mini-batch loop, and evaluation in chunks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn

from downstream.probe.heads import CosineHeads, LinearHeads
from downstream.probe.normalize import Standardize, Whiten
from downstream.probe.optim import HeadwiseSGD

__all__ = ["EVAL_CHUNK", "ProbeRecipe", "fit_heads", "predict", "train_heads"]

EVAL_CHUNK = 65536  # rows per forward at evaluation: bounds memory for millions of features


@dataclass(frozen=True)
class ProbeRecipe:
    """How one protocol trains its heads: everything but the swept base lr and weight decay."""

    head: Literal["linear", "cosine"] = "linear"
    norm: Literal["none", "standardize", "batchnorm"] = "none"
    optimizer: Literal["sgd", "lars"] = "sgd"
    momentum: float = 0.9
    epochs: int = 100
    warmup_epochs: float = 0.0
    batch_size: int = 1024
    min_steps: int = 3000
    cosine_scale: float = 16.0
    whiten: bool = False  # linear head: whiten the features (`Whiten`) before the protocol's own norm

    def validate(self) -> None:
        if self.optimizer not in ("sgd", "lars"):
            raise ValueError(f"optimizer must be 'sgd' or 'lars', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.min_steps < 0:
            raise ValueError(f"epochs={self.epochs} and batch_size={self.batch_size} must be >= 1, "
                             f"min_steps={self.min_steps} >= 0")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be in [0, epochs={self.epochs})")


def fit_heads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    warmup_epochs: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """Mini-batch cross-entropy training of heads with a `forward_nch` (logits (N, C, num_heads)); per-step cosine
    schedule with linear warmup (timm's scheduler). Every head sees the same batches in the same order."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(x)
    # Near-equal batches instead of a ragged tail: BatchNorm cannot train on a batch of one.
    num_batches = max(math.ceil(n / batch_size), 1)
    total_steps = epochs * num_batches
    warmup_steps = min(round(warmup_epochs * num_batches), total_steps - 1)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=0.0,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    model.train()
    step = 0
    for _ in range(epochs):
        if num_batches == 1:  # full batch: the order of the rows changes nothing, skip the shuffle and copy
            batches = [(x, y)]
        else:
            order = torch.randperm(n, generator=generator).to(x.device)
            batches = [(x[idx], y[idx]) for idx in torch.tensor_split(order, num_batches)]
        for bx, by in batches:
            scheduler.step_update(step)
            logits = model.forward_nch(bx)  # (B, C, H)
            num_heads = logits.shape[2]
            # Sum of each head's mean loss: heads share no parameters, so each gets exactly its own gradient.
            loss = F.cross_entropy(logits, by.view(-1, 1).expand(-1, num_heads)) * num_heads
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (num_heads, N, C) for LinearHeads, (N, C) for a single classifier; evaluated in chunks."""
    model.eval()
    return torch.cat([model(chunk) for chunk in x.split(EVAL_CHUNK)], dim=-2)


def train_heads(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, candidates: Sequence[tuple[float, float]],
    recipe: ProbeRecipe, seed: int,
) -> tuple[nn.Module, dict]:
    """One head per (base_lr, weight_decay) candidate, trained together on (x, y); lr = base_lr * batch / 256.

    The protocol's epochs are a floor: a small train set gets more epochs until it has `min_steps` optimizer
    steps (100 epochs of 2 batches would stop SGD long before it converges; ImageNet's 100 epochs are 125k
    steps), and the warmup keeps its fraction of the schedule.
    """
    batch = min(recipe.batch_size, len(x))
    if recipe.norm == "batchnorm" and batch < 2:
        raise ValueError("MAE's probe trains a BatchNorm: it needs batches (and train sets) of 2 or more rows")
    steps_per_epoch = math.ceil(len(x) / batch)
    epochs = max(recipe.epochs, math.ceil(recipe.min_steps / steps_per_epoch))
    warmup = recipe.warmup_epochs * epochs / recipe.epochs
    n = len(candidates)
    norm: nn.Module | None = None  # a fixed map fitted on these rows, in front of the heads
    if recipe.head == "linear" and recipe.whiten:
        norm = Whiten.fit(x).to(x.device)
    elif recipe.head == "linear" and recipe.norm == "standardize":
        norm = Standardize.fit(x).to(x.device)
    dim = norm.out_features if isinstance(norm, Whiten) else x.shape[1]
    if recipe.head == "cosine":
        model = CosineHeads(dim, num_classes, n, scale=recipe.cosine_scale)
    else:
        model = LinearHeads(dim, num_classes, n, batch_norm=recipe.norm == "batchnorm")
    model = model.to(x.device)
    generator = torch.Generator().manual_seed(seed)
    model.reset_parameters(generator)
    lrs = torch.tensor([b * batch / 256 for b, _ in candidates], dtype=torch.float32, device=x.device)
    wds = torch.tensor([w for _, w in candidates], dtype=torch.float32, device=x.device)
    lars = recipe.optimizer == "lars"
    # LARS adapts and decays only the weight (MAE); biases and the cosine scale get plain momentum SGD.
    others = [p for name, p in model.named_parameters() if name != "weight"]
    opt = HeadwiseSGD(
        [{"params": [model.weight], "head_lr": lrs, "head_wd": wds, "lars": lars},
         {"params": others, "head_lr": lrs, "head_wd": torch.zeros_like(wds), "lars": False}],
        momentum=recipe.momentum,
    )
    # Fixed statistics: standardise the rows once, train on them, then put the norm in front of the heads.
    fit_heads(model, x if norm is None else norm(x), y, opt, epochs=epochs, warmup_epochs=warmup, batch_size=batch,
              generator=generator)
    if norm is not None:  # MAE's BatchNorm stays behind a whitening
        model.norm = nn.Sequential(norm, model.norm) if recipe.norm == "batchnorm" else norm
    return model, {"batch_size": batch, "epochs_run": epochs, "warmup_epochs_run": round(warmup, 3),
                   "steps": epochs * steps_per_epoch}
