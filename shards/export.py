"""A shard set back out as an image folder: OUT/<class name>/<key>.<ext>, the layout `write folder` reads.

For looking at a set with ordinary tools, handing it to one that reads folders, or (as the README's "your own
data" example does) turning a built-in data set into a stand-in for a folder of your own photos. Images are
written as the reader decodes them (8-bit L/RGB); unlabelled samples go to OUT/unlabelled/. The folder is built
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from shards.atomic import atomic_path
from shards.ownership import claim_output, mark_output
from shards.record import read_image, read_label
from shards.tar import iter_source_samples, manifest_class_names

EXPORT_FORMATS = {"png": "PNG", "jpg": "JPEG"}
UNLABELLED_FOLDER = "unlabelled"
_UNSAFE = re.compile(r"[^\w.-]+")  # class names become folder names: no slashes or odd characters


def _folder_name(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._") or "class"


def _file_stem(key: str, taken: set[str]) -> str:
    """`key` as a file name; distinct keys that read the same once slashes are replaced (d/0001, d_0001) get a
    short digest of the key so that neither overwrites the other."""
    stem = key.replace("/", "_")
    if stem in taken:
        stem = f"{stem}-{hashlib.blake2b(key.encode(), digest_size=4).hexdigest()}"
    return stem


def export_folder(source: str, out: str | Path, image_format: str = "png", jpg_quality: int = 95, *,
                  overwrite: bool = False) -> dict[str, int]:
    """Write every readable sample of `source` as OUT/<class>/<key>.<format>; returns {folder name: images}.
    An existing `out` is replaced only when it is an earlier export and `overwrite` is given. Samples without a
    readable image are counted under "(unreadable)", a key seen before (a shard named twice) under
    "(repeated key)"; neither is written, and no file is ever written twice."""
    if image_format not in EXPORT_FORMATS:
        raise ValueError(f"image format must be one of {sorted(EXPORT_FORMATS)}, got {image_format!r}")
    out = Path(out)
    claim_output(out, "images", overwrite=overwrite)
    classes = manifest_class_names(source)
    names = [_folder_name(c) for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"class names {classes} do not give distinct folder names")
    counts: dict[str, int] = {}
    seen_keys: set[str] = set()
    stems: dict[str, set[str]] = {}  # folder -> file stems written there
    with atomic_path(out) as staging:
        staging.mkdir()
        mark_output(staging, "images")
        for _url, key, files in iter_source_samples(source):
            if key in seen_keys:
                counts["(repeated key)"] = counts.get("(repeated key)", 0) + 1
                continue
            seen_keys.add(key)
            image = read_image(files)
            if image is None:
                counts["(unreadable)"] = counts.get("(unreadable)", 0) + 1
                continue
            label = read_label(files)
            name = UNLABELLED_FOLDER if label is None else names[label] if label < len(names) else str(label)
            (staging / name).mkdir(exist_ok=True)
            taken = stems.setdefault(name, set())
            stem = _file_stem(key, taken)
            taken.add(stem)
            path = staging / name / f"{stem}.{image_format}"
            options = {"quality": jpg_quality} if image_format == "jpg" else {}
            image.save(path, format=EXPORT_FORMATS[image_format], **options)
            counts[name] = counts.get(name, 0) + 1
    return counts
