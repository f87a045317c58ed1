"""What a run is learning, measured cheaply: collapse monitors and last-block attention maps.

Collapse monitors (DINO's failure mode, most reported at small batch sizes; Caron et al. 2021, Sec. 5.3):
  * `entropy` of the teacher's output distribution: 0 when every sample picks one prototype (collapse to a
    dominant dimension), log(K) when the output is uniform (collapse to uniform);
  * `kl_divergence` between teacher and student: 0 when both collapse the same way;
  * `embedding_std`: mean over dimensions of the per-dimension std of the L2-normalised embeddings (SimSiam's
    measure): 1/sqrt(D) for embeddings spread like random directions, 0 when all samples share one vector;
  * `effective_rank`: exp of the entropy of the normalised singular values (Roy & Vetterli 2007; RankMe):
    n for n orthonormal rows, 1 for rows that are all equal.
`CollapseMonitor` keeps the last measurement and warns loudly, at most once every `every` steps, when the
embedding std falls near zero. The alarms that read these measurements over time (entropy near ln K, a loss
climbing while the rank falls, the online k-NN falling) are `pretrain.evaluate.CollapseAlarms`.

Attention maps: `cls_attention` recomputes the last block's softmax(q k^T / sqrt(d)) from that block's input
(caught by a hook): timm's fused attention never materialises the weights. Works for any timm ViT.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("vitssl.monitors")


# ------------------------------------------------------------------------------------------- collapse


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum p log p (nats) of probability rows (N, K); 0 log 0 = 0."""
    return torch.special.entr(probs.float()).sum(dim=-1).mean()


def kl_divergence(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || q) = sum p (log p - log q), from probabilities p and log-probabilities log_q."""
    p = p.float()
    return (torch.special.xlogy(p, p) - p * log_q.float()).sum(dim=-1).mean()


def embedding_std(emb: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the (unbiased) per-dimension std of the L2-normalised rows of `emb` (N, D)."""
    if emb.dim() != 2 or emb.shape[0] < 2:
        raise ValueError(f"embedding_std needs (N >= 2, D) embeddings, got {tuple(emb.shape)}")
    z = F.normalize(emb.float(), dim=-1)
    return z.std(dim=0).mean()


def effective_rank(emb: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """exp(H(p)) with p = singular values of `emb` (N, D) / their sum: between 1 and min(N, D)."""
    if emb.dim() != 2:
        raise ValueError(f"effective_rank needs (N, D) embeddings, got {tuple(emb.shape)}")
    s = torch.linalg.svdvals(emb.float())
    p = s / s.sum().clamp_min(eps)
    return torch.exp(torch.special.entr(p).sum())


def _is_main_rank() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


class CollapseMonitor:
    """Measure an embedding batch (`measure`) every step; warn (`check`) when its std is near zero.

    The threshold is relative to the spread of random directions: warn when `embedding_std * sqrt(D)` is below
    `warn_below`, at most once every `every` steps, on the main process only.
    """

    def __init__(self, warn_below: float = 0.05, every: int = 100) -> None:
        self.warn_below = warn_below
        self.every = every
        self.last: dict[str, float] = {}
        self._dim = 0
        self._last_warned: int | None = None

    @torch.no_grad()
    def measure(self, emb: torch.Tensor) -> dict[str, float]:
        self._dim = emb.shape[-1]
        self.last = {"embed_std": float(embedding_std(emb)), "embed_rank": float(effective_rank(emb))}
        return dict(self.last)

    def check(self, step: int) -> bool:
        """True (and a logged warning) when the last measurement looks collapsed and a warning is due."""
        if not self.last or self.warn_below <= 0:
            return False
        relative = self.last["embed_std"] * math.sqrt(self._dim)
        if relative >= self.warn_below:
            return False
        if self._last_warned is not None and step - self._last_warned < self.every:
            return False
        self._last_warned = step
        if _is_main_rank():
            log.warning(
                f"!!! COLLAPSE WARNING at step {step}: the normalised embedding std is {self.last['embed_std']:.2e} "
                f"({relative:.3f} x the 1/sqrt({self._dim}) of random directions; effective rank "
                f"{self.last['embed_rank']:.1f}). Every image is getting nearly the same embedding. DINO: raise "
                f"the batch size, lower the teacher temperature or raise center_momentum; check the lr."
            )
        return True


# ------------------------------------------------------------------------------------------- attention


def _patch_grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    pe = model.patch_embed
    if getattr(model, "dynamic_img_size", False):
        return tuple(pe.dynamic_feat_size(images.shape[-2:]))
    return tuple(pe.grid_size)


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention from the CLS token to every patch, per head: (B, heads, gh, gw).

    Rows are softmax weights over all tokens; the prefix tokens' (CLS, registers) share is left out, so a map
    sums to at most 1. The block's input is caught with a forward pre-hook and its attention recomputed
    with timm's own q/k projections and norms.
    """
    if getattr(model, "cls_token", None) is None:
        raise ValueError("cls_attention needs a ViT with a CLS token")
    attn = model.blocks[-1].attn
    caught: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        caught.append(args[0] if args else kwargs["x"])

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    x = caught[-1]
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q.float() * attn.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
    p = model.num_prefix_tokens
    gh, gw = _patch_grid(model, images)
    if n - p != gh * gw:
        raise ValueError(f"{n - p} patch tokens do not fill the {gh}x{gw} patch grid")
    return weights[:, :, 0, p:].reshape(b, attn.num_heads, gh, gw)


def attention_grid_png(
    model: nn.Module,
    images: torch.Tensor,
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    max_images: int = 8,
) -> Path:
    """PNG grid, one row per image: the image, then each head's CLS-to-patch attention overlaid, then their mean.

    `images` are normalised with (mean, std) (undone for display). Each map is upsampled bilinearly to the
    image size and scaled to its own [0, 1] range.
    """
    from matplotlib.figure import Figure  # not pyplot: no global state, safe off the main thread

    from shards.atomic import atomic_path

    images = images[:max_images]
    maps = cls_attention(model, images)
    maps = torch.cat([maps, maps.mean(dim=1, keepdim=True)], dim=1)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    maps = ((maps - lo) / (hi - lo).clamp_min(1e-12)).float().cpu()  # float: bf16 autocast (run.precision=bf16)
    m = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    shown = (images.float().cpu() * s + m).clamp(0, 1)
    n, heads, c = images.shape[0], maps.shape[1] - 1, images.shape[1]
    cols = heads + 2
    fig = Figure(figsize=(cols * 1.3, n * 1.3), dpi=100)
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        img = shown[i, 0] if c == 1 else shown[i].permute(1, 2, 0)
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(img.numpy(), cmap="gray" if c == 1 else None, vmin=0.0, vmax=1.0)
            if j:
                ax.imshow(maps[i, j - 1].numpy(), cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0)
            ax.set_axis_off()
            if i == 0:
                ax.set_title("image" if j == 0 else ("mean" if j == cols - 1 else f"head {j}"), fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
