"""The manifest of a shard set: `manifest.json` beside the shards.

A shard set is one folder of WebDataset tar shards (`shard-000000.tar`, ...) plus
`manifest.json`. Samples follow the WebDataset / img2dataset convention: files that
share a `__key__` inside the tar, with extensions `.png` or `.jpg` (the image),
`.cls` (integer class index as ASCII text), `.txt` (caption, UTF-8) and `.json`
(per-sample metadata). Shards made by other tools work without a manifest: the
reader then counts samples by scanning the tars once.

Every shard a manifest lists must lie inside the manifest's folder: `load_manifest` refuses an entry that
is absolute, climbs out with `..`, or resolves (after symlinks) outside the folder, so a manifest
cannot make a reader open files elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PureWindowsPath

from shards.atomic import write_text_atomic

MANIFEST_NAME = "manifest.json"
FORMAT = "vitssl-shards/1"
WRITER_VERSION = "0.2.0"


@dataclass
class ShardInfo:
    name: str  # file name relative to the shard-set folder, e.g. "shard-000000.tar"
    count: int  # samples in this shard
    sha256: str  # hex digest of the whole tar file
    bytes: int = 0


@dataclass
class Manifest:
    shards: list[ShardInfo]
    classes: list[str] = field(default_factory=list)  # index -> class name; empty if unlabelled
    source: str = ""  # human-readable origin, e.g. "idx:/data/fashion-mnist (train)"
    split: str = ""  # "train", "val", or "" for a single set
    encoding: str = "png"  # "png" or "jpg"
    image_mode: str = ""  # PIL mode of the stored images: "L" or "RGB"
    image_size: list[int] = field(default_factory=list)  # [height, width] when all images share one size
    has_captions: bool = False
    # Images the writer changed to store them as 8-bit L/RGB, per kind (`shards.sources.normalize_image`):
    # {"high_bit_depth_scaled": n, "alpha_composited": n}; kinds that did not occur are left out.
    conversions: dict[str, int] = field(default_factory=dict)
    resize: str = ""  # how the writer sized the images (`shards.resize.Resize.describe`): "crop 64", "max 256", ""
    skipped: int = 0  # source entries the writer could not read (logged, not stored)
    # Measured over every stored image (`shards.stats.DatasetStats.to_dict`): per-channel mean/std, sizes, modes,
    # class counts, captions; {} in sets written before it (`python -m shards stats --save` adds it).
    stats: dict = field(default_factory=dict)
    writer_version: str = WRITER_VERSION
    format: str = FORMAT

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    def conversions_text(self) -> str:
        """`conversions` for people: "3 alpha composited, 5 high bit depth scaled" ("" when none)."""
        return ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in self.conversions.items())

    def to_json(self) -> str:
        d = asdict(self)
        d["total"] = self.total
        return json.dumps(d, indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        d.pop("total", None)
        shards = [ShardInfo(**s) for s in d.pop("shards")]
        known = set(cls.__dataclass_fields__)
        return cls(shards=shards, **{k: v for k, v in d.items() if k in known})

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        write_text_atomic(path, self.to_json())
        return path


class ManifestEntryError(ValueError):
    """A manifest entry that names a file outside the manifest's folder."""


def shard_path(folder: str | Path, name: object, manifest: str | Path | None = None) -> Path:
    """`folder / name` for a manifest entry `name`, refused (`ManifestEntryError`) unless it is a relative
    path that stays inside `folder`, symlinks resolved."""
    folder = Path(folder)
    where = manifest or folder / MANIFEST_NAME
    if not isinstance(name, str) or not name:
        raise ManifestEntryError(f"{where}: shard entry {name!r} is not a file name")
    why = ""
    if os.path.isabs(name) or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        why = "is an absolute path"
    elif os.path.normpath(name).split(os.sep)[0] == "..":
        why = "climbs out of the folder with '..'"
    else:
        path, root = (folder / name).resolve(), folder.resolve()  # symlinks followed, as a reader would
        if path == root:
            why = "is the folder itself"
        elif not path.is_relative_to(root):
            why = f"resolves to {path}, outside {root}"
    if why:
        raise ManifestEntryError(f"{where}: shard entry {name!r} {why}; manifest entries must name files inside "
                                 f"the shard-set folder {folder}")
    return folder / name


def load_manifest(folder: str | Path) -> Manifest:
    """The manifest of the shard set in `folder`; `ValueError` if it does not parse, `ManifestEntryError`
    (a ValueError) if it lists a shard outside `folder` (see `shard_path`)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {folder}: not a shard set written by `python -m shards write`")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid shard manifest: {e}") from e
    for shard in manifest.shards:
        shard_path(folder, shard.name, path)
    return manifest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
