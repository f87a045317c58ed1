"""Per-sample preprocessing shared by every objective and by downstream feature extraction.

The normalisation a backbone was trained with travels with it: the trainer records the objective's
mean/std in every checkpoint's and export's config (timm's `pretrained_cfg_overlay`), and feature
extraction reads them back (`pretrain.backbone.data_stats`), so features see what training saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

from shards.bounds import MAX_ASPECT, MAX_PIXELS, check_image_size

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def normalize_stats(in_chans: int) -> Stats:
    """The default: ImageNet mean/std; for one channel their average (a gray image is the mean of its RGB)."""
    if in_chans == 3:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return (sum(IMAGENET_DEFAULT_MEAN) / 3,) * in_chans, (sum(IMAGENET_DEFAULT_STD) / 3,) * in_chans


def resolve_stats(mean, std, in_chans: int, key: str = "mean") -> Stats:
    """A recipe's (mean, std) for `in_chans` channels: empty -> the house default (`normalize_stats`), one value ->
    every channel; any other count than `in_chans` is a ValueError naming `key` (e.g. "objective.mae.mean")."""
    if mean is None or std is None or not len(mean):
        return normalize_stats(in_chans)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) == 1 and len(std) == 1:
        mean, std = mean * in_chans, std * in_chans
    if len(mean) != in_chans:
        raise ValueError(f"{key} has {len(mean)} values for {in_chans} channels")
    if len(std) != in_chans:
        raise ValueError(f"{key.rsplit('.', 1)[0]}.std has {len(std)} values for {in_chans} channels")
    return mean, std


class EnsureMode:
    """Convert a PIL image to the backbone's channel count ("L" for 1 channel, "RGB" for 3)."""

    def __init__(self, in_chans: int):
        self.mode = "L" if in_chans == 1 else "RGB"

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"EnsureMode({self.mode!r})"


class CheckBounds:
    """Pass an image through unchanged, or raise `shards.bounds.ImageBoundsError` when it has over `max_pixels`
    pixels or an aspect ratio over `max_aspect` (`shards.bounds.check_image_size`): at the head of a pipeline
    that resizes the shorter side to S, it bounds what the pipeline makes to max_aspect * S^2 pixels."""

    def __init__(self, max_pixels: int = MAX_PIXELS, max_aspect: int = MAX_ASPECT):
        self.max_pixels, self.max_aspect = max_pixels, max_aspect

    def __call__(self, img):
        height, width = v2.functional.get_size(img)  # PIL image or tensor, without touching the pixels
        check_image_size(width, height, max_pixels=self.max_pixels, max_aspect=self.max_aspect)
        return img

    def __repr__(self) -> str:
        return f"CheckBounds(max_pixels={self.max_pixels}, max_aspect={self.max_aspect})"


def eval_transform(
    img_size: int, in_chans: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> v2.Compose:
    """Deterministic: size check (`CheckBounds`), right channel count, resize + centre crop to img_size, normalise
    (default stats if none)."""
    if mean is None or std is None:
        mean, std = normalize_stats(in_chans)
    return v2.Compose(
        [
            CheckBounds(),  # first: Resize of a 1 x 2M image to the shorter side would make 16 x 33M pixels
            EnsureMode(in_chans),
            v2.ToImage(),
            v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def crop_transform(
    img_size: int | tuple[int, int],
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_scale: Sequence[float] = (0.2, 1.0),
    hflip: bool = True,
) -> v2.Compose:
    """The training view of MAE, CLIP and fine-tuning: PIL image (any mode) -> right channel count ->
    RandomResizedCrop (bicubic) to img_size -> optional horizontal flip -> float in [0, 1] -> Normalize."""
    steps: list = [
        v2.Grayscale(1) if in_chans == 1 else v2.RGB(),
        v2.ToImage(),
        v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of the normalisation, clamped to [0, 1] for display; x is (..., C, H, W)."""
    m = torch.tensor(list(mean), device=x.device, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(list(std), device=x.device, dtype=x.dtype).view(-1, 1, 1)
    return (x * s + m).clamp(0, 1)
