"""A colour version of any grayscale source: per-sample hue, background colour and background texture.

    colourised(digits_source(), size=32, seed=0)      # or the Fashion-MNIST IDX files, mnist_splits(...)["train"]

Each grayscale image is read as an alpha mask (white = the object) and composited at `size` x `size` over a
background of a random colour with one of four textures (flat, stripes at a random angle and frequency, checks,
smooth noise), in an object colour of a random hue set well apart from the background's. Colour, background and
texture carry no information about the label: they are nuisances that raw pixels cannot ignore and that a
self-supervised model trained with colour jitter and crops should learn to. That makes it a small 3-channel
dataset, built from data on this machine, on which the recipes can be checked for robustness (issue: pretraining
that pays, item 3).

Everything drawn for a sample comes from (seed, split, its position in the source): the same seed writes the same
dataset, another seed another style of the same items. Key, label and the `source` field are the grayscale
sample's, so instance retrieval across two seeds (`index eval --relevant field:source`) finds an item in another
style; the style itself is recorded in `meta` (`style`).
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
from PIL import Image

from shards.sources import UNREADABLE, ImageFile, RawSample, SampleSource

TEXTURES = ("flat", "stripes", "checks", "noise")
# Hue (0..1) -> a colour word, for captions: the upper bound of each named band.
_HUE_NAMES = ((0.04, "red"), (0.11, "orange"), (0.19, "yellow"), (0.45, "green"), (0.55, "cyan"), (0.72, "blue"),
              (0.86, "purple"), (0.96, "pink"), (1.01, "red"))


def hue_name(hue: float) -> str:
    return next(name for upper, name in _HUE_NAMES if hue % 1.0 < upper)


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32)


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) map in [0, 1] that mixes the two background colours."""
    if kind == "flat":
        return np.zeros((size, size), np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "stripes":
        angle, cycles, phase = rng.uniform(0, np.pi), rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
        return 0.5 + 0.5 * np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    if kind == "checks":
        cells = int(rng.integers(3, 8))
        return ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(np.float32)
    coarse = rng.random((4, 4)).astype(np.float32)  # smooth noise: a 4x4 grid, bilinear up to the image
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR), np.float32)


def colourise_image(image: Image.Image, size: int, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """`image` (any mode; its luminance is the object mask) as an RGB image of `size` x `size`, and its style."""
    alpha = np.asarray(image.convert("L").resize((size, size), Image.BILINEAR), np.float32)[..., None] / 255.0
    bg_hue = rng.random()
    bg = _rgb(bg_hue, rng.uniform(0.2, 0.9), rng.uniform(0.25, 0.9))
    bg2 = _rgb(bg_hue + rng.uniform(-0.15, 0.15), rng.uniform(0.2, 0.9), rng.uniform(0.25, 0.9))
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    t = _texture(texture, size, rng)[..., None] * rng.uniform(0.3, 0.8)
    background = bg * (1 - t) + bg2 * t
    fg_hue = bg_hue + rng.uniform(0.25, 0.75)  # at least a quarter turn of the colour wheel from the background
    fg = _rgb(fg_hue, rng.uniform(0.5, 1.0), rng.uniform(0.7, 1.0))
    rgb = background * (1 - alpha) + fg * alpha
    pixels = np.rint(rgb * 255).clip(0, 255).astype(np.uint8)
    style = {"hue": round(float(fg_hue % 1.0), 4), "colour": hue_name(fg_hue), "background_hue": round(float(bg_hue), 4),
             "texture": texture}
    return Image.fromarray(pixels, mode="RGB"), style


def colourised(source: SampleSource, size: int = 32, seed: int = 0, split: str = "") -> SampleSource:
    """`source`'s samples in colour (module docstring); the same keys, labels and `source` fields. `split` names
    the split the source is, so that train and val sample i do not share a style."""
    if size < 8:
        raise ValueError(f"colourised size {size}: must be at least 8 pixels")

    def generate(skip: Callable[[str, str], None]) -> Iterator[RawSample]:
        for i, sample in enumerate(source.generate(skip)):
            gray = sample.image
            if isinstance(gray, ImageFile):
                try:
                    gray = gray.open()
                except UNREADABLE as e:
                    skip(gray.what, f"unreadable image ({e})")
                    continue
            image, style = colourise_image(gray, size, np.random.default_rng([seed, zlib.crc32(split.encode()), i]))
            caption = sample.caption
            if source.classes and sample.label is not None:
                name = source.classes[sample.label]
                caption = f"a {style['colour']} {name} on a {style['texture']} background"
            yield replace(sample, image=image, caption=caption, meta={**sample.meta, "style": style})

    return SampleSource(f"colourised({source.description}, size={size}, seed={seed})", source.classes,
                        source.count, generate)


def first(source: SampleSource, limit: int) -> SampleSource:
    """The first `limit` samples of `source` (all of them when it holds fewer)."""
    if limit < 1:
        raise ValueError(f"limit {limit}: must be at least 1")

    def generate(skip: Callable[[str, str], None]) -> Iterator[RawSample]:
        for i, sample in enumerate(source.generate(skip)):
            if i >= limit:
                return
            yield sample

    return SampleSource(f"{source.description}[:{limit}]", source.classes, min(limit, source.count), generate)
