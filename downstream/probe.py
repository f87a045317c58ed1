"""Classifiers on frozen features: linear probes by MAE's and by DINO's protocol, k-NN by DINO's protocol, and
the heads of `pretrain.heads` (cosine classifier, nearest class centre) trained the same way.

Features are float tensors (N, D) already extracted by the backbone (`downstream.features`); labels are
integers in [0, num_classes). The probes run on the features' device, full tensors in memory, mini-batches
drawn by index (no DataLoader); k-NN searches an exact FAISS index in query batches. Every protocol returns a
`ProbeResult` (top-1, top-5, per-class accuracy, confusion matrix) that writes itself as JSON + PNG.

A trained probe sees standardised features (MAE: BatchNorm without affine; DINO: train mean/std folded into its
Linear), trains for at least `min_steps` optimizer steps, and chooses its hyper-parameters on a held-out split of
*train* only: the weight decay by held-out top-1, the lr by the training objective it reaches (`_best`), the grid
grown when the best value sits on an edge. With at least WHITEN_MIN_ROWS_PER_DIM rows per dimension the linear
probes also try whitened features (`Whiten`, `try_whiten=True`) and keep whichever normalisation wins on the
held-out rows: SGD on nearly collinear features (a small ViT's mean-pooled tokens) otherwise stops points short.
On pixels and on a trained tiny ViT's features each protocol then lands within half a point of (or above)
scikit-learn's LogisticRegression with C tuned on the same split (tests/test_probe.py). The metrics live in
`downstream.metrics` (re-exported here).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn

from downstream.features import load_labelled_features
from downstream.metrics import classification_metrics
from downstream.retrieval import faiss_gpu_count, l2_normalized
from downstream.visualize import confusion_matrix_png
from pretrain.heads import ClassCentreHead, CosineClassifier
from pretrain.restore import load_backbone_from
from shards.atomic import write_text_atomic

__all__ = [
    "DINO_BASE_LRS",
    "HEADS",
    "MAE_BASE_LRS",
    "PROTOCOLS",
    "WEIGHT_DECAYS",
    "CosineHeads",
    "HeadwiseSGD",
    "LinearHeads",
    "ProbeRecipe",
    "ProbeResult",
    "Standardize",
    "Whiten",
    "centre_probe",
    "check_features",
    "cosine_probe",
    "embed_train_test",
    "held_out_split",
    "knn_classify",
    "knn_scores",
    "linear_probe_dino",
    "linear_probe_mae",
    "probe_checkpoint",
    "probe_features",
    "resolve_protocol",
    "select_hyperparameters",
]

# The grids each protocol sweeps on held-out train (grown one step past an edge that wins). Base learning rates
# are scaled by batch_size / 256, as DINO and MAE do; on standardised features the best-converging lr is large,
# so the grid reaches 10 (DINO's own 1e-3..0.3 stopped SGD short: the under-report). MAE's LARS steps by
# lr * 1e-3 of the weight's norm, so its lrs are larger still. Weight decays span "none" to strong
# (scikit-learn's C is about 1 / (wd * n)).
DINO_BASE_LRS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAE_BASE_LRS: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)
WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

WHITEN_MIN_ROWS_PER_DIM = 5  # a linear probe tries whitened features only with this many train rows per dimension
_EVAL_CHUNK = 65536  # rows per forward at evaluation: bounds memory for millions of features


# ------------------------------------------------------------------------------------------------ inputs


def check_features(
    features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate one (features, labels) pair and return them as float32 / int64 tensors.

    Raises ValueError naming `name` and what is wrong: shape, dtype, length, non-finite values, negative labels.
    """
    x = torch.as_tensor(features)
    y = torch.as_tensor(labels)
    if x.ndim != 2:
        raise ValueError(f"{name} features must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} features must be real numbers, got {x.dtype}")
    if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{name} labels must be a 1-D integer tensor, got {y.dtype} of shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise ValueError(f"{name} has {len(x)} feature rows but {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{name} is empty")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} features contain NaN or inf")
    y = y.long().to(x.device)
    if int(y.min()) < 0:
        raise ValueError(f"{name} labels must be >= 0, found {int(y.min())}")
    return x, y


def _resolve_num_classes(num_classes: int | None, *label_sets: torch.Tensor) -> int:
    seen = max(int(y.max()) for y in label_sets) + 1
    if num_classes is None:
        return seen
    if seen > num_classes:
        raise ValueError(f"a label is {seen - 1} but num_classes={num_classes}")
    return num_classes


def held_out_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, stratified split of row indices into (train, held_out).

    Each class gives round(fraction * n_c) rows to held_out, at least one when it has two or more,
    so model selection sees every class that can spare a sample.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    train_parts, held_parts = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_held = min(max(round(fraction * len(members)), 1), len(members) - 1) if len(members) > 1 else 0
        held_parts.append(members[:n_held])
        train_parts.append(members[n_held:])
    train_idx, held_idx = torch.cat(train_parts).sort().values, torch.cat(held_parts).sort().values
    if len(held_idx) == 0:
        raise ValueError("no class has two samples, so nothing can be held out for model selection")
    return train_idx, held_idx


# ------------------------------------------------------------------------------------------------- model


class Standardize(nn.Module):
    """`(x - mean) / std` with fixed per-feature statistics (buffers), fitted once on training rows.

    A constant feature (std below 1e-6 of its magnitude, or exactly zero) keeps std 1, so it maps to ~0 on the
    rows it was fitted on and never blows up on new rows. Parameter-free: the probe behind it stays linear
    in the features, and `fold_into` turns the pair into one `nn.Linear` on raw features.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    @classmethod
    def fit(cls, x: torch.Tensor) -> Standardize:
        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False)
        scale = x.abs().amax(dim=0)
        return cls(mean, torch.where(std > 1e-6 * scale, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def fold_into(self, linear: nn.Linear) -> nn.Linear:
        """The Linear that computes linear(self(x)) from raw x: W' = W / std, b' = b - W' @ mean."""
        out = nn.Linear(linear.in_features, linear.out_features).to(linear.weight.device)
        with torch.no_grad():
            out.weight.copy_(linear.weight / self.std)
            out.bias.copy_(linear.bias - out.weight @ self.mean)
        return out


class LinearHeads(nn.Module):
    """`num_heads` independent linear classifiers on the same features, behind one shared parameter-free
    normalisation: MAE's BatchNorm1d without affine (`batch_norm=True`), a fixed `Standardize`, or none.
    Forward returns logits (num_heads, N, num_classes).

    The heads live in one (num_heads, C, D) weight and run as one matrix multiply, so a hyper-parameter sweep
    trains all its candidates in a single pass over the data (as DINOv2 does) for little more than the cost of
    one; `HeadwiseSGD` gives each head its own lr and weight decay.
    """

    def __init__(
        self, dim: int, num_classes: int, num_heads: int = 1, batch_norm: bool = False, norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        if batch_norm and norm is not None:
            raise ValueError("give batch_norm=True or a norm module, not both")
        # MAE: BatchNorm without affine is a per-feature standardisation that leaves the probe linear.
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batch_norm else norm or nn.Identity()
        self.weight = nn.Parameter(torch.empty(num_heads, num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes))
        self.reset_parameters(torch.Generator().manual_seed(0))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Weights ~ N(0, 0.01^2) truncated at 2 std (MAE, DINO init), biases zero; seeded. Every head starts
        from the same draw, so a candidate's result does not depend on which others share its pass."""
        _, c, d = self.weight.shape
        one = nn.init.trunc_normal_(torch.empty(c, d), std=0.01, a=-0.02, b=0.02, generator=generator)
        with torch.no_grad():
            self.weight.copy_(one.to(self.weight.device).expand_as(self.weight))
            self.bias.zero_()

    def forward_nch(self, x: torch.Tensor) -> torch.Tensor:
        """Logits laid out (N, num_classes, num_heads): the layout cross-entropy reduces fastest over classes."""
        h, c, d = self.weight.shape
        weight = self.weight.transpose(0, 1).reshape(c * h, d)
        return torch.addmm(self.bias.t().reshape(-1), self.norm(x), weight.t()).view(-1, c, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_nch(x).permute(2, 0, 1)

    def classifier(self, head: int = 0, fold: bool = False) -> nn.Sequential:
        """One head as a plain `Sequential(norm, Linear)` in eval mode, for use and saving on its own;
        `fold=True` with a `Standardize` or `Whiten` norm gives `Sequential(Linear)` on raw features instead."""
        _, c, d = self.weight.shape
        linear = nn.Linear(d, c).to(self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight[head])
            linear.bias.copy_(self.bias[head])
        if fold and isinstance(self.norm, (Standardize, Whiten)):
            return nn.Sequential(self.norm.fold_into(linear)).eval()
        return nn.Sequential(copy.deepcopy(self.norm), linear).eval()


class CosineHeads(nn.Module):
    """`num_heads` cosine classifiers (`pretrain.heads.CosineClassifier`, learned scale) trained in one pass:
    logits[h] = scale[h] * normalize(x) @ normalize(W[h]).T; `classifier(h)` returns head h as a
    CosineClassifier."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 1, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, num_classes, dim))
        self.log_scale = nn.Parameter(torch.full((num_heads,), math.log(scale)))
        self.initial_scale = scale
        self.reset_parameters(torch.Generator().manual_seed(0))

    def reset_parameters(self, generator: torch.Generator) -> None:
        _, c, d = self.weight.shape
        one = nn.init.trunc_normal_(torch.empty(c, d), std=0.02, a=-0.04, b=0.04, generator=generator)
        with torch.no_grad():
            self.weight.copy_(one.to(self.weight.device).expand_as(self.weight))
            self.log_scale.fill_(math.log(self.initial_scale))

    def forward_nch(self, x: torch.Tensor) -> torch.Tensor:
        h, c, d = self.weight.shape
        weight = F.normalize(self.weight, dim=-1).transpose(0, 1).reshape(c * h, d)
        return (F.normalize(x, dim=-1) @ weight.t()).view(-1, c, h) * self.log_scale.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_nch(x).permute(2, 0, 1)

    def classifier(self, head: int = 0, fold: bool = False) -> nn.Module:

        _, c, d = self.weight.shape
        out = CosineClassifier(d, c, scale=float(self.log_scale[head].detach().exp()), learn_scale=True)
        with torch.no_grad():
            out.weight.copy_(self.weight[head])
            out.log_scale.copy_(self.log_scale[head])
        return out.to(self.weight.device).eval()


class HeadwiseSGD(torch.optim.Optimizer):
    """Momentum SGD or LARS for parameters whose first dimension indexes independent heads, each head with its
    own learning rate and weight decay (`head_lr`, `head_wd`: tensors of length num_heads in each group).

    Head h follows exactly `torch.optim.SGD(lr=head_lr[h] * lr, momentum, weight_decay=head_wd[h])`, or with
    `lars=True` timm's `Lars(..., always_adapt=True)` with its trust ratio computed per head (MAE's probe
    optimizer). The group's `lr` is a multiplier that a scheduler drives (1.0 = the heads' own lrs).
    """

    def __init__(self, groups: list[dict], momentum: float = 0.9, trust_coeff: float = 1e-3, eps: float = 1e-8):
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        defaults = dict(lr=1.0, momentum=momentum, lars=False, trust_coeff=trust_coeff, eps=eps)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                view = (-1,) + (1,) * (p.dim() - 1)
                wd = group["head_wd"].to(p.device).view(view)
                d = p.grad.add(p * wd)
                if group["lars"]:
                    w_norm = p.flatten(1).norm(dim=1).view(view)
                    g_norm = p.grad.flatten(1).norm(dim=1).view(view)
                    trust = group["trust_coeff"] * w_norm / (g_norm + w_norm * wd + group["eps"])
                    d.mul_(torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust)))
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                    d = state["momentum_buffer"]
                p.sub_(d * (group["lr"] * group["head_lr"].to(p.device).view(view)))


def _fit(
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
    """Mini-batch cross-entropy training of heads with a `forward_nch` (logits (N, C, num_heads)); per-step cosine schedule with linear
    warmup (timm's scheduler). Every head sees the same batches in the same order."""
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
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (num_heads, N, C) for LinearHeads, (N, C) for a single classifier; evaluated in chunks."""
    model.eval()
    return torch.cat([model(chunk) for chunk in x.split(_EVAL_CHUNK)], dim=-2)


class Whiten(nn.Module):
    """`(x - mean) @ W`, W = V diag(1 / sqrt(lambda)) from the eigen-decomposition of the training rows'
    covariance: decorrelated unit-variance coordinates. Directions whose variance is below `floor` x the
    largest are dropped (a linear probe on them could only fit noise). Parameter-free and fixed like
    `Standardize`, so the probe behind it is still one linear map of the raw features (`fold_into`).

    Why: SGD converges at a rate set by the condition number of the features' covariance. Standardising fixes
    each feature's scale but not their correlations; the mean-pooled tokens of a small ViT are nearly collinear
    (a condition number of 1e14 after standardising, measured), and SGD then stops points short of the optimum
    that scikit-learn's lbfgs reaches. Whitening makes the problem round. It is a candidate the probes choose on
    held-out train (`_probe_with_selection`), never forced: on well-conditioned features (pixels) and on few
    rows, standardising generalises better.
    """

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("matrix", matrix.detach().clone().float())  # (D, K), K <= D kept directions

    @classmethod
    def fit(cls, x: torch.Tensor, floor: float = 1e-6) -> Whiten:
        mean = x.mean(dim=0)
        centred = (x - mean).double()
        cov = centred.t() @ centred / max(len(x) - 1, 1)
        eigenvalues, vectors = torch.linalg.eigh(cov)
        keep = eigenvalues > floor * eigenvalues.max().clamp_min(1e-300)
        if not bool(keep.any()):  # constant features: one zero direction, so the head still has an input
            keep[-1] = True
            eigenvalues = torch.ones_like(eigenvalues)
        return cls(mean, vectors[:, keep] / eigenvalues[keep].sqrt())

    @property
    def out_features(self) -> int:
        return self.matrix.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.matrix

    def fold_into(self, linear: nn.Linear) -> nn.Linear:
        """The Linear that computes linear(self(x)) from raw x: W' = W M^T, b' = b - W' @ mean."""
        out = nn.Linear(self.matrix.shape[0], linear.out_features).to(linear.weight.device)
        with torch.no_grad():
            out.weight.copy_(linear.weight @ self.matrix.t())
            out.bias.copy_(linear.bias - out.weight @ self.mean)
        return out


# ---------------------------------------------------------------------------------------- hyper-parameter sweep


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


def _train_heads(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, candidates: Sequence[tuple[float, float]],
    recipe: ProbeRecipe, seed: int,
) -> tuple[nn.Module, dict]:  # fmt: skip
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
    )  # fmt: skip
    # Fixed statistics: standardise the rows once, train on them, then put the norm in front of the heads.
    _fit(model, x if norm is None else norm(x), y, opt, epochs=epochs, warmup_epochs=warmup, batch_size=batch,
         generator=generator)
    if norm is not None:  # MAE's BatchNorm stays behind a whitening
        model.norm = nn.Sequential(norm, model.norm) if recipe.norm == "batchnorm" else norm
    return model, {"batch_size": batch, "epochs_run": epochs, "warmup_epochs_run": round(warmup, 3),
                   "steps": epochs * steps_per_epoch}


def _next_value(grid: list[float], upward: bool) -> float | None:
    """The value one grid step beyond an edge (the ratio of the two values at that edge), or None when the edge
    cannot move: a grid of one value (fixed by the caller) or a lower edge of 0 (no weight decay)."""
    if len(grid) < 2:
        return None
    if upward:
        top, below = grid[-1], grid[-2]
        ratio = top / below if below > 0 else 10.0
        return float(f"{top * ratio:.6g}") if top > 0 else None
    bottom, above = grid[0], grid[1]
    return float(f"{bottom * bottom / above:.6g}") if bottom > 0 else None


def _held_out_rank(record: dict) -> tuple:
    """Order of weight decays: highest held-out top-1, then lowest held-out loss, then the stronger decay."""
    return (-record["held_out_top1"], record["held_out_loss"], -record["weight_decay"])


def _best(records) -> dict:
    """The chosen candidate. The lr is an optimisation knob: for each weight decay the lr whose head reached the
    lowest training objective on the fit rows (mean cross-entropy + wd / 2 * |W|^2; ties: the smaller lr). The
    weight decay is the regulariser: among those heads, the best on the held-out rows (`_held_out_rank`). This
    is how scikit-learn's tuned LogisticRegression works (exact optimum per C, C on held-out rows), with SGD;
    choosing lr x wd jointly on a few hundred held-out rows instead picks lucky, under-trained heads."""
    per_wd: dict[float, dict] = {}
    for r in records:
        current = per_wd.get(r["weight_decay"])
        if current is None or (r["fit_objective"], r["base_lr"]) < (current["fit_objective"], current["base_lr"]):
            per_wd[r["weight_decay"]] = r
    return min(per_wd.values(), key=_held_out_rank)


def select_hyperparameters(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, recipe: ProbeRecipe, *,
    base_lrs: Sequence[float], weight_decays: Sequence[float], held_out_fraction: float, seed: int,
    max_grid_extensions: int = 3,
) -> dict:  # fmt: skip
    """Sweep base_lr x weight_decay on a seeded, stratified held-out split of the *train* rows.

    Every candidate is a head trained on the rest of train (all in one pass) and chosen by `_best`: the lr by
    its training objective on those rows, the weight decay on the held-out rows. When the best value of either hyper-parameter sits on its grid's edge, the grid grows one step
    beyond that edge and only the new candidates are trained; at most `max_grid_extensions` times per edge.
    Candidates are trained from the same initialisation on the same batches, so a result does not depend on the
    grid around it. Returns {"best", "records", "grid", "extensions", "models", "fit_rows", "held_out_rows",
    "train_info"}.
    """
    lrs = sorted({float(v) for v in base_lrs})
    wds = sorted({float(v) for v in weight_decays})
    if not lrs or not wds:
        raise ValueError("the base lr and weight decay grids must not be empty")
    if lrs[0] <= 0 or wds[0] < 0:
        raise ValueError(f"base lrs must be > 0 and weight decays >= 0, got {lrs} and {wds}")
    fit_idx, held_idx = held_out_split(y, held_out_fraction, seed)
    fit_idx, held_idx = fit_idx.to(x.device), held_idx.to(x.device)
    fx, fy, hx, hy = x[fit_idx], y[fit_idx], x[held_idx], y[held_idx]
    records: dict[tuple[float, float], dict] = {}
    models: dict[tuple[float, float], tuple[nn.Module, int]] = {}
    extensions: list[dict] = []
    moves = {(name, way): 0 for name in ("base_lr", "weight_decay") for way in ("up", "down")}
    todo = [(lr, wd) for lr in lrs for wd in wds]
    round_ = 0
    info: dict = {}
    while todo:
        model, info = _train_heads(fx, fy, num_classes, todo, recipe, seed)
        logits = _predict(model, hx)
        fit_logits = _predict(model, fx)
        for h, ((lr, wd), lg) in enumerate(zip(todo, logits)):
            finite = bool(torch.isfinite(lg).all()) and bool(torch.isfinite(fit_logits[h]).all())
            fit_loss = float(F.cross_entropy(fit_logits[h], fy)) if finite else math.inf
            records[(lr, wd)] = {
                "base_lr": lr,
                "lr": lr * info["batch_size"] / 256,
                "weight_decay": wd,
                "held_out_top1": float((lg.argmax(1) == hy).float().mean()) if finite else 0.0,
                "held_out_loss": float(F.cross_entropy(lg, hy)) if finite else math.inf,
                "fit_loss": fit_loss,
                "fit_objective": fit_loss + 0.5 * wd * float(model.weight[h].detach().pow(2).sum()),
                "round": round_,
            }
            models[(lr, wd)] = (model, h)
        best = _best(records.values())
        round_ += 1
        new = {}
        for name, grid, value in (("base_lr", lrs, best["base_lr"]), ("weight_decay", wds, best["weight_decay"])):
            for way, edge in (("up", grid[-1]), ("down", grid[0])):
                if value == edge and moves[(name, way)] < max_grid_extensions:
                    nxt = _next_value(grid, way == "up")
                    if nxt is not None and nxt not in grid:
                        moves[(name, way)] += 1
                        new[name] = nxt
                        extensions.append({"hyper_parameter": name, "direction": way, "added": nxt,
                                           "best_was": value, "round": round_})
                        break
        if "base_lr" in new:
            lrs = sorted([*lrs, new["base_lr"]])
        if "weight_decay" in new:
            wds = sorted([*wds, new["weight_decay"]])
        todo = [(lr, wd) for lr in lrs for wd in wds if (lr, wd) not in records]
    best = _best(records.values())
    on_edge = [name for name, grid in (("base_lr", lrs), ("weight_decay", wds))
               if len(grid) > 1 and best[name] in (grid[0], grid[-1]) and not (name == "weight_decay" and best[name] == 0)]
    return {
        "best": best,
        "records": sorted(records.values(), key=lambda r: (r["base_lr"], r["weight_decay"])),
        "grid": {"base_lrs": lrs, "weight_decays": wds},
        "extensions": extensions,
        "still_on_edge": on_edge,
        "models": models,
        "fit_rows": len(fit_idx),
        "held_out_rows": len(held_idx),
        "train_info": info,
    }


# ------------------------------------------------------------------------------------------------ result


@dataclass
class ProbeResult:
    """What a probe or k-NN reports; every protocol gives the same shape.

    `settings` holds the protocol's own knobs (lr/epochs/batch_size for a linear probe, k/temperature for
    k-NN); `sweep` the candidates model selection saw, `selection` how the reported one was chosen.
    `to_dict()` / `to_json()` give everything but the trained classifier; `save(folder)` writes JSON + PNG.
    """

    protocol: str
    top1: float
    top5: float | None
    num_classes: int
    num_train: int
    num_test: int
    per_class_accuracy: list[float | None]
    confusion_matrix: list[list[int]]
    settings: dict = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)
    selection: str = ""
    classes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    classifier: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "classifier"}
        return copy.deepcopy(d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, folder: str | os.PathLike, name: str | None = None) -> dict[str, Path]:
        """Write `folder/<name>.json` and the confusion matrix `folder/<name>_confusion.png` (each atomically;
        `name` defaults to the protocol); returns their paths."""
        folder = Path(folder)
        name = name or self.protocol
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad result name {name!r}: use a plain file stem")
        paths = {"json": folder / f"{name}.json", "confusion_png": folder / f"{name}_confusion.png"}
        write_text_atomic(paths["json"], self.to_json() + "\n")
        title = f"{self.protocol} ({self.num_train} train / {self.num_test} test)"
        confusion_matrix_png(np.asarray(self.confusion_matrix, dtype=np.int64), paths["confusion_png"],
                             classes=self.classes or None, title=title)
        return paths


def result_from_scores(
    protocol: str, scores: torch.Tensor, test_y: torch.Tensor, *, num_classes: int, num_train: int,
    classes: Sequence[str] | None, seconds: float, classifier: nn.Module | None = None, **extra,
) -> ProbeResult:  # fmt: skip
    """Metrics of class scores against labels, as the ProbeResult every protocol (and fine-tuning) reports."""
    metrics = classification_metrics(scores, test_y, num_classes)
    names = list(classes or [])
    if names and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return ProbeResult(
        protocol=protocol,
        top1=metrics["top1"],
        top5=metrics["top5"],
        num_classes=num_classes,
        num_train=num_train,
        num_test=len(test_y),
        per_class_accuracy=metrics["per_class_accuracy"],
        confusion_matrix=metrics["confusion_matrix"].tolist(),
        classes=names,
        seconds=round(seconds, 3),
        classifier=classifier,
        **extra,
    )


def _prepare(train_x, train_y, test_x, test_y, num_classes, classes=None):
    train_x, train_y = check_features(train_x, train_y, "train")
    test_x, test_y = check_features(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dims but test features {test_x.shape[1]}")
    test_x, test_y = test_x.to(train_x.device), test_y.to(train_x.device)
    if num_classes is None and classes:
        num_classes = len(classes)
    return train_x, train_y, test_x, test_y, _resolve_num_classes(num_classes, train_y, test_y)


# --------------------------------------------------------------------------------------------- protocols


def _fallback(grid: Sequence[float]) -> float:
    """The grid's median value (the lower of the two middle ones): the choice when nothing can be held out."""
    values = sorted({float(v) for v in grid})
    return values[(len(values) - 1) // 2]


def _probe_with_selection(
    protocol: str, recipe: ProbeRecipe, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
    test_y: torch.Tensor, *, num_classes: int, classes, base_lrs, weight_decays, held_out_fraction: float,
    refit: bool, seed: int, max_grid_extensions: int, started: float, extra_settings: dict,
    try_whiten: bool = False,
) -> ProbeResult:  # fmt: skip
    """Choose (base_lr, weight_decay) on held-out train rows, refit on all of train, score on test."""
    recipe.validate()
    can_hold_out = int(torch.bincount(train_y).max()) >= 2
    if can_hold_out:
        # A linear probe on enough rows also tries whitened features (`Whiten`): the normalisation is chosen on
        # the held-out rows with the weight decay. Fewer than WHITEN_MIN_ROWS_PER_DIM rows per dimension estimate
        # the covariance too poorly to whiten by.
        variants = [recipe]
        if (try_whiten and recipe.head == "linear" and not recipe.whiten
                and len(train_x) >= WHITEN_MIN_ROWS_PER_DIM * train_x.shape[1]):
            variants.append(replace(recipe, whiten=True))
        tried = []
        for variant in variants:
            sel = select_hyperparameters(
                train_x, train_y, num_classes, variant, base_lrs=base_lrs, weight_decays=weight_decays,
                held_out_fraction=held_out_fraction, seed=seed, max_grid_extensions=max_grid_extensions,
            )
            for record in sel["records"]:
                record["whiten"] = variant.whiten
            tried.append((_held_out_rank(sel["best"]), len(tried), variant, sel))
        _, _, recipe, sel = min(tried, key=lambda t: t[:2])
        best = sel["best"]
        base_lr, wd = best["base_lr"], best["weight_decay"]
        where = ("" if len(tried) == 1 else
                 f"features {'whitened' if recipe.whiten else 'standardised' if recipe.norm == 'standardize' else 'batch-normalised'}"
                 f" (held-out top-1 {tried[0][3]['best']['held_out_top1']:.4f} as the protocol has it, "
                 f"{tried[1][3]['best']['held_out_top1']:.4f} whitened), ")
        where += (f"weight_decay {wd:g} chosen on {sel['held_out_rows']} held-out train rows (held-out top-1 "
                 f"{best['held_out_top1']:.4f}), base_lr {base_lr:g} by the lowest training objective on the other "
                 f"{sel['fit_rows']} ({len(sel['records'])} candidates)")
        if sel["extensions"]:
            grown = ", ".join(f"{e['hyper_parameter']} {e['direction']} to {e['added']:g}" for e in sel["extensions"])
            where += f"; grid extended at its edge: {grown}"
        if sel["still_on_edge"]:
            where += f"; still on the grid's edge after {max_grid_extensions} extensions: {sel['still_on_edge']}"
        sweep = [r for *_, other in tried for r in other["records"]]
        chosen = {"base_lr": base_lr, "weight_decay": wd, "held_out_top1": best["held_out_top1"],
                  "held_out_loss": best["held_out_loss"], "fit_objective": best["fit_objective"],
                  "held_out_rows": sel["held_out_rows"], "fit_rows": sel["fit_rows"],
                  "rule": "weight_decay: best held-out top-1 (then loss); base_lr: lowest training objective"}
        grid = {**sel["grid"], "extensions": sel["extensions"], "still_on_edge": sel["still_on_edge"]}
    else:  # one labelled row per class (1-shot): nothing to hold out, so no selection
        refit = True
        base_lr, wd = _fallback(base_lrs), min(float(w) for w in weight_decays)
        where = (f"no selection: every class has one train row, nothing to hold out; the grid's median base_lr "
                 f"{base_lr:g} and its smallest weight_decay {wd:g}")
        sweep, chosen, grid = [], None, {"base_lrs": sorted(base_lrs), "weight_decays": sorted(weight_decays),
                                         "extensions": [], "still_on_edge": []}
    fold = recipe.norm == "standardize" or recipe.whiten
    if refit:
        model, info = _train_heads(train_x, train_y, num_classes, [(base_lr, wd)], recipe, seed)
        classifier = model.classifier(0, fold=fold)
        selection = f"{where}, refit on all {len(train_x)} train rows"
    else:
        model, head = sel["models"][(base_lr, wd)]
        classifier, info = model.classifier(head, fold=fold), sel["train_info"]
        selection = f"{where}, the sweep's probe kept (trained on {sel['fit_rows']} rows)"
    settings = {
        "base_lr": base_lr, "lr": base_lr * info["batch_size"] / 256, "weight_decay": wd,
        "chosen_on_held_out": chosen, "grid": grid,
        "epochs": recipe.epochs, "epochs_run": info["epochs_run"], "steps": info["steps"],
        "min_steps": recipe.min_steps, "warmup_epochs": recipe.warmup_epochs,
        "warmup_epochs_run": info["warmup_epochs_run"], "batch_size": info["batch_size"],
        "optimizer": recipe.optimizer, "momentum": recipe.momentum, "norm": recipe.norm, "whiten": recipe.whiten,
        "head": recipe.head,
        "held_out_fraction": held_out_fraction, "refit": refit, "seed": seed, **extra_settings,
    }  # fmt: skip
    return result_from_scores(
        protocol, _predict(classifier, test_x), test_y,
        num_classes=num_classes, num_train=len(train_x), classes=classes, seconds=time.perf_counter() - started,
        classifier=classifier, settings=settings, sweep=sweep, selection=selection,
    )  # fmt: skip


def linear_probe_mae(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    base_lrs: Sequence[float] = MAE_BASE_LRS,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    base_lr: float | None = None,
    weight_decay: float | None = None,
    epochs: int = 90,
    warmup_epochs: float = 10,
    batch_size: int = 4096,
    min_steps: int = 3000,
    optimizer: Literal["lars", "sgd"] = "lars",
    momentum: float = 0.9,
    held_out_fraction: float = 0.2,
    refit: bool = True,
    max_grid_extensions: int = 3,
    try_whiten: bool = True,
    seed: int = 0,
) -> ProbeResult:
    """MAE's linear probe: BatchNorm1d(D, affine=False) -> Linear (the BatchNorm standardises each feature and
    leaves the probe linear), LARS (timm's rule, trust ratio per head) or SGD with momentum 0.9,
    lr = base_lr * batch_size / 256, linear warmup then cosine decay per step.

    base_lr and weight decay are chosen on a seeded, stratified split of *train* as the DINO probe's are
    (`base_lrs` x `weight_decays`, grown at an edge; `base_lr=` / `weight_decay=` fix one value), then a fresh probe is trained
    on all of train (`refit`) and scored on test; test labels play no part. At least `min_steps` optimizer steps:
    LARS moves a weight by about lr * 1e-3 of its norm per step, so MAE's 90 epochs (~7,000 ImageNet steps)
    become a few dozen steps on a small set without it.
    """
    started = time.perf_counter()
    train_x, train_y, test_x, test_y, num_classes = _prepare(
        train_features, train_labels, test_features, test_labels, num_classes, classes
    )
    if min(batch_size, len(train_x)) < 2:
        raise ValueError("MAE's probe trains a BatchNorm: it needs batches (and train sets) of 2 or more rows")
    recipe = ProbeRecipe(head="linear", norm="batchnorm", optimizer=optimizer, momentum=momentum, epochs=epochs,
                         warmup_epochs=warmup_epochs, batch_size=batch_size, min_steps=min_steps)
    return _probe_with_selection(
        f"mae-{optimizer}", recipe, train_x, train_y, test_x, test_y, num_classes=num_classes, classes=classes,
        base_lrs=base_lrs if base_lr is None else (base_lr,),
        weight_decays=weight_decays if weight_decay is None else (weight_decay,),
        held_out_fraction=held_out_fraction, refit=refit, seed=seed, max_grid_extensions=max_grid_extensions,
        started=started, extra_settings={}, try_whiten=try_whiten,
    )  # fmt: skip


def linear_probe_dino(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    base_lrs: Sequence[float] = DINO_BASE_LRS,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    held_out_fraction: float = 0.2,
    epochs: int = 100,
    batch_size: int = 1024,
    min_steps: int = 3000,
    standardize: bool = True,
    refit: bool = True,
    max_grid_extensions: int = 3,
    try_whiten: bool = True,
    seed: int = 0,
) -> ProbeResult:
    """DINO's linear probe: Linear on the given features (DINO feeds the last-4 CLS concat, `pooling=last4`),
    SGD momentum 0.9, cosine schedule to 0, no warmup, lr = base_lr * batch_size / 256; base_lr and weight decay
    swept (`base_lrs` x `weight_decays`, grown at an edge).

    `standardize` (default) z-scores each feature with train statistics first and folds them into the returned
    Linear, so the probe is still one linear layer on the raw features; without it SGD crawls on features
    whose mean is large beside their spread (mean-pooled tokens after a LayerNorm: mean ~0.5, std ~0.1).
    The hyper-parameters are chosen on a seeded, stratified split of *train* (`held_out_fraction` held out):
    the weight decay by held-out top-1 (then loss), the lr by the training objective it reaches (`_best`); test
    labels play no part. With `refit` (default) a fresh probe is then trained on all of train and evaluated on
    test; without it the sweep's best probe is kept. At least `min_steps` optimizer steps: DINO's 100 epochs are
    ~125k steps on ImageNet but 200 on a set of 2,000 rows.
    """
    started = time.perf_counter()
    train_x, train_y, test_x, test_y, num_classes = _prepare(
        train_features, train_labels, test_features, test_labels, num_classes, classes
    )
    recipe = ProbeRecipe(head="linear", norm="standardize" if standardize else "none", optimizer="sgd",
                         momentum=0.9, epochs=epochs, warmup_epochs=0.0, batch_size=batch_size, min_steps=min_steps)
    return _probe_with_selection(
        "dino", recipe, train_x, train_y, test_x, test_y, num_classes=num_classes, classes=classes,
        base_lrs=base_lrs, weight_decays=weight_decays, held_out_fraction=held_out_fraction, refit=refit,
        seed=seed, max_grid_extensions=max_grid_extensions, started=started, extra_settings={},
        try_whiten=try_whiten,
    )  # fmt: skip


def cosine_probe(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    base_lrs: Sequence[float] = DINO_BASE_LRS,
    weight_decays: Sequence[float] = (0.0,),
    scale: float = 16.0,
    held_out_fraction: float = 0.2,
    epochs: int = 100,
    batch_size: int = 1024,
    min_steps: int = 3000,
    refit: bool = True,
    max_grid_extensions: int = 3,
    seed: int = 0,
) -> ProbeResult:
    """A `pretrain.heads.CosineClassifier` (learned scale, starting at `scale`) trained on frozen features with
    cross-entropy by the DINO probe's recipe (SGD momentum 0.9, cosine schedule, lr swept on held-out train and
    grown at an edge, refit on all of train). No standardisation: the head sees only the features' directions,
    as k-NN and retrieval do. The returned classifier is the CosineClassifier itself."""
    started = time.perf_counter()
    train_x, train_y, test_x, test_y, num_classes = _prepare(
        train_features, train_labels, test_features, test_labels, num_classes, classes
    )
    recipe = ProbeRecipe(head="cosine", norm="none", optimizer="sgd", momentum=0.9, epochs=epochs,
                         warmup_epochs=0.0, batch_size=batch_size, min_steps=min_steps, cosine_scale=scale)
    return _probe_with_selection(
        "cosine", recipe, train_x, train_y, test_x, test_y, num_classes=num_classes, classes=classes,
        base_lrs=base_lrs, weight_decays=weight_decays, held_out_fraction=held_out_fraction, refit=refit,
        seed=seed, max_grid_extensions=max_grid_extensions, started=started,
        extra_settings={"initial_scale": scale},
    )  # fmt: skip


def centre_probe(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
) -> ProbeResult:
    """Nearest class centre by cosine (`pretrain.heads.ClassCentreHead`, one full update): each centre is the
    renormalised mean of its class's L2-normalised train features; a test row goes to the most similar centre.
    No hyper-parameters, no selection; a class without train rows scores -inf."""

    started = time.perf_counter()
    train_x, train_y, test_x, test_y, num_classes = _prepare(
        train_features, train_labels, test_features, test_labels, num_classes, classes
    )
    head = ClassCentreHead(train_x.shape[1], num_classes, momentum=0.0).to(train_x.device)
    head.update(train_x, train_y)  # a class's first update sets its centre to its normalised mean
    head.eval()
    return result_from_scores(
        "centre", _predict(head, test_x), test_y,
        num_classes=num_classes, num_train=len(train_x), classes=classes, seconds=time.perf_counter() - started,
        classifier=head, settings={"metric": "cosine", "centre": "normalised mean of L2-normalised train features"},
        selection="none: no hyper-parameters",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------- k-NN


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    query_batch: int = 4096,
    use_gpu: bool | None = None,
) -> torch.Tensor:
    """DINO's weighted k-NN vote: (Q, C) class scores, score[q, c] = sum over the k nearest train rows of
    class c of exp(cos_sim / temperature).

    Features are L2-normalised; neighbours come from an exact FAISS inner-product index (IndexFlatIP),
    searched `query_batch` queries at a time so memory stays bounded for millions of train rows.
    `use_gpu`: None = use FAISS GPUs when the build has any.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if query_batch < 1:
        raise ValueError(f"query_batch must be >= 1, got {query_batch}")
    k = min(k, len(train_features))
    database = l2_normalized(train_features.float().cpu().numpy(), "train features")
    index = faiss.IndexFlatIP(database.shape[1])
    if use_gpu or (use_gpu is None and faiss_gpu_count() > 0):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(database)
    train_y = train_labels.long().cpu()
    scores = torch.zeros(len(query_features), num_classes, dtype=torch.float32)
    for start in range(0, len(query_features), query_batch):
        queries = l2_normalized(query_features[start : start + query_batch].float().cpu().numpy(), "query features")
        sims, ids = index.search(queries, k)
        weights = torch.from_numpy(sims).div_(temperature).exp_()
        neighbour_labels = train_y[torch.from_numpy(ids)]
        scores[start : start + len(queries)].scatter_add_(1, neighbour_labels, weights)
    return scores


def knn_classify(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    k: int = 20,
    temperature: float = 0.07,
    query_batch: int = 4096,
    use_gpu: bool | None = None,
) -> ProbeResult:
    """k-NN classification by DINO's protocol (k=20, T=0.07, weighted vote; see `knn_scores`).

    top-5 counts ties against the true class (a class no neighbour voted for is never a hit), where DINO's
    sort breaks ties arbitrarily; top-1 is the argmax of the votes.
    """
    started = time.perf_counter()
    train_x, train_y, test_x, test_y, num_classes = _prepare(
        train_features, train_labels, test_features, test_labels, num_classes, classes
    )
    scores = knn_scores(train_x, train_y, test_x, num_classes=num_classes, k=k, temperature=temperature,
                        query_batch=query_batch, use_gpu=use_gpu)
    return result_from_scores(
        "knn", scores, test_y,
        num_classes=num_classes, num_train=len(train_x), classes=classes, seconds=time.perf_counter() - started,
        settings={"k": min(k, len(train_x)), "temperature": temperature, "metric": "cosine",
                  "index": "faiss.IndexFlatIP"},
        selection="none: fixed k and temperature",
    )  # fmt: skip


# ------------------------------------------------------------------------------------- from a checkpoint

PROTOCOLS = {"mae": linear_probe_mae, "dino": linear_probe_dino, "knn": knn_classify, "cosine": cosine_probe,
             "centre": centre_probe}
# --head: which classifier sits on the frozen features. "linear" runs the linear protocol given (dino or mae).
HEADS = ("linear", "cosine", "centre")


def resolve_protocol(protocol: str = "dino", head: str = "linear") -> str:
    """The PROTOCOLS key for a (linear-probe protocol, head) pair: head "linear" keeps the protocol ("dino",
    "mae", or "knn"); "cosine" and "centre" name their own."""
    if head not in HEADS:
        raise ValueError(f"head={head!r}: use one of {list(HEADS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: use one of {sorted(PROTOCOLS)}")
    return protocol if head == "linear" else head


def probe_features(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    protocol: str = "dino",
    head: str = "linear",
    **protocol_kwargs,
) -> ProbeResult:
    """What `python -m downstream probe --protocol P --head H` runs once the features are embedded."""
    name = resolve_protocol(protocol, head)
    return PROTOCOLS[name](train_features, train_labels, test_features, test_labels, **protocol_kwargs)


def embed_train_test(
    checkpoint, train: str | os.PathLike, test: str | os.PathLike, *, pooling: str = "cls",
    cache_dir: str | os.PathLike | None = None, batch_size: int = 256, num_workers: int = 0, accelerator=None,
    precision: str = "no",
) -> tuple:  # fmt: skip
    """(train Features, test Features, a description of them for a report) of two labelled shard sets embedded
    with `checkpoint` (run folder, checkpoint, exported backbone, or a loaded backbone; cached in `cache_dir`)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        backbone, where = load_backbone_from(checkpoint), str(checkpoint)
    else:
        backbone, where = checkpoint, ""
    embed = dict(pooling=pooling, cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers,
                 accelerator=accelerator, precision=precision)
    tr = load_labelled_features(backbone, train, **embed)
    te = load_labelled_features(backbone, test, **embed)
    info = {"checkpoint": where, "fingerprint": tr.fingerprint, "pooling": pooling, "dim": tr.dim,
            "train": str(train), "test": str(test), "cached": tr.cached and te.cached}
    return tr, te, info


def probe_checkpoint(
    checkpoint,
    train: str | os.PathLike,
    test: str | os.PathLike,
    *,
    protocol: str = "dino",
    head: str = "linear",
    pooling: str = "cls",
    cache_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator=None,
    precision: str = "no",
    **protocol_kwargs,
) -> ProbeResult:
    """One call for a CLI: embed labelled `train` and `test` shard sets with `checkpoint` (a run folder,
    checkpoint or exported backbone, or a loaded backbone; features cached in `cache_dir`), run `protocol`
    ("mae", "dino", "knn", "cosine" or "centre"; or `head` "cosine" / "centre" in place of the linear one, with
    `protocol_kwargs` passed on) and, given `out_dir`, write `<protocol>.json` + `<protocol>_confusion.png`
    there (main process only).

    Raises FeatureError (shards without labels, or not fitting the backbone), FileNotFoundError (no
    checkpoint), ValueError (bad protocol, head or settings).
    """
    name = resolve_protocol(protocol, head)
    tr, te, info = embed_train_test(checkpoint, train, test, pooling=pooling, cache_dir=cache_dir,
                                    batch_size=batch_size, num_workers=num_workers, accelerator=accelerator,
                                    precision=precision)
    classes = protocol_kwargs.pop("classes", None) or tr.classes or te.classes or None
    result = PROTOCOLS[name](tr.feats, tr.labels, te.feats, te.labels, classes=classes, **protocol_kwargs)
    result.settings["features"] = info
    if out_dir is not None and (accelerator is None or accelerator.is_main_process):
        result.save(out_dir)
    return result
