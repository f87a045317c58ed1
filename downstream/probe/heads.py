"""Many probe heads trained in one pass: `num_heads` independent classifiers in one (num_heads, C, D) weight, one
per hyper-parameter candidate. (The training heads of pretraining, which these hand out, are `pretrain.heads`.)"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from downstream.probe.normalize import Standardize, Whiten
from pretrain.heads import CosineClassifier

__all__ = ["CosineHeads", "LinearHeads"]


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
