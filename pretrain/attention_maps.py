"""Last-block attention maps of any timm ViT: `cls_attention` recomputes the last block's softmax(q k^T / sqrt(d))
from that block's input (caught by a hook; timm's fused attention never materialises the weights), and
`attention_grid_png` draws them over the images. DINO draws them at the end of a run; `python -m downstream
attention` for any backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shards.atomic import atomic_path


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
