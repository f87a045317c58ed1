"""Heads and a metric loss on top of embeddings: small modules, usable on frozen features and in fine-tuning.

* `CosineClassifier`: logits = s * cos(feature, class weight), both L2-normalised; s fixed or learned
  (Gidaris & Komodakis 2018, CosFace without the margin). Scale-free features make the logits depend on
  direction only, which suits self-supervised embeddings whose norms vary.
* `ClassCentreHead`: one unit-norm centre per class, an exponential moving average of its members'
  normalised features; prediction by the nearest centre (cosine); optional centre loss (Wen et al. 2016).
  No gradients reach the centres: they are buffers, so they checkpoint with the module.
* `TripletLoss`: batch-hard triplet loss on L2-normalised embeddings (Hermans et al. 2017, "In Defense of
  the Triplet Loss"), for metric learning that feeds retrieval.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """`logits = scale * normalize(x) @ normalize(W).T`, W (num_classes, dim).

    `learn_scale=True` trains the scale as a log-parameter (it stays positive) starting at `scale`;
    otherwise it is a fixed buffer.
    """

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0, learn_scale: bool = False) -> None:
        super().__init__()
        if dim < 1 or num_classes < 1:
            raise ValueError(f"dim={dim} and num_classes={num_classes} must be >= 1")
        if not scale > 0:
            raise ValueError(f"scale={scale}: must be > 0")
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)
        log_scale = torch.tensor(math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """cos(theta) between each row of x (B, dim) and each class weight: (B, num_classes) in [-1, 1]."""
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.cosine(x)

    def extra_repr(self) -> str:
        learned = isinstance(self.log_scale, nn.Parameter)
        return f"dim={self.weight.shape[1]}, num_classes={self.weight.shape[0]}, learn_scale={learned}"


class ClassCentreHead(nn.Module):
    """Nearest-class-centre classifier with EMA centres on the unit sphere.

    Update rule, for each class c present in a batch, with m_c the mean of its members' normalised features:
        c <- normalize(momentum * c + (1 - momentum) * m_c)     (a class's first update: c <- normalize(m_c))
    `momentum` is the weight of the old centre (as in MoCo/DINO). Under torch.distributed the per-class sums
    and counts are all-reduced first, so every rank holds the same centres.
    `forward` returns cosine similarities (B, num_classes); a class never seen scores -inf.
    """

    def __init__(self, dim: int, num_classes: int, momentum: float = 0.9) -> None:
        super().__init__()
        if dim < 1 or num_classes < 1:
            raise ValueError(f"dim={dim} and num_classes={num_classes} must be >= 1")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum}: must be in [0, 1)")
        self.momentum = momentum
        self.register_buffer("centres", torch.zeros(num_classes, dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        x, labels = self._check(x, labels)
        feats = F.normalize(x.float(), dim=-1)
        num_classes = self.centres.shape[0]
        sums = torch.zeros_like(self.centres).index_add_(0, labels, feats)
        counts = torch.bincount(labels, minlength=num_classes).to(feats.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        present = counts > 0
        means = sums[present] / counts[present].unsqueeze(1)
        old = self.centres[present]
        fresh = ~self.seen[present]
        blended = self.momentum * old + (1.0 - self.momentum) * means
        new = torch.where(fresh.unsqueeze(1), means, blended)
        self.centres[present] = F.normalize(new, dim=-1).to(self.centres.dtype)
        self.seen |= present

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sims = F.normalize(x, dim=-1) @ self.centres.to(x.dtype).t()
        return sims.masked_fill(~self.seen, float("-inf"))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.seen.any()):
            raise RuntimeError("ClassCentreHead has no centres yet: call update(features, labels) first")
        return self(x).argmax(dim=1)

    def centre_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of 1/2 ||normalize(x) - c_y||^2 = 1 - cos(x, c_y); pulls features to their centre.

        Samples whose class has no centre yet contribute nothing. Gradients flow into x only.
        """
        x, labels = self._check(x, labels)
        feats = F.normalize(x, dim=-1)
        known = self.seen[labels]
        if not bool(known.any()):
            return feats.sum() * 0.0
        cos = (feats[known] * self.centres[labels[known]].to(feats.dtype)).sum(dim=-1)
        return (1.0 - cos).mean()

    def _check(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_classes, dim = self.centres.shape
        if x.dim() != 2 or x.shape[1] != dim:
            raise ValueError(f"features must be (B, {dim}), got {tuple(x.shape)}")
        labels = labels.long()
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must be ({x.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
        return x, labels

    def extra_repr(self) -> str:
        return f"dim={self.centres.shape[1]}, num_classes={self.centres.shape[0]}, momentum={self.momentum}"


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, B) between rows; the sqrt is kept away from 0 so its gradient stays finite."""
    norms = x.pow(2).sum(dim=-1)
    sq = norms.unsqueeze(1) + norms.unsqueeze(0) - 2.0 * (x @ x.t())  # (B, B) without a (B, B, D) temporary
    return sq.clamp_min(1e-12).sqrt()


def batch_hard_mining(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each anchor i: the farthest sample of its class (not itself) and the nearest of another class.

    Returns (positive index (B,), negative index (B,), valid (B,) bool): an anchor is valid when it has at
    least one positive and one negative in the batch.
    """
    labels = labels.view(-1)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos_mask, neg_mask = same & ~eye, ~same
    pos_idx = dist.masked_fill(~pos_mask, float("-inf")).argmax(dim=1)
    neg_idx = dist.masked_fill(~neg_mask, float("inf")).argmin(dim=1)
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    return pos_idx, neg_idx, valid


class TripletLoss(nn.Module):
    """Batch-hard triplet loss: mean over valid anchors of relu(d(a, hardest p) - d(a, hardest n) + margin).

    Embeddings are L2-normalised first, so distances lie in [0, 2] and the margin is on that scale.
    A batch with no valid anchor (one class only, or singletons) gives a zero loss that keeps the graph.
    """

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        if not margin >= 0:
            raise ValueError(f"margin={margin}: must be >= 0")
        self.margin = margin

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or labels.shape != (x.shape[0],):
            raise ValueError(f"expected features (B, D) and labels (B,), got {tuple(x.shape)} and {tuple(labels.shape)}")
        emb = F.normalize(x.float(), dim=-1)
        dist = pairwise_distances(emb)
        pos_idx, neg_idx, valid = batch_hard_mining(dist.detach(), labels)
        if not bool(valid.any()):
            return emb.sum() * 0.0
        rows = torch.arange(len(x), device=x.device)
        d_ap, d_an = dist[rows, pos_idx], dist[rows, neg_idx]
        return F.relu(d_ap - d_an + self.margin)[valid].mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
