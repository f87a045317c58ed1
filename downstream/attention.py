"""Attention maps of any trained backbone: the last block's CLS-to-patch attention per head, overlaid on images.

    python -m downstream attention runs/dino data/fmnist/val --out attention.png --images 8

Works for whatever `pretrain.restore.load_backbone_from` reads (a run folder, a checkpoint, an exported
backbone) and any objective (DINO, MAE, CLIP, supervised): the images are taken, un-augmented, from a shard
set in its canonical order and normalised as the backbone was trained (`pretrain.backbone.data_stats`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.attention_maps import attention_grid_png
from pretrain.backbone import data_stats
from pretrain.restore import load_backbone_from
from pretrain.transforms import eval_transform
from shards.stream import ShardStream


def first_images(model: torch.nn.Module, shards: str | Path, n: int) -> torch.Tensor:
    """The first `n` images of a shard set (canonical order), preprocessed for `model`: (n, C, H, W)."""
    if n < 1:
        raise ValueError(f"n={n}: ask for at least one image")
    pe = model.patch_embed
    transform = eval_transform(pe.img_size[0], pe.proj.in_channels, *data_stats(model))
    stream = ShardStream(str(shards), batch_size=n, num_workers=0, transform=transform, mode="exact",
                         remainder="pad", shuffle=False, rank=0, world_size=1)
    for batch in stream.loader():
        return batch["image"][:n]
    raise ValueError(f"{shards} holds no readable image")


def attention_maps(source: str | Path, shards: str | Path, out: str | Path, n_images: int = 8,
                   device: str | torch.device | None = None) -> Path:
    """Write the PNG grid for the backbone at `source` on the first `n_images` of `shards`; return its path.
    `device`: default cuda when there is one, else cpu."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_backbone_from(source).to(device)
    images = first_images(model, shards, n_images).to(device)
    mean, std = data_stats(model)
    return attention_grid_png(model, images, out, mean, std, max_images=n_images)
