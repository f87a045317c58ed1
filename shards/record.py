"""A sample as tar files: the one list of image extensions every reader accepts, how a sample's image is found
and decoded, and how the writers encode one (`encode_sample`).

The stream, `verify`, `info`, the online evaluator and the retrieval layer all take the image of a sample from
here, so a shard set one of them accepts (say `.webp` from img2dataset) is accepted by all of them. Here too is
the one bound on an image's size (`check_image_size`), judged from its header before any pixel is decoded, that
the stream, the service's uploads, `query` and the eval transform all apply. This module imports no torch and no
webdataset.
"""

from __future__ import annotations

import io
import json
import re

from PIL import Image

from shards.bounds import check_image_size
from shards.sources import SOURCE_FIELD, RawSample, normalize_mode

ENCODINGS = ("png", "jpg")
# WebDataset keys cannot hold dots; plain short ASCII keeps every tar member a single 512-byte header
_KEY = re.compile(r"[!-~]{1,90}")

Record = dict[str, "str | bytes"]  # {"__key__": key, "png": ..., "cls": ..., "txt": ..., "json": ...}

# Preference order when a sample carries more than one image file: ours first (png, jpg), then
# img2dataset's and other tools' (webp, jpeg), then the rarer formats Pillow decodes.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff")

def image_extension(files: dict[str, bytes]) -> str | None:
    """The extension of the sample's image file (the first of `IMAGE_EXTENSIONS` it has), or None."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)


def no_image_problem(files: dict[str, bytes]) -> str:
    """The one sentence every reader gives for a sample without an image file."""
    return f"no image (.{', .'.join(IMAGE_EXTENSIONS)}); has {sorted(files)}"


def decode_image(data: bytes) -> Image.Image:
    """The stored image as 8-bit "L" or "RGB" (`shards.sources.normalize_image`); raises `ImageBoundsError` from
    the header for an image out of bounds (`check_image_size`), else what Pillow raises."""
    image = Image.open(io.BytesIO(data))
    check_image_size(*image.size)
    image.load()
    return normalize_mode(image)


def encode_sample(sample: RawSample, classes: list[str], encoding: str = "png", jpg_quality: int = 95) -> Record:
    """One sample as WebDataset record bytes: the image (as 8-bit "L" or "RGB", `normalize_image`), `.cls`,
    `.txt` and `.json` (`sample.meta`, with its source name under "source" when the source gave one)."""
    key = sample.key
    if not _KEY.fullmatch(key) or "." in key or "/" in key:
        raise ValueError(f"bad sample key {key!r}: use 1-90 printable ASCII characters without dots or slashes")
    image = normalize_mode(sample.image)
    buf = io.BytesIO()
    if encoding == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=jpg_quality)
    record: Record = {"__key__": key, encoding: buf.getvalue()}
    if sample.label is not None:
        if isinstance(sample.label, bool) or not 0 <= int(sample.label) < len(classes):
            raise ValueError(f"sample {key}: label {sample.label!r} is out of range for {len(classes)} classes")
        record["cls"] = str(int(sample.label)).encode("ascii")
    if sample.caption is not None:
        record["txt"] = sample.caption.encode("utf-8")
    source = sample.meta.get(SOURCE_FIELD) if isinstance(sample.meta, dict) else None
    if source is not None and (not isinstance(source, str) or not source):
        raise ValueError(f"sample {key}: meta[{SOURCE_FIELD!r}] (its source name) must be a non-empty string, "
                         f"got {source!r}")
    try:
        record["json"] = json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    except TypeError as e:
        raise ValueError(f"sample {key}: metadata is not JSON-serialisable ({e})") from e
    return record


def read_image(files: dict[str, bytes]) -> Image.Image | None:
    """The sample's image as 8-bit L/RGB, or None when it has none, it does not decode or it is out of bounds
    (`check_image_size`); callers count it."""
    ext = image_extension(files)
    if ext is None or "__bad__" in files:
        return None
    try:
        return decode_image(files[ext])
    except Exception:  # Pillow raises many types for damaged data; each means one unreadable sample
        return None


def parse_label(files: dict[str, bytes]) -> int | None:
    """The sample's `.cls` as an int, None when it has none; ValueError (saying what is there) when it is not one."""
    if "cls" not in files:
        return None
    try:
        return int(files["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f".cls is not an integer: {files['cls'][:20]!r}") from None


def read_label(files: dict[str, bytes]) -> int | None:
    """The sample's `.cls` as an int, or None when it has none or it is not an integer."""
    try:
        return parse_label(files)
    except ValueError:
        return None
