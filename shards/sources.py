"""Where raw samples come from: image folders, IDX (MNIST-style) files, caption tables, built-in digits.

Every source yields `RawSample`s in a fixed order with keys `f"{index:08d}"` (WebDataset keys
must not contain dots), or for image files with `key="stem"` the file name without its extension (refused
when two files share one), and records the original index / path in `meta`, which the writer stores
as the sample's `.json`. Image files are yielded unopened (`ImageFile`): the writer opens them, in its worker
processes when it has them. Entries that cannot be read are skipped, logged and counted: in an image folder also
dangling symlinks, symlink loops, FIFOs and other special files (never opened: a FIFO would block) and a second
link to a folder already read; symlinked folders are followed (`image_entries`).

Every sample's `.json` also carries its source name under `"source"` (`SOURCE_FIELD`): the image file's path
relative to the folder root (POSIX), or, for tables and arrays (caption table, IDX, digits), the row id: a
caption table's `id` column when it has one, else the row number 0..N-1. The retrieval index keeps it, so
"the same item in another style or view" can be found and scored (`source_stem`: the file name without its
image extension). Shards written before it simply have none (`sample_source`).
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import math
import os
import re
import stat
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from shards.bounds import check_image_size
from shards.folder_entries import folder_entries

log = logging.getLogger(__name__)
_SKIP_LOCK = threading.Lock()

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
NAMED_CLASS_LISTS = {"fashion-mnist": FASHION_MNIST_CLASSES, "mnist": DIGIT_NAMES}

# IDX type byte -> numpy dtype (big-endian, as the format specifies)
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what opening a bad file raises
SOURCE_FIELD = "source"
_LEGACY_DIGITS_SOURCE = "sklearn.datasets.load_digits"  # what digits shards held under "source" before source names


@dataclass(frozen=True)
class ImageFile:
    """An image file not opened yet: the writer opens it where it encodes (`open_image`)."""

    path: Path
    what: str  # how a skip names it: the path, or "table line N"
    problem: str = ""  # why the entry cannot be read, found when listing (a FIFO, a dangling symlink): never opened

    def open(self) -> Image.Image:
        """The decoded image; raises `UNREADABLE` errors for a file Pillow cannot read (or one with a `problem`,
        which the writer then skips and counts like any unreadable file)."""
        if self.problem:
            raise OSError(self.problem)
        return _open_image(self.path)


@dataclass
class RawSample:
    key: str
    image: Image.Image | ImageFile
    label: int | None = None
    caption: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class SampleSource:
    """A re-iterable stream of samples plus what the manifest records about it.

    `count` is the number of entries listed; fewer samples come out when some are skipped,
    and `skipped` says how many were after an iteration.
    """

    description: str
    classes: list[str]
    count: int
    generate: Callable[[Callable[[str, str], None]], Iterator[RawSample]] = field(repr=False)
    skipped: int = 0

    def __iter__(self) -> Iterator[RawSample]:
        self.skipped = 0
        return self.generate(self.skip)

    def skip(self, what: str, why: str) -> None:
        """Count and log one entry that is not written (the writer calls it for files it cannot open, from its
        own thread while the source runs in the pool's feeding thread: hence the lock)."""
        with _SKIP_LOCK:
            self.skipped += 1
        log.warning("skipped %s: %s", what, why)


@lru_cache(maxsize=1)
def image_suffixes() -> frozenset[str]:
    """File suffixes (lower case, with the dot) of the image formats Pillow reads: what an image folder may hold."""
    return frozenset(Image.registered_extensions())


def image_files(root: str | Path) -> list[Path]:
    """Image files under `root`, recursively (symlinked folders followed), sorted; hidden files (".name") and the
    entries `image_entries` finds unreadable are left out."""
    return [path for path, problem in image_entries(root) if not problem]


def image_entries(root: str | Path) -> list[tuple[Path, str]]:
    """(path, problem) for the image files and unreadable entries under `root` (`shards.folder_entries`)."""
    return folder_entries(root, image_suffixes())


def sample_source(meta: object) -> str | None:
    """The source name a sample's `.json` (parsed) carries under `SOURCE_FIELD`; None when it has none (shards
    written before source names, or by other tools without one). An integer row id comes back as a string."""
    if not isinstance(meta, dict):
        return None
    value = meta.get(SOURCE_FIELD)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    if value == _LEGACY_DIGITS_SOURCE and "dataset" not in meta:
        return None  # old digits shards named the data set there, not the sample
    return str(value)


def source_stem(source: str | None) -> str | None:
    """The last component of a source name without its image-file extension: "photos/shoe_17.jpg" -> "shoe_17";
    a row id ("17", "sku-9.v2") comes back as it is."""
    if source is None:
        return None
    name = source.rsplit("/", 1)[-1]
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and stem and f".{suffix.lower()}" in image_suffixes() else name


# What `normalize_image` did to an image, as the writer counts it in `Manifest.conversions`.
HIGH_BIT_DEPTH_SCALED = "high_bit_depth_scaled"
ALPHA_COMPOSITED = "alpha_composited"
_HIGH_BIT_DEPTH_MODES = {"I", "F"}  # and every "I;16..." mode
_GRAY_ALPHA_MODES = {"LA", "La"}
_INT32_MAX = 2**31 - 1


def _to_8bit(image: Image.Image) -> tuple[Image.Image, bool]:
    """A high-bit-depth grayscale image as "L", scaled (not clipped) by the rules of `normalize_image`, with
    the pixels equal to its transparency key (a 16-bit PNG's tRNS) composited onto white; True when any was."""
    pixels = np.asarray(image)
    if image.mode == "F":
        x = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        x = x * 255 if x.size and x.max() <= 1.0 else x  # [0, 1] floats; otherwise already on the 0..255 scale
        out = np.rint(x.clip(0, 255))
    else:
        x = pixels.astype(np.int64).clip(0, None)
        top = 65535 if image.mode.startswith("I;16") or not x.size or x.max() <= 65535 else _INT32_MAX
        out = (x * 255 + top // 2) // top  # round(v * 255 / top): v / 257 rounded for 16-bit
    key = image.info.get("transparency")
    # the key is compared with the stored values, before scaling: Pillow's own convert clips 16-bit to 8 first
    transparent = pixels == key if isinstance(key, int) and not isinstance(key, bool) else np.zeros(out.shape, bool)
    out = np.where(transparent, 255, out)  # fully transparent over white is white
    return Image.fromarray(out.astype(np.uint8), "L"), bool(transparent.any())


def _key_as_8bit(image: Image.Image) -> Image.Image:
    """`image` with a 16-bit PNG's RGB transparency key (a value over 255) brought to the 8 bits Pillow keeps of
    its pixels (the high byte), so the key matches them: pixels whose high bytes equal the key's are transparent
    (the low bytes are gone once Pillow has opened the file)."""
    key = image.info.get("transparency")
    if image.mode != "RGB" or not isinstance(key, tuple) or max(key, default=0) <= 255:
        return image
    image = image.copy()
    image.info["transparency"] = tuple(int(v) >> 8 for v in key)
    return image


def _composite_on_white(image: Image.Image, gray: bool) -> tuple[Image.Image, bool]:
    """`image` (with an alpha channel or transparency key) over a white background; True when any pixel
    was not fully opaque (a fully opaque alpha is dropped and not counted)."""
    rgba = np.asarray(image.convert("LA" if gray else "RGBA"))
    color, alpha = rgba[..., :-1], rgba[..., -1:]
    out_mode = "L" if gray else "RGB"
    if alpha.size == 0 or alpha.min() == 255:
        return Image.fromarray(np.ascontiguousarray(color[..., 0] if gray else color), out_mode), False
    a = alpha.astype(np.float32) / 255
    out = np.rint(color * a + 255 * (1 - a)).astype(np.uint8)
    return Image.fromarray(out[..., 0] if gray else out, out_mode), True


def normalize_image(image: Image.Image) -> tuple[Image.Image, str]:
    """`image` as 8-bit "L" or "RGB", and what was done to it: "" (nothing worth counting),
    `HIGH_BIT_DEPTH_SCALED` or `ALPHA_COMPOSITED`.

    - "L" and "RGB" (without a transparency key) come back as they are; "1" becomes "L" (0/255); other
      colour modes (P, CMYK, YCbCr, ...) become "RGB".
    - High bit depth is scaled to 0..255, never clipped: "I;16"/"I;16B"/"I;16L"/"I;16N" as round(v / 257);
      "I" (32-bit int) likewise as 16-bit when its max is <= 65535, else over the 0..2**31-1 range (negative
      values are 0); "F" (float) is taken as [0, 1] when its max is <= 1, else as 0..255 (clipped; NaN is 0).
      16-bit RGB files are already reduced to 8 bits by Pillow when it opens them.
    - Transparency (RGBA, LA, PA, P or L/RGB with a transparency key) is composited onto a white background,
      which is how the image looks on a page; a fully opaque alpha channel is simply dropped (not counted).
    - A 16-bit grayscale PNG's transparency key (tRNS) is matched against the 16-bit values, so those pixels
      become white, and the image is counted as `ALPHA_COMPOSITED` when any pixel matched (it is also scaled).
      A 16-bit RGB PNG's key is matched at the 8 bits Pillow keeps of its pixels.
    """
    mode = image.mode
    if mode in ("L", "RGB") and "transparency" not in image.info:
        return image, ""
    if mode in _HIGH_BIT_DEPTH_MODES or mode.startswith("I;16"):
        out, composited = _to_8bit(image)
        return out, ALPHA_COMPOSITED if composited else HIGH_BIT_DEPTH_SCALED
    image = _key_as_8bit(image)
    if image.has_transparency_data:
        gray = mode in _GRAY_ALPHA_MODES or mode in ("1", "L")
        out, composited = _composite_on_white(image, gray)
        return out, ALPHA_COMPOSITED if composited else ""
    return image.convert("L" if mode == "1" else "RGB"), ""


def normalize_mode(image: Image.Image) -> Image.Image:
    """`image` as 8-bit "L" or "RGB" (see `normalize_image`)."""
    return normalize_image(image)[0]


def resolve_classes(spec: str) -> list[str]:
    """`fashion-mnist`, `mnist`, or a comma-separated list of class names."""
    if spec in NAMED_CLASS_LISTS:
        return list(NAMED_CLASS_LISTS[spec])
    names = [n.strip() for n in spec.split(",")]
    if not spec.strip() or any(not n for n in names):
        raise ValueError(f"bad class list {spec!r}: use fashion-mnist, mnist or comma-separated names")
    if len(set(names)) != len(names):
        raise ValueError(f"class list {spec!r} names a class twice")
    return names


def _open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, refused (OSError) unless it is a regular file: opened non-blocking and checked
    on the open descriptor, so a FIFO put in a file's place after it was listed cannot block the writer."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path}: not a regular file (a {'FIFO' if stat.S_ISFIFO(mode) else 'special file'})")
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _open_image(path: Path) -> Image.Image:
    with _open_regular(path) as f, Image.open(f) as im:
        check_image_size(*im.size)  # before decoding: a 33 KB 1x16M file would be gigabytes once resized
        im.load()
        # closing the file frees the pixels of `im`, so hand back a copy; the writer converts its mode
        # (`normalize_image`) and counts what that changed
        return im.copy()


# --- built-in digits --------------------------------------------------------------------------


def digits_source() -> SampleSource:
    """scikit-learn's bundled 1,797 8x8 handwritten digits, scaled from 0..16 to 0..255, mode "L"."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(int)

    def generate(skip: Callable[[str, str], None]) -> Iterator[RawSample]:
        for i, (pixels, label) in enumerate(zip(images, labels)):
            yield RawSample(
                key=f"{i:08d}",
                image=Image.fromarray(pixels),
                label=int(label),
                caption=f"a handwritten digit {DIGIT_NAMES[label]}",
                meta={"index": i, "dataset": _LEGACY_DIGITS_SOURCE, SOURCE_FIELD: str(i)},
            )

    return SampleSource("sklearn digits (8x8)", list(DIGIT_NAMES), len(images), generate)


# --- image folder -------------------------------------------------------------------------------


KEY_MODES = ("index", "stem")
_VALID_KEY = re.compile(r"[!-~]{1,90}")  # printable ASCII without spaces; one 512-byte tar header per member


def stem_keys(paths: list[Path | str], where: str) -> list[str]:
    """Keys from file names without their extension, refused (ValueError) when one cannot be a WebDataset key
    (dots, slashes, spaces, non-ASCII, over 90 characters) or two files share one."""
    keys = [Path(p).stem for p in paths]
    bad = [str(p) for p, k in zip(paths, keys) if not _VALID_KEY.fullmatch(k) or "." in k or "/" in k]
    if bad:
        raise ValueError(f"{where}: {len(bad)} file name(s) cannot be keys, e.g. {bad[:3]} (a key is 1-90 printable "
                         "ASCII characters without dots, slashes or spaces); rename them or use --key index")
    counts = Counter(keys)
    if dupes := sorted(k for k, n in counts.items() if n > 1):
        first = dupes[0]
        clash = [str(p) for p, k in zip(paths, keys) if k == first]
        raise ValueError(f"{where}: {len(dupes)} file name stem(s) occur more than once, e.g. {first!r} for {clash}; "
                         "keys must be unique: rename the files or use --key index")
    return keys


def _keys(paths: list[Path | str], key: str, where: str) -> list[str]:
    if key not in KEY_MODES:
        raise ValueError(f"key must be one of {KEY_MODES}, got {key!r}")
    return stem_keys(paths, where) if key == "stem" else [f"{i:08d}" for i in range(len(paths))]


def image_folder_source(root: str | Path, classes: list[str] | None = None, key: str = "index") -> SampleSource:
    """ROOT/<class>/<image>: classes are the sorted subfolder names (or `classes`, in that order).

    `key`: "index" (00000000, 00000001, ... in sorted path order) or "stem" (the file name without extension)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected ROOT/<class>/<image files>)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    elif missing := [c for c in classes if c not in found]:
        raise FileNotFoundError(f"no subfolder for class(es) {missing} in {root}; found {found}")
    if not classes:
        raise ValueError(f"{root} has no class subfolders (expected ROOT/<class>/<image files>)")
    files: list[tuple[int, Path, str]] = []  # (label, path, why it cannot be read or "")
    for label, name in enumerate(classes):
        in_class = image_entries(root / name)
        if not any(not problem for _, problem in in_class):
            log.warning("class folder %s holds no readable image files", root / name)
        files += [(label, p, problem) for p, problem in in_class]
    readable = [p for _, p, problem in files if not problem]
    if not readable:
        bad = [f"{p} ({problem})" for _, p, problem in files][:3]
        raise ValueError(f"{root} holds no image files that can be read in its class subfolders {classes}"
                         + (f"; unreadable entries: {bad}" if bad else ""))
    # Entries that cannot be read are listed too, so the writer skips and counts them (manifest `skipped`) as it
    # does files Pillow cannot open: they take an index like those, but need no valid stem: they are never written.
    if key == "stem":
        stems = iter(stem_keys(readable, str(root)))
        keys = [p.stem if problem else next(stems) for _, p, problem in files]
    else:
        keys = _keys([p for _, p, _ in files], key, str(root))

    def generate(skip: Callable[[str, str], None]) -> Iterator[RawSample]:
        for i, ((label, path, problem), name) in enumerate(zip(files, keys)):
            rel = path.relative_to(root).as_posix()
            yield RawSample(name, ImageFile(path, str(path), problem), label, None,
                            {"index": i, "path": rel, SOURCE_FIELD: rel})

    return SampleSource(f"folder:{root}", list(classes), len(files), generate)


# --- IDX (MNIST-style) --------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into an array of the shape its header gives."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file: magic bytes {raw[:4].hex(' ')}, expected 00 00 <type> <ndim> "
            f"with type one of {', '.join(f'{t:02x}' for t in IDX_DTYPES)}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    need = math.prod(dims) * dtype.itemsize
    have = len(raw) - header
    if have != need:
        what = "truncated" if have < need else "longer than its header says"
        raise ValueError(f"{path}: {what}: header gives shape {dims} ({need} data bytes), file has {have}")
    return np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)


def idx_source(
    images_path: str | Path, labels_path: str | Path, classes: list[str] | None = None, split: str = ""
) -> SampleSource:
    """Images (N, H, W) or (N, H, W, 3) uint8 and labels (N,) from a pair of IDX files."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise ValueError(f"{images_path}: expected uint8 images (N, H, W) or (N, H, W, 3), got "
                         f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{labels_path}: expected integer labels (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{labels_path}: negative label {labels.min()}")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if classes is None:
        classes = [str(i) for i in range(n_classes)]
    elif n_classes > len(classes):
        raise ValueError(f"{labels_path}: label {n_classes - 1} is out of range for {len(classes)} classes")
    images = images.astype(np.uint8, copy=False)  # drop the big-endian marker; bytes are the same
    labels = labels.astype(np.int64)
    name = Path(images_path).name

    def generate(skip: Callable[[str, str], None]) -> Iterator[RawSample]:
        for i in range(len(images)):
            meta = {"index": i, "file": name, SOURCE_FIELD: str(i)}
            yield RawSample(f"{i:08d}", Image.fromarray(images[i]), int(labels[i]), None, meta)

    desc = f"idx:{images_path}" + (f" ({split})" if split else "")
    return SampleSource(desc, list(classes), len(images), generate)


def find_mnist_files(folder: str | Path) -> dict[str, tuple[Path, Path]]:
    """The four (Fashion-)MNIST files in `folder` -> {"train": (images, labels), "val": (t10k images, labels)}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"IDX folder {folder} does not exist")
    found: dict[str, tuple[Path, Path]] = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        pair = []
        for kind, ndim in (("images", 3), ("labels", 1)):
            names = [f"{prefix}-{kind}{sep}idx{ndim}-ubyte{gz}" for sep in ("-", ".") for gz in (".gz", "")]
            hits = [folder / n for n in names if (folder / n).is_file()]
            if not hits:
                raise FileNotFoundError(f"no {prefix} {kind} file in {folder}: looked for {', '.join(names)}")
            pair.append(hits[0])
        found[split] = (pair[0], pair[1])
    return found


def mnist_splits(folder: str | Path, classes: list[str] | None = None) -> dict[str, SampleSource]:
    """Train (train-*) and val (t10k-*) sources from a folder holding the four MNIST-style files."""
    return {split: idx_source(im, lb, classes, split) for split, (im, lb) in find_mnist_files(folder).items()}


# --- caption table ------------------------------------------------------------------------------

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


@dataclass(frozen=True)
class TableColumns:
    """Which column holds what in a caption table; `label` and `id` are optional, `caption` may be "" (no
    captions: a labelled image list)."""

    image: str = "image"
    caption: str = "caption"
    label: str = "label"
    id: str = "id"

    def required(self) -> list[str]:
        return [c for c in (self.image, self.caption) if c]


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq  # optional: only Parquet tables need it
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install 'vitssl[parquet]' (or pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    return [(n, row) for n, row in enumerate(rows, 1)]


def _read_table(path: Path, columns: TableColumns) -> list[tuple[int, dict]]:
    """(line or row number, row) pairs from a .csv, .tsv, .jsonl or .parquet table, its required columns checked."""
    suffix = path.suffix.lower()
    need = columns.required()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="," if suffix == ".csv" else "\t")
            rows = [(reader.line_num, row) for row in reader]
            header = reader.fieldnames or []
    elif suffix == ".parquet":
        rows = _read_parquet(path)
        header = list(rows[0][1]) if rows else []
    elif suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not JSON ({e})") from e
                if not isinstance(row, dict) or any(c not in row for c in need):
                    raise ValueError(f"{path} line {n}: need an object with {need}" + _column_hint(columns))
                rows.append((n, row))
        return rows
    else:
        raise ValueError(f"{path}: unknown table type {suffix!r}; use {', '.join(TABLE_SUFFIXES)}")
    if missing := [c for c in need if c not in header]:
        raise ValueError(f"{path}: missing column(s) {missing}; header is {header}" + _column_hint(columns))
    return rows


def _column_hint(columns: TableColumns) -> str:
    return (f"; name the columns with --image-col (now {columns.image!r}), --caption-col ({columns.caption!r}; '' for "
            f"none), --label-col ({columns.label!r}), --id-col ({columns.id!r})")


def _label_index(value: object, classes: list[str], where: str) -> int:
    if isinstance(value, str) and value in classes:
        return classes.index(value)
    try:
        index = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: label {value!r} is not one of the classes {classes} nor an index") from None
    if not 0 <= index < len(classes):
        raise ValueError(f"{where}: label {index} is out of range for {len(classes)} classes")
    return index


def _is_int(value: object) -> bool:
    try:
        int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return not isinstance(value, float)


def caption_table_source(
    table: str | Path, classes: list[str] | None = None, key: str = "index", columns: TableColumns | None = None
) -> SampleSource:
    """Rows with an image path (relative to the table's folder, or absolute), a caption and optional label and id,
    in the columns `columns` names (default `image`, `caption`, `label`, `id`); .csv, .tsv, .jsonl or .parquet.

    A row's source name is its id when the table has one (else its row number 0..N-1); two tables that
    describe the same items with the same ids let retrieval be scored per item. Labels are class names or
    integer indices. Without `classes`, integer labels give classes
    "0".."max" and named labels give the sorted set of names. `key="stem"` keys each sample by its image file
    name without extension (refused when two rows share one). With `columns.caption=""` the table is a labelled
    image list without captions.
    """
    table = Path(table)
    columns = columns or TableColumns()
    if not table.is_file():
        raise FileNotFoundError(f"caption table {table} does not exist")
    rows = _read_table(table, columns)
    if not rows:
        raise ValueError(f"{table} has no rows")

    def label_of(row: dict) -> object:
        return row.get(columns.label) if columns.label else None

    given = [label_of(row) for _, row in rows if label_of(row) not in (None, "")]
    if classes is None:
        if all(_is_int(v) for v in given):
            classes = [str(i) for i in range(max((int(v) for v in given), default=-1) + 1)]
        else:
            classes = sorted({str(v) for v in given})
    labels = [
        None if label_of(row) in (None, "") else _label_index(label_of(row), classes, f"{table} line {n}")
        for n, row in rows
    ]
    keys = _keys([str(row[columns.image]) for _, row in rows], key, str(table))

    def generate(skip: Callable[[str, str], None]) -> Iterator[RawSample]:
        for i, ((n, row), label, name) in enumerate(zip(rows, labels, keys)):
            where = f"{table} line {n}"
            caption = str(row[columns.caption] or "").strip() if columns.caption else None
            path = Path(str(row[columns.image]))
            path = path if path.is_absolute() else table.parent / path
            if columns.caption and not caption:
                skip(where, "empty caption")
                continue
            if not path.is_file():
                skip(where, f"missing image file {path}")
                continue
            row_id = row.get(columns.id) if columns.id else None
            source = str(i) if row_id in (None, "") or isinstance(row_id, (dict, list)) else str(row_id)
            yield RawSample(name, ImageFile(path, f"{where} ({path})"), label, caption,
                            {"index": i, "path": str(row[columns.image]), SOURCE_FIELD: source})

    return SampleSource(f"captions:{table}", list(classes), len(rows), generate)
