"""DINO's multi-crop views (Caron et al. 2021, after SwAV): 2 global crops + N local crops per image.

One PIL image becomes (converted to a uint8 tensor once) a list of normalised float tensors `[global_1, global_2, local_1, ..., local_N]`;
the stream's `default_collate` turns a batch of such lists into a list of batched tensors, one per view.
The augmentations are DINO's `DataAugmentationDINO`, written with torchvision.transforms.v2 on uint8 images:

    global 1:  RandomResizedCrop(global, global_scale) - flip - colour - blur (p=1.0)
    global 2:  RandomResizedCrop(global, global_scale) - flip - colour - blur (p=0.1) - solarize (p=0.2)
    local:     RandomResizedCrop(local, local_scale)   - flip - colour - blur (p=0.5)
    colour:    ColorJitter(0.4, 0.4, 0.2, 0.1) (objective.dino.color_jitter) with p=0.8, then RandomGrayscale(p=0.2)

On 1-channel images the colour-only operations (saturation, hue, grayscale) are left out; brightness and
contrast jitter remain (they are intensity changes). The Gaussian blur draws sigma in [0.1, 2.0] as DINO's
PIL blur does, with a kernel about a tenth of the crop (odd, at least 3), as in BYOL/SimCLR.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from pretrain.transforms import EnsureMode


def blur_kernel_size(crop_size: int) -> int:
    """An odd kernel about 10% of the crop, at least 3 (23 for 224, as BYOL)."""
    k = max(3, int(0.1 * crop_size))
    return k if k % 2 else k + 1


def _maybe(transform: Callable, p: float) -> list[Callable]:
    if p <= 0:
        return []
    return [transform] if p >= 1 else [v2.RandomApply([transform], p=p)]


@dataclass(frozen=True)
class MultiCropSpec:
    """DINO's view settings, checked once, for both view makers: `MultiCropTransform` (per sample, PIL, in the
    workers) and `pretrain.augment.BatchedMultiCrop` (on the batch, on the training device)."""

    in_chans: int
    mean: Sequence[float]
    std: Sequence[float]
    global_size: int
    global_scale: Sequence[float] = (0.4, 1.0)
    local_number: int = 8
    local_size: int = 96
    local_scale: Sequence[float] = (0.05, 0.4)
    blur_prob: Sequence[float] = (1.0, 0.1, 0.5)  # global 1, global 2, locals
    solarize_prob: float = 0.2  # global 2 only
    hflip: bool = True
    color_jitter_prob: float = 0.8
    color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    grayscale_prob: float = 0.2  # RGB only

    def __post_init__(self) -> None:
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans={self.in_chans}: DINO views are for 1- or 3-channel images")
        if len(self.blur_prob) != 3:
            raise ValueError(f"blur_prob needs 3 values (global 1, global 2, locals), got {list(self.blur_prob)}")
        if self.local_number < 0:
            raise ValueError(f"local_number={self.local_number}: must be >= 0")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values, got {list(self.mean)} / {list(self.std)}")
        j = self.color_jitter
        if len(j) != 4 or min(j) < 0 or j[3] > 0.5:
            raise ValueError(f"color_jitter={list(j)}: four strengths >= 0, hue at most 0.5")

    @property
    def sizes(self) -> list[int]:
        return [self.global_size] * 2 + [self.local_size] * self.local_number


def dino_view(
    size: int,
    scale: Sequence[float],
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    blur_prob: float,
    solarize_prob: float = 0.0,
    hflip: bool = True,
    color_jitter_prob: float = 0.8,
    color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
    grayscale_prob: float = 0.2,
) -> v2.Compose:
    """One DINO view: uint8 image tensor (in_chans, H, W) -> normalised float tensor (in_chans, size, size)."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans={in_chans}: DINO views are for 1- or 3-channel images")
    steps: list[Callable] = [
        v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if in_chans == 3:
        b, c, sat, hue = color_jitter
        steps += _maybe(v2.ColorJitter(brightness=b, contrast=c, saturation=sat, hue=hue), color_jitter_prob)
        steps += _maybe(v2.Grayscale(num_output_channels=3), grayscale_prob)
    else:
        steps += _maybe(v2.ColorJitter(brightness=color_jitter[0], contrast=color_jitter[1]), color_jitter_prob)
    steps += _maybe(v2.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0)), blur_prob)
    steps += _maybe(v2.RandomSolarize(threshold=128), solarize_prob)  # on uint8, as PIL's solarize
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class MultiCropTransform:
    """PIL image -> [global_1, global_2, local_1, ..., local_N] normalised float tensors."""

    def __init__(self, **settings: Any) -> None:
        """`settings`: the fields of `MultiCropSpec`."""
        spec = MultiCropSpec(**settings)
        common = dict(in_chans=spec.in_chans, mean=spec.mean, std=spec.std, hflip=spec.hflip,
                      color_jitter_prob=spec.color_jitter_prob, color_jitter=spec.color_jitter,
                      grayscale_prob=spec.grayscale_prob)
        self.global_1 = dino_view(spec.global_size, spec.global_scale, blur_prob=spec.blur_prob[0], **common)
        self.global_2 = dino_view(spec.global_size, spec.global_scale, blur_prob=spec.blur_prob[1],
                                  solarize_prob=spec.solarize_prob, **common)
        self.local = dino_view(spec.local_size, spec.local_scale, blur_prob=spec.blur_prob[2], **common)
        self.local_number = spec.local_number
        self.sizes = spec.sizes
        # Once per image, not per view: the right channel count, as a uint8 tensor.
        self.to_image = v2.Compose([EnsureMode(spec.in_chans), v2.ToImage()])

    def __call__(self, image) -> list[torch.Tensor]:
        x = self.to_image(image)
        return [self.global_1(x), self.global_2(x), *(self.local(x) for _ in range(self.local_number))]

    def __repr__(self) -> str:
        return f"MultiCropTransform(sizes={self.sizes})"


def decode_transform(size: int, in_chans: int) -> v2.Compose:
    """What a worker does when the views are made on the device (`pretrain.augment`): PIL image -> the right
    channel count -> shorter side resized to `size` (bicubic) -> centre crop -> uint8 (in_chans, size, size), so
    images of any size batch together. A crop of the resized image is a crop of the original at that scale."""
    return v2.Compose([
        EnsureMode(in_chans),
        v2.ToImage(),
        v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
    ])
