"""Describe a shard set: counts per shard and class, image format, captions, and a sample-grid PNG."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from shards.atomic import atomic_path
from shards.manifest import MANIFEST_NAME, load_manifest
from shards.record import image_extension, parse_label
from shards.sources import normalize_mode
from shards.tar import iter_tar_samples, open_shard

UNLABELLED = "(unlabelled)"


@dataclass
class ShardSetInfo:
    folder: Path
    total: int
    per_shard: dict[str, int]
    per_class: dict[str, int]  # class name -> samples; UNLABELLED for samples without a label
    classes: list[str]
    image_mode: str
    image_size: list[int]
    has_captions: bool
    encoding: str = ""
    source: str = ""
    split: str = ""
    grid_png: Path | None = None
    has_manifest: bool = True
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        size = "x".join(map(str, self.image_size)) if self.image_size else "mixed"
        lines = [
            f"{self.folder}" + ("" if self.has_manifest else f" (no {MANIFEST_NAME}: counted by scanning)"),
            f"  source: {self.source or '?'}" + (f"  split: {self.split}" if self.split else ""),
            f"  samples: {self.total} in {len(self.per_shard)} shards "
            f"(min {min(self.per_shard.values(), default=0)}, max {max(self.per_shard.values(), default=0)})",
            f"  images: mode {self.image_mode or 'mixed'}, size (h x w) {size}, encoding {self.encoding or '?'}",
            f"  captions: {'yes' if self.has_captions else 'no'}",
            f"  classes: {len(self.classes)}",
        ]
        width = max((len(c) for c in self.per_class), default=0)
        lines += [f"    {name:<{width}}  {n}" for name, n in self.per_class.items()]
        lines += [f"  shard {name}: {n}" for name, n in self.per_shard.items()]
        lines += [f"  note: {n}" for n in self.notes]
        if self.grid_png:
            lines.append(f"  sample grid: {self.grid_png}")
        return "\n".join(lines)


def _decode(files: dict[str, bytes]) -> Image.Image | None:
    ext = image_extension(files)
    if ext is None:
        return None
    with Image.open(io.BytesIO(files[ext])) as im:
        im.load()
        return im.copy()


def _label(files: dict[str, bytes], where: str) -> int | None:
    try:
        return parse_label(files)
    except ValueError as e:
        raise ValueError(f"{where}: {e} (run verify)") from None


def info(folder: str | Path, grid_png: str | Path | None = None, per_class: int = 8, max_rows: int = 20) -> ShardSetInfo:
    """Count the set by scanning its shards; with `grid_png`, draw `per_class` images for each class."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"shard folder {folder} does not exist")
    has_manifest = (folder / MANIFEST_NAME).is_file()
    if has_manifest:
        manifest = load_manifest(folder)  # refuses entries outside `folder`
        names = [s.name for s in manifest.shards]
    else:
        manifest = None
        names = sorted(p.name for p in folder.glob("*.tar"))
        if not names:
            raise FileNotFoundError(f"{folder} holds neither {MANIFEST_NAME} nor any .tar shards")
    per_shard: dict[str, int] = {}
    labels: Counter[int | None] = Counter()
    grid: dict[int | None, list[Image.Image]] = {}
    captions = 0
    modes, sizes, extensions = set(), set(), set()  # without a manifest: read from each image's header
    for name in names:
        per_shard[name] = 0
        with open_shard(str(folder / name)) as stream:
            for key, files in iter_tar_samples(stream):
                per_shard[name] += 1
                label = _label(files, f"{name} key {key}")
                labels[label] += 1
                captions += "txt" in files
                if manifest is None and (ext := image_extension(files)):
                    extensions.add(ext)
                    try:
                        with Image.open(io.BytesIO(files[ext])) as header:  # no pixels decoded
                            modes.add(header.mode)
                            sizes.add((header.height, header.width))
                    except Exception:  # unreadable: verify names it; info only describes
                        pass
                if grid_png is not None and len(grid.setdefault(label, [])) < per_class:
                    image = _decode(files)
                    if image is not None:
                        grid[label].append(normalize_mode(image))  # as the reader sees it (8-bit L/RGB)
    total = sum(per_shard.values())
    if manifest is not None:
        classes, mode, size = manifest.classes, manifest.image_mode, manifest.image_size
    else:
        classes = [str(i) for i in range(max((k for k in labels if k is not None), default=-1) + 1)]
        mode = next(iter(modes)) if len(modes) == 1 else ""
        size = list(next(iter(sizes))) if len(sizes) == 1 else []

    def name_of(label: int | None) -> str:
        return UNLABELLED if label is None else classes[label] if label < len(classes) else f"#{label}"

    per_class = {name_of(i): labels[i] for i in range(len(classes))}
    per_class.update({name_of(k): n for k, n in labels.items() if k is None or k >= len(classes)})
    result = ShardSetInfo(
        folder=folder,
        total=total,
        per_shard=per_shard,
        per_class=per_class,
        classes=list(classes),
        image_mode=mode,
        image_size=list(size),
        has_captions=manifest.has_captions if manifest else total > 0 and captions == total,
        encoding=manifest.encoding if manifest else "+".join(sorted(extensions)),
        source=manifest.source if manifest else "",
        split=manifest.split if manifest else "",
        has_manifest=has_manifest,
    )
    if manifest is not None and manifest.conversions:
        result.notes.append(f"the writer converted images to 8-bit L/RGB: {manifest.conversions_text()}")
    if manifest is not None and total != manifest.total:
        result.notes.append(f"scanned {total} samples, manifest says {manifest.total} (run verify)")
    if grid_png is not None:
        rows = sorted(grid.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        if len(rows) > max_rows:
            result.notes.append(f"grid shows the first {max_rows} of {len(rows)} classes")
        result.grid_png = write_grid_png([(name_of(k), ims) for k, ims in rows[:max_rows]], grid_png)
    return result


def write_grid_png(rows: list[tuple[str, list[Image.Image]]], path: str | Path) -> Path:
    """One row of images per class, the class name at the left; written atomically."""
    cols = max((len(images) for _, images in rows), default=0)
    if not rows or cols == 0:
        raise ValueError("no images to draw")
    fig = Figure(figsize=(1.6 + cols * 0.9, 0.4 + len(rows) * 0.9), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(len(rows), cols, squeeze=False))
    for r, (name, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                image = images[c]
                ax.imshow(np.asarray(image), cmap="gray" if image.mode == "L" else None, vmin=0, vmax=255)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=1.4 / (1.6 + cols * 0.9), right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.1)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
