"""Classifiers on frozen features: linear probes by MAE's and by DINO's protocol, k-NN by DINO's protocol,
and the classification metrics they report.

Features are float tensors (N, D) already extracted by the backbone (`downstream.features`); labels are
integers in [0, num_classes). The probes run on the features' device, full tensors in memory, mini-batches
drawn by index (no DataLoader); k-NN searches an exact FAISS index in query batches. Every protocol returns a
`ProbeResult` (top-1, top-5, per-class accuracy, confusion matrix) that writes itself as JSON + PNG.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler
from torch import nn

from shards.atomic import write_text_atomic

__all__ = [
    "DINO_BASE_LRS",
    "PROTOCOLS",
    "LinearHeads",
    "ProbeResult",
    "check_features",
    "classification_metrics",
    "confusion_matrix",
    "held_out_split",
    "knn_classify",
    "knn_scores",
    "linear_probe_dino",
    "linear_probe_mae",
    "per_class_accuracy",
    "probe_checkpoint",
    "topk_accuracy",
]

# Base learning rates swept by the DINO protocol; each is scaled by batch_size / 256 like DINO does.
DINO_BASE_LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)

_EVAL_CHUNK = 65536  # rows per forward at evaluation: bounds memory for millions of features


# ----------------------------------------------------------------------------------------------- metrics


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    flat = labels.long().cpu() * num_classes + predictions.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> list[float | None]:
    """Recall of each class from a confusion matrix; None for a class with no samples."""
    totals = cm.sum(dim=1)
    return [float(cm[c, c] / totals[c]) if totals[c] > 0 else None for c in range(cm.shape[0])]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose true class ranks within the top k of `scores` (N, C).

    Ties count against: the rank of the true class is the number of *other* classes scoring >= it,
    so a class that merely ties at zero (e.g. no k-NN neighbour voted for it) is not a top-k hit.
    """
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the number of classes ({scores.shape[1]})")
    true_score = scores.gather(1, labels.long().view(-1, 1))
    rank = (scores >= true_score).sum(dim=1) - 1
    return float((rank < k).float().mean())


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top1 (argmax), top5 (None below 5 classes), per-class accuracy, confusion matrix, predictions.

    top1 is the accuracy of the argmax predictions (the first of tied maxima), so it agrees with the confusion
    matrix; top5 counts ties against the true class (`topk_accuracy`).
    """
    scores = scores.detach().float().cpu()
    labels = labels.long().cpu()
    predictions = scores.argmax(dim=1)
    cm = confusion_matrix(predictions, labels, num_classes)
    return {
        "top1": float((predictions == labels).float().mean()),
        "top5": topk_accuracy(scores, labels, 5) if num_classes >= 5 else None,
        "per_class_accuracy": per_class_accuracy(cm),
        "confusion_matrix": cm,
        "predictions": predictions,
    }


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


class LinearHeads(nn.Module):
    """`num_heads` independent linear classifiers on the same features, optionally behind a shared
    parameter-free BatchNorm (MAE's probe). Forward returns logits (num_heads, N, num_classes).

    The heads live in one (num_heads, C, D) weight and run as one matrix multiply, so a learning-rate
    sweep trains all its candidates in a single pass over the data (as DINOv2 does) for little more
    than the cost of one.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 1, batch_norm: bool = False) -> None:
        super().__init__()
        # MAE: BatchNorm without affine is a per-feature standardisation that leaves the probe linear.
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batch_norm else nn.Identity()
        self.weight = nn.Parameter(torch.empty(num_heads, num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes))
        self.reset_parameters(torch.Generator().manual_seed(0))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Weights ~ N(0, 0.01^2) truncated at 2 std (MAE, DINO init), biases zero; seeded."""
        nn.init.trunc_normal_(self.weight, std=0.01, a=-0.02, b=0.02, generator=generator)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, c, d = self.weight.shape
        logits = torch.addmm(self.bias.view(-1), self.norm(x), self.weight.view(h * c, d).t())
        return logits.view(-1, h, c).transpose(0, 1)

    def classifier(self, head: int = 0) -> nn.Sequential:
        """One head as a plain `Sequential(norm, Linear)` in eval mode, for use and saving on its own."""
        _, c, d = self.weight.shape
        linear = nn.Linear(d, c).to(self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight[head])
            linear.bias.copy_(self.bias[head])
        return nn.Sequential(copy.deepcopy(self.norm), linear).eval()


def _mae_optimizer(
    model: LinearHeads, lr: float, optimizer: str, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """MAE's LARS adapts and decays only the weight (>1-D), the bias gets plain momentum SGD."""
    if optimizer == "lars":
        groups = [
            {"params": [model.weight], "weight_decay": weight_decay, "always_adapt": True},
            {"params": [model.bias], "weight_decay": 0.0, "always_adapt": False},
        ]
        return Lars(groups, lr=lr, momentum=momentum)
    if optimizer == "sgd":
        groups = [{"params": [model.weight], "weight_decay": weight_decay}, {"params": [model.bias]}]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=0.0)
    raise ValueError(f"optimizer must be 'lars' or 'sgd', got {optimizer!r}")


def _fit(
    model: LinearHeads,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    warmup_epochs: float,
    batch_size: int,
    generator: torch.Generator,
    head_lr: torch.Tensor | None = None,
) -> None:
    """Mini-batch cross-entropy training; per-step cosine schedule with linear warmup (timm's scheduler).

    `head_lr` (num_heads,) multiplies each head's gradient. Under SGD with momentum and no weight decay the
    momentum buffer is linear in the gradients, so this is exactly SGD at lr = optimizer lr * head_lr[h].
    """
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
    num_heads = model.weight.shape[0]
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        for idx in torch.tensor_split(order, num_batches):
            scheduler.step_update(step)
            logits = model(x[idx])
            # Sum of each head's mean loss: heads share no parameters, so each gets exactly its own gradient.
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(num_heads)) * num_heads
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if head_lr is not None:
                model.weight.grad.mul_(head_lr.view(-1, 1, 1))
                model.bias.grad.mul_(head_lr.view(-1, 1))
            optimizer.step()
            step += 1
    model.eval()


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (num_heads, N, C) for LinearHeads, (N, C) for a single classifier; evaluated in chunks."""
    model.eval()
    return torch.cat([model(chunk) for chunk in x.split(_EVAL_CHUNK)], dim=-2)


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
        from downstream.visualize import confusion_matrix_png

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


def linear_probe_mae(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    epochs: int = 90,
    warmup_epochs: float = 10,
    batch_size: int = 4096,
    base_lr: float = 0.1,
    lr: float | None = None,
    optimizer: Literal["lars", "sgd"] = "lars",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> ProbeResult:
    """MAE's linear probe: BatchNorm1d(D, affine=False) -> Linear, LARS (timm's) or SGD with momentum,
    lr = base_lr * batch_size / 256 unless `lr` is given, linear warmup then cosine decay per step.

    No model selection: trains once on all of train and reports test accuracy after the last epoch.
    LARS moves the weight by about lr * 1e-3 of its norm per step, so MAE's defaults assume ImageNet's
    thousands of steps; on a set of a few thousand rows raise base_lr (e.g. 4) or use SGD.
    """
    started = time.perf_counter()
    train_x, train_y, test_x, test_y, num_classes = _prepare(
        train_features, train_labels, test_features, test_labels, num_classes, classes
    )
    batch_size = min(batch_size, len(train_x))
    if batch_size < 2:
        raise ValueError("MAE's probe trains a BatchNorm: it needs batches (and train sets) of 2 or more rows")
    scaled = lr is None  # MAE's rule: the absolute lr follows the batch size
    lr = base_lr * batch_size / 256 if scaled else lr
    generator = torch.Generator().manual_seed(seed)
    model = LinearHeads(train_x.shape[1], num_classes, num_heads=1, batch_norm=True).to(train_x.device)
    model.reset_parameters(generator)
    opt = _mae_optimizer(model, lr, optimizer, momentum, weight_decay)
    _fit(model, train_x, train_y, opt, epochs=epochs, warmup_epochs=warmup_epochs, batch_size=batch_size,
         generator=generator)
    classifier = model.classifier()
    return result_from_scores(
        f"mae-{optimizer}", _predict(classifier, test_x), test_y,
        num_classes=num_classes, num_train=len(train_x), classes=classes, seconds=time.perf_counter() - started,
        classifier=classifier,
        settings={"lr": lr, "base_lr": base_lr if scaled else None, "epochs": epochs,
                  "warmup_epochs": warmup_epochs, "batch_size": batch_size, "optimizer": optimizer,
                  "momentum": momentum, "weight_decay": weight_decay, "seed": seed},
        selection="none: one run at the given lr, evaluated after the last epoch",
    )  # fmt: skip


def _dino_fit(
    x: torch.Tensor, y: torch.Tensor, lrs: Sequence[float], num_classes: int, epochs: int, batch_size: int, seed: int
) -> LinearHeads:
    """One linear head per lr, trained together: SGD momentum 0.9, no weight decay, cosine to 0, no warmup."""
    generator = torch.Generator().manual_seed(seed)
    model = LinearHeads(x.shape[1], num_classes, num_heads=len(lrs)).to(x.device)
    model.reset_parameters(generator)
    # The schedule runs on a unit lr; each head's own lr enters through its gradient (see _fit).
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=0.0)
    head_lr = torch.tensor(lrs, dtype=torch.float32, device=x.device)
    _fit(model, x, y, opt, epochs=epochs, warmup_epochs=0, batch_size=batch_size, generator=generator,
         head_lr=head_lr)
    return model


def linear_probe_dino(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    base_lrs: Sequence[float] = DINO_BASE_LRS,
    held_out_fraction: float = 0.1,
    epochs: int = 100,
    batch_size: int = 1024,
    refit: bool = True,
    seed: int = 0,
) -> ProbeResult:
    """DINO's linear probe: Linear on the given features (DINO feeds the last-4 CLS concat, `pooling=last4`),
    SGD momentum 0.9, weight decay 0, cosine schedule to 0, lr = base_lr * batch_size / 256 swept over
    `base_lrs`.

    The lr is chosen on a seeded, stratified held-out split of *train* (highest held-out top-1, then lowest
    held-out loss, then smaller lr); test labels play no part. With `refit` (default) a fresh probe is then
    trained on all of train with that lr and evaluated on test; without it the sweep's best probe is kept.
    """
    started = time.perf_counter()
    train_x, train_y, test_x, test_y, num_classes = _prepare(
        train_features, train_labels, test_features, test_labels, num_classes, classes
    )
    if not base_lrs:
        raise ValueError("base_lrs is empty")
    fit_idx, held_idx = held_out_split(train_y, held_out_fraction, seed)
    fit_idx, held_idx = fit_idx.to(train_x.device), held_idx.to(train_x.device)
    sweep_batch = min(batch_size, len(fit_idx))
    lrs = [b * sweep_batch / 256 for b in base_lrs]
    sweep_model = _dino_fit(train_x[fit_idx], train_y[fit_idx], lrs, num_classes, epochs, sweep_batch, seed)

    held_logits = _predict(sweep_model, train_x[held_idx])
    held_y = train_y[held_idx]
    sweep = []
    for b, lr, logits in zip(base_lrs, lrs, held_logits):
        sweep.append({
            "base_lr": b,
            "lr": lr,
            "held_out_top1": float((logits.argmax(1) == held_y).float().mean()),
            "held_out_loss": float(F.cross_entropy(logits, held_y)),
        })  # fmt: skip
    best = min(range(len(sweep)), key=lambda i: (-sweep[i]["held_out_top1"], sweep[i]["held_out_loss"], lrs[i]))

    where = f"base_lr {base_lrs[best]} chosen on {len(held_idx)} held-out train rows"
    if refit:
        batch = min(batch_size, len(train_x))
        lr = base_lrs[best] * batch / 256
        classifier = _dino_fit(train_x, train_y, [lr], num_classes, epochs, batch, seed + 1).classifier()
        selection = f"{where}, refit on all {len(train_x)} train rows"
    else:
        batch, lr = sweep_batch, lrs[best]
        classifier = sweep_model.classifier(best)
        selection = f"{where}, the sweep's probe kept"
    return result_from_scores(
        "dino", _predict(classifier, test_x), test_y,
        num_classes=num_classes, num_train=len(train_x), classes=classes, seconds=time.perf_counter() - started,
        classifier=classifier,
        settings={"lr": lr, "base_lr": base_lrs[best], "epochs": epochs, "batch_size": batch,
                  "held_out_fraction": held_out_fraction, "refit": refit, "seed": seed},
        sweep=sweep, selection=selection,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------- k-NN


def _faiss_gpu_count() -> int:
    # faiss-cpu builds have no GPU symbols at all.
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def _normalized(x: torch.Tensor) -> np.ndarray:
    """Rows L2-normalised, as contiguous float32 numpy (what FAISS takes); a zero row stays zero."""
    return np.ascontiguousarray(F.normalize(x.float(), dim=1).cpu().numpy())


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
    database = _normalized(train_features)
    index = faiss.IndexFlatIP(database.shape[1])
    if use_gpu or (use_gpu is None and _faiss_gpu_count() > 0):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(database)
    train_y = train_labels.long().cpu()
    scores = torch.zeros(len(query_features), num_classes, dtype=torch.float32)
    for start in range(0, len(query_features), query_batch):
        queries = _normalized(query_features[start : start + query_batch])
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

PROTOCOLS = {"mae": linear_probe_mae, "dino": linear_probe_dino, "knn": knn_classify}


def probe_checkpoint(
    checkpoint,
    train: str | os.PathLike,
    test: str | os.PathLike,
    *,
    protocol: str = "dino",
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
    ("mae", "dino" or "knn", with `protocol_kwargs` passed on) and, given `out_dir`, write
    `<protocol>.json` + `<protocol>_confusion.png` there (main process only).

    Raises FeatureError (shards without labels, or not fitting the backbone), FileNotFoundError (no
    checkpoint), ValueError (bad protocol or settings).
    """
    from downstream.features import load_labelled_features

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: use one of {sorted(PROTOCOLS)}")
    if isinstance(checkpoint, (str, os.PathLike)):
        from pretrain.restore import load_backbone_from

        backbone, where = load_backbone_from(checkpoint), str(checkpoint)
    else:
        backbone, where = checkpoint, ""
    embed = dict(pooling=pooling, cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers,
                 accelerator=accelerator, precision=precision)
    tr = load_labelled_features(backbone, train, **embed)
    te = load_labelled_features(backbone, test, **embed)
    classes = protocol_kwargs.pop("classes", None) or tr.classes or te.classes or None
    result = PROTOCOLS[protocol](tr.feats, tr.labels, te.feats, te.labels, classes=classes, **protocol_kwargs)
    result.settings["features"] = {"checkpoint": where, "fingerprint": tr.fingerprint, "pooling": pooling,
                                   "dim": tr.dim, "train": str(train), "test": str(test),
                                   "cached": tr.cached and te.cached}
    if out_dir is not None and (accelerator is None or accelerator.is_main_process):
        result.save(out_dir)
    return result
