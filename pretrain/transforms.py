"""Per-sample preprocessing shared by every objective and by downstream feature extraction.

Normalisation is a convention of the backbone's channel count, so a checkpoint's features are computed
with the same statistics it was trained with: ImageNet mean/std for RGB, 0.5/0.5 for grayscale.
"""

from __future__ import annotations

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2


def normalize_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_chans == 3:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return (0.5,) * in_chans, (0.5,) * in_chans


class EnsureMode:
    """Convert a PIL image to the backbone's channel count ("L" for 1 channel, "RGB" for 3)."""

    def __init__(self, in_chans: int):
        self.mode = "L" if in_chans == 1 else "RGB"

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"EnsureMode({self.mode!r})"


def to_normalized_tensor(in_chans: int) -> v2.Compose:
    mean, std = normalize_stats(in_chans)
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def eval_transform(img_size: int, in_chans: int) -> v2.Compose:
    """Deterministic: right channel count, resize + centre crop to img_size, normalise."""
    return v2.Compose(
        [
            EnsureMode(in_chans),
            v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            to_normalized_tensor(in_chans),
        ]
    )


def denormalize(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Inverse of the normalisation, clamped to [0, 1] for display."""
    mean, std = normalize_stats(in_chans)
    m = torch.tensor(mean, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0, 1)
