"""Fixed, parameter-free maps fitted once on a probe's training rows and put in front of its linear heads:
per-feature standardisation and whitening. Both fold into the Linear behind them (`fold_into`), so a probe stays
one linear layer on the raw features."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Standardize", "Whiten"]


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


class Whiten(nn.Module):
    """`(x - mean) @ W`, W = V diag(1 / sqrt(lambda)) from the eigen-decomposition of the training rows'
    covariance: decorrelated unit-variance coordinates. Directions whose variance is below `floor` x the
    largest are dropped (a linear probe on them could only fit noise). Parameter-free and fixed like
    `Standardize`, so the probe behind it is still one linear map of the raw features (`fold_into`).

    Why: SGD converges at a rate set by the condition number of the features' covariance. Standardising fixes
    each feature's scale but not their correlations; the mean-pooled tokens of a small ViT are nearly collinear
    (README, linear probes), and SGD then stops points short of the optimum that scikit-learn's lbfgs
    reaches. Whitening makes the problem round. It is a candidate the probes choose on
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
