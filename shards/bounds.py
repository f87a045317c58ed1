"""Bounds on an image's size, checked from its header before any pixel is decoded: every reader (the writer's
image files, shard samples, uploads, queries) and every transform that resizes asks `check_image_size`."""

from __future__ import annotations

# Resizing the shorter side to the model's size multiplies a thin image's pixels by its aspect ratio (a 4 KB 1x2M
# PNG became 16x33M, 5.8 GB), so the ratio is what bounds what a transform makes: at most MAX_ASPECT * size^2.
# Real pictures stay far below 64:1: 360-degree panoramas are 2:1, phone and stitched panoramas up to ~10:1.
MAX_ASPECT = 64
# 134 Mpx (16384 x 8192, a 16K panorama; 100-Mpx medium-format photos fit): ~400 MB as RGB. Pillow itself refuses
# past 2x its MAX_IMAGE_PIXELS (179 Mpx) and only warns below that.
MAX_PIXELS = 2**27


class ImageBoundsError(ValueError):
    """An image too large or too thin to decode or resize safely (`check_image_size`)."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit  # "pixels" or "aspect": which bound it broke

    def __reduce__(self):  # crosses process boundaries (data-loader workers) with its `limit`
        return type(self), (str(self), self.limit)


def check_image_size(width: int, height: int, *, max_pixels: int = MAX_PIXELS, max_aspect: int = MAX_ASPECT) -> None:
    """Raise `ImageBoundsError` for an image of width x height over `max_pixels` pixels or with a side more than
    `max_aspect` times the other; call it with `Image.open(...).size`, before `load()` decodes anything."""
    if width * height > max_pixels:
        raise ImageBoundsError(f"image of {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}: "
                               "shrink it before use", "pixels")
    if min(width, height) < 1 or max(width, height) > max_aspect * min(width, height):
        ratio = max(width, height) / max(min(width, height), 1)
        raise ImageBoundsError(f"image of {width}x{height} has an aspect ratio of {ratio:,.0f}:1; the limit is "
                               f"{max_aspect}:1: crop it nearer to square", "aspect")
