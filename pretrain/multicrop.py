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

    def __init__(
        self,
        *,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        global_size: int,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_number: int = 8,
        local_size: int = 96,
        local_scale: Sequence[float] = (0.05, 0.4),
        blur_prob: Sequence[float] = (1.0, 0.1, 0.5),
        solarize_prob: float = 0.2,
        hflip: bool = True,
        color_jitter_prob: float = 0.8,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        grayscale_prob: float = 0.2,
    ) -> None:
        if len(blur_prob) != 3:
            raise ValueError(f"blur_prob needs 3 values (global 1, global 2, locals), got {list(blur_prob)}")
        if local_number < 0:
            raise ValueError(f"local_number={local_number}: must be >= 0")
        common = dict(in_chans=in_chans, mean=mean, std=std, hflip=hflip, color_jitter_prob=color_jitter_prob,
                      color_jitter=color_jitter, grayscale_prob=grayscale_prob)
        self.global_1 = dino_view(global_size, global_scale, blur_prob=blur_prob[0], **common)
        self.global_2 = dino_view(global_size, global_scale, blur_prob=blur_prob[1], solarize_prob=solarize_prob,
                                  **common)
        self.local = dino_view(local_size, local_scale, blur_prob=blur_prob[2], **common)
        self.local_number = local_number
        self.sizes = [global_size] * 2 + [local_size] * local_number
        # Once per image, not per view: the right channel count, as a uint8 tensor.
        self.to_image = v2.Compose([EnsureMode(in_chans), v2.ToImage()])

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
