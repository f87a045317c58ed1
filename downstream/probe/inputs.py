"""What every protocol checks first: features and labels as (N, D) float32 / (N,) int64 tensors on one device,
the number of classes, and the seeded stratified split of train that model selection holds out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["check_features", "held_out_split", "prepare"]


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


def prepare(
    train_x, train_y, test_x, test_y, num_classes: int | None, classes: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Checked (train_x, train_y, test_x, test_y, num_classes), test moved to train's device; `num_classes`
    defaults to the class names' count, else to the largest label + 1."""
    train_x, train_y = check_features(train_x, train_y, "train")
    test_x, test_y = check_features(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dims but test features {test_x.shape[1]}")
    test_x, test_y = test_x.to(train_x.device), test_y.to(train_x.device)
    if num_classes is None and classes:
        num_classes = len(classes)
    return train_x, train_y, test_x, test_y, _resolve_num_classes(num_classes, train_y, test_y)
