"""What a shard set holds, measured: per-channel mean and std, image sizes and modes, class counts, captions.

The writer measures every image it stores (`summarize` in its workers, `DatasetStats.add` in write order) and
keeps the result in the manifest's `stats`; `python -m shards stats` measures a set written by anyone (or
re-measures ours) from the tars. Recipes read it to resolve `auto` (`pretrain.auto`).

Sums are exact integers over the 8-bit pixels, so the numbers do not depend on the order or on how many
processes measured them. Statistics are given for both ways a model can read the images: "RGB" (a
grayscale image counts as three equal channels) and "L" (an RGB image as Pillow's luminance, which is what
the readers' `convert("L")` makes of it for a 1-channel model).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shards.manifest import MANIFEST_NAME, load_manifest
from shards.record import read_image, read_label
from shards.tar import iter_source_samples, list_shards

STATS_NAME = "stats.json"  # beside another tool's tars, where there is no manifest of ours to hold them
_SIZES_KEPT = 10  # the most common sizes listed; the rest are counted under "other"


@dataclass(frozen=True)
class ImageSummary:
    """One image's contribution: exact pixel sums per channel (RGB view, and luminance)."""

    mode: str
    height: int
    width: int
    rgb_sum: tuple[int, int, int]
    rgb_sq: tuple[int, int, int]
    l_sum: int
    l_sq: int


def summarize(image: Image.Image) -> ImageSummary:
    """Sums of an 8-bit "L" or "RGB" image (`shards.sources.normalize_image` output)."""
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"summarize takes 8-bit L or RGB images, got mode {image.mode}")
    gray = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.int64)
    l_sum, l_sq = int(gray.sum()), int((gray * gray).sum())
    if image.mode == "L":
        rgb_sum, rgb_sq = (l_sum,) * 3, (l_sq,) * 3
    else:
        px = np.asarray(image, dtype=np.int64).reshape(-1, 3)
        rgb_sum = tuple(int(v) for v in px.sum(axis=0))
        rgb_sq = tuple(int(v) for v in (px * px).sum(axis=0))
    return ImageSummary(image.mode, image.height, image.width, rgb_sum, rgb_sq, l_sum, l_sq)  # type: ignore[arg-type]


def _mean_std(sums: list[int], squares: list[int], pixels: int) -> dict[str, list[float]]:
    n = max(pixels, 1) * 255.0
    means = [s / n for s in sums]
    stds = [math.sqrt(max(q / (n * 255.0) - m * m, 0.0)) for q, m in zip(squares, means)]
    return {"mean": [round(m, 4) for m in means], "std": [round(s, 4) for s in stds]}


@dataclass
class DatasetStats:
    """Adds up `ImageSummary`s, labels and captions; `to_dict` is what the manifest stores."""

    images: int = 0
    pixels: int = 0
    rgb_sum: list[int] = field(default_factory=lambda: [0, 0, 0])
    rgb_sq: list[int] = field(default_factory=lambda: [0, 0, 0])
    l_sum: int = 0
    l_sq: int = 0
    modes: Counter[str] = field(default_factory=Counter)
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    short_sides: list[int] = field(default_factory=list)
    labels: Counter[int] = field(default_factory=Counter)
    unlabelled: int = 0
    captions: int = 0

    def add(self, summary: ImageSummary, label: int | None = None, caption: bool = False) -> None:
        self.images += 1
        self.pixels += summary.height * summary.width
        for c in range(3):
            self.rgb_sum[c] += summary.rgb_sum[c]
            self.rgb_sq[c] += summary.rgb_sq[c]
        self.l_sum += summary.l_sum
        self.l_sq += summary.l_sq
        self.modes[summary.mode] += 1
        self.sizes[(summary.height, summary.width)] += 1
        self.short_sides.append(min(summary.height, summary.width))
        if label is None:
            self.unlabelled += 1
        else:
            self.labels[label] += 1
        self.captions += caption

    def to_dict(self, classes: list[str] | None = None) -> dict:
        """Plain JSON: {"images", "channels": {"RGB": {mean, std}, "L": {mean, std}}, "modes", "sizes" ("HxW": n,
        most common first), "short_side": {min, median, max}, "classes" (name or index: n), "unlabelled",
        "captions"}."""
        if not self.images:
            return {"images": 0}
        common = self.sizes.most_common(_SIZES_KEPT)
        sizes = {f"{h}x{w}": n for (h, w), n in common}
        if rest := self.images - sum(n for _, n in common):
            sizes["other"] = rest
        names = list(classes or [])

        def name(i: int) -> str:
            return names[i] if 0 <= i < len(names) else str(i)

        return {
            "images": self.images,
            "channels": {
                "RGB": _mean_std(self.rgb_sum, self.rgb_sq, self.pixels),
                "L": _mean_std([self.l_sum], [self.l_sq], self.pixels),
            },
            "modes": dict(sorted(self.modes.items())),
            "sizes": sizes,
            "short_side": {"min": min(self.short_sides), "median": int(statistics.median_low(self.short_sides)),
                           "max": max(self.short_sides)},
            "classes": {name(i): self.labels[i] for i in sorted(self.labels)},
            "unlabelled": self.unlabelled,
            "captions": self.captions,
        }


def channel_stats(stats: dict, in_chans: int) -> tuple[list[float], list[float]]:
    """(mean, std) for a model reading `in_chans` channels, from a `to_dict` result."""
    view = stats["channels"]["L" if in_chans == 1 else "RGB"]
    return list(view["mean"]), list(view["std"])


def stored_channels(stats: dict) -> int:
    """3 when any stored image is RGB, else 1."""
    return 3 if stats.get("modes", {}).get("RGB") else 1


def stored_square_size(stats: dict) -> int:
    """The side the images are stored at when they are all one square size; else the median shorter side."""
    sizes = stats.get("sizes", {})
    if len(sizes) == 1:
        h, w = (int(v) for v in next(iter(sizes)).split("x"))
        if h == w:
            return h
    return int(stats["short_side"]["median"])


def format_stats(stats: dict) -> str:
    """The numbers, for people."""
    if not stats.get("images"):
        return "  no images"
    ch = stats["channels"]
    lines = [
        f"  images: {stats['images']}  modes: {', '.join(f'{m} {n}' for m, n in stats['modes'].items())}",
        f"  RGB mean {ch['RGB']['mean']} std {ch['RGB']['std']}",
        f"  L   mean {ch['L']['mean']} std {ch['L']['std']}",
        "  sizes (h x w): " + ", ".join(f"{s} {n}" for s, n in stats["sizes"].items())
        + "  shorter side min/median/max: {min}/{median}/{max}".format(**stats["short_side"]),
        f"  captions: {stats['captions']} of {stats['images']}",
        f"  classes: {len(stats['classes'])}" + (f", unlabelled {stats['unlabelled']}" if stats["unlabelled"] else ""),
    ]
    lines += [f"    {name}: {n}" for name, n in stats["classes"].items()]
    return "\n".join(lines)


def read_saved_stats(folder: Path) -> dict | None:
    """The stats `python -m shards stats --save` left beside another tool's tars, if any."""
    path = folder / STATS_NAME
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} does not parse ({e}); delete it or rewrite it with `python -m shards stats --save`") from e
    return stats if isinstance(stats, dict) and stats.get("images") else None


AUTO_SCAN_LIMIT = 2000  # samples measured (spread over the shards) when a set carries no stats


def measure_shards(source: str, limit: int = 0) -> tuple[DatasetStats, int]:
    """Measure the samples of `source` (anything `shards.tar.list_shards` takes), the first
    ceil(limit / shards) of each shard when `limit` > 0; returns the stats and how many samples had no readable
    image (skipped, counted)."""
    per_shard = math.ceil(limit / len(list_shards(source))) if limit else 0
    stats, unreadable = DatasetStats(), 0
    for _url, _key, files in iter_source_samples(source, per_shard=per_shard):
        image = read_image(files)
        if image is None:
            unreadable += 1
            continue
        stats.add(summarize(image), read_label(files), bool(files.get("txt", b"").strip()))
    return stats, unreadable


def dataset_stats(source: str) -> tuple[dict, str]:
    """The statistics of a training source and where they came from: the manifest's (written with the shards),
    a saved `stats.json` beside another tool's tars, or else a scan of up to `AUTO_SCAN_LIMIT` samples."""
    folder = Path(source)
    if folder.is_dir() and (folder / MANIFEST_NAME).is_file():
        manifest = load_manifest(folder)
        if manifest.stats.get("images"):
            return manifest.stats, f"{folder / MANIFEST_NAME}"
    if folder.is_dir() and (saved := read_saved_stats(folder)) is not None:
        return saved, f"{folder / STATS_NAME}"
    stats, _ = measure_shards(source, AUTO_SCAN_LIMIT)
    if not stats.images:
        raise ValueError(f"{source}: no readable image in the first samples of its shards; cannot measure it")
    return stats.to_dict(), f"a scan of {stats.images} samples of {source}"
