"""How a writer sizes images before storing them: every image S x S (centre-cropped or padded), or only the large
ones shrunk to fit M x M with their aspect kept.

Training crops and the retrieval index resize whatever is stored to the model's size anyway; storing at (or near)
that size makes shards smaller and decoding faster, and makes the set's statistics those of what is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageOps

FITS = ("crop", "pad")
RESAMPLE = Image.Resampling.BICUBIC  # antialiased when shrinking (Pillow scales the filter support)
PAD_FILL = 0  # black bars, as torchvision's Pad and timm's letterbox default


@dataclass(frozen=True)
class Resize:
    """`size` > 0: every image becomes size x size: `fit="crop"` scales the shorter side to `size` and cuts the
    centre, `fit="pad"` scales the longer side to `size` and pads the rest (black). `max_size` > 0 (without
    `size`): images whose longer side is above it are shrunk to fit max_size x max_size, aspect kept; smaller
    ones are stored as they are. Neither: images are stored at their own size. An image already at the target is
    not resampled."""

    size: int = 0
    fit: str = "crop"
    max_size: int = 0

    def __post_init__(self) -> None:
        if self.size < 0 or self.max_size < 0:
            raise ValueError(f"size and max_size must be >= 0, got {self.size} and {self.max_size}")
        if self.size and self.max_size:
            raise ValueError("give a size (every image S x S) or a max size (shrink only the large ones), not both")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")

    def __bool__(self) -> bool:
        return bool(self.size or self.max_size)

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.size:
            if image.size == (self.size, self.size):
                return image
            if self.fit == "crop":
                return ImageOps.fit(image, (self.size, self.size), method=RESAMPLE)
            fill = PAD_FILL if image.mode == "L" else (PAD_FILL,) * len(image.getbands())
            return ImageOps.pad(image, (self.size, self.size), method=RESAMPLE, color=fill)
        if self.max_size and max(image.size) > self.max_size:
            return ImageOps.contain(image, (self.max_size, self.max_size), method=RESAMPLE)
        return image

    def describe(self) -> str:
        """For the manifest: "crop 64", "pad 64", "max 256" or "" (stored as given)."""
        return f"{self.fit} {self.size}" if self.size else f"max {self.max_size}" if self.max_size else ""
