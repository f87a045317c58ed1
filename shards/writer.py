"""Write samples as a WebDataset shard set: `shard-000000.tar`, ... plus `manifest.json`.

A shard set is written into a hidden temporary folder and renamed into place when complete, so an
interrupted writer leaves neither a truncated shard nor a manifest under the final name (and a
previous set at that path stays intact until the new one is whole).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import multiprocessing
import os
import sys
import tarfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from shards.atomic import atomic_path
from shards.manifest import Manifest, ShardInfo, sha256_file
from shards.ownership import claim_output, mark_output
from shards.prepare import Encoded, Preparer, Unreadable
from shards.record import ENCODINGS, Record
from shards.resize import Resize
from shards.sources import RawSample, SampleSource
from shards.stats import DatasetStats
from shards.tar import tar_writer

log = logging.getLogger(__name__)
_WINDOW_PER_WORKER = 64  # samples in flight per worker process
_CHUNK = 8  # samples per task sent to a worker

SHARD_PATTERN = "shard-{:06d}.tar"
_UNBALANCED_PATTERN = "unbalanced-{:06d}.tar"  # first pass when shards must be re-split evenly
_TAR_BLOCK = 512
_TAR_RECORD = tarfile.RECORDSIZE  # tarfile pads a closed archive to a multiple of this
_TAR_MTIME = 946684800  # fixed member times (2000-01-01) make the tars, and their sha256, reproducible


@dataclass(frozen=True)
class ShardOptions:
    """How samples are cut into shards and how images are encoded."""

    samples_per_shard: int = 1000
    max_shard_bytes: int = 0  # 0: no byte limit
    encoding: str = "png"
    jpg_quality: int = 95
    shard_multiple: int = 1  # >1: equal-sized shards (within one sample) whose count is a multiple of this
    resize: Resize = Resize()  # how images are sized before they are stored (default: as they are)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_shard_bytes < 0:
            raise ValueError(f"max_shard_bytes must be >= 0, got {self.max_shard_bytes}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not 1 <= self.jpg_quality <= 100:
            raise ValueError(f"jpg_quality must be in 1..100, got {self.jpg_quality}")
        if self.shard_multiple < 1:
            raise ValueError(f"shard_multiple must be >= 1, got {self.shard_multiple}")

    def preparer(self, classes: list[str]) -> Preparer:
        return Preparer(tuple(classes), self.encoding, self.jpg_quality, self.resize)


def _member_bytes(record: Record) -> int:
    """Bytes the record adds to a tar: a header block per file plus its data padded to blocks."""
    return sum(_TAR_BLOCK + -(-len(v) // _TAR_BLOCK) * _TAR_BLOCK for k, v in record.items() if k != "__key__")


def _tar_file_bytes(member_bytes: int) -> int:
    """Size of a closed tar holding members of this many bytes: two end blocks, padded to a record."""
    return -(-(member_bytes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def plan_balanced(record_bytes: list[int], options: ShardOptions) -> list[int]:
    """Per-shard counts: a multiple of `shard_multiple` shards, sizes within one, under both limits."""
    n, multiple = len(record_bytes), options.shard_multiple
    offsets = [0, *itertools.accumulate(record_bytes)]
    shards = multiple * math.ceil(n / (options.samples_per_shard * multiple))
    while shards <= n:
        sizes = [n // shards + (i < n % shards) for i in range(shards)]
        starts = [0, *itertools.accumulate(sizes)]
        fits = not options.max_shard_bytes or all(
            size == 1 or _tar_file_bytes(offsets[start + size] - offsets[start]) <= options.max_shard_bytes
            for start, size in zip(starts, sizes)
        )
        if fits:
            return sizes
        shards += multiple
    raise ValueError(f"cannot cut {n} samples into a multiple of {multiple} equal, non-empty shards "
                     f"under the limits {options}")


class _ShardSink:
    """Writes records into consecutive tar shards in `folder`, closing each one at its limit.

    `spans` keeps (shard number, start, end) of every record's bytes, for re-cutting without re-encoding.
    """

    def __init__(self, folder: Path, pattern: str, options: ShardOptions):
        self.folder, self.pattern, self.options = folder, pattern, options
        self.shards: list[ShardInfo] = []
        self.spans: list[tuple[int, int, int]] = []
        self._tar: wds.TarWriter | None = None
        self._count = 0
        self._bytes = 0

    def add(self, record: Record) -> None:
        size = _member_bytes(record)
        if self._tar is not None and self._full(size):
            self._close_shard()
        if self._tar is None:
            path = self.folder / self.pattern.format(len(self.shards))
            self._tar = tar_writer(path, encoder=False, mtime=_TAR_MTIME)
        start = self._tar.tarstream.offset
        self._tar.write(record)
        self.spans.append((len(self.shards), start, self._tar.tarstream.offset))
        self._count += 1
        self._bytes += size

    def _full(self, size: int) -> bool:
        if self._count >= self.options.samples_per_shard:
            return True
        limit = self.options.max_shard_bytes
        return bool(limit) and _tar_file_bytes(self._bytes + size) > limit

    def _close_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        path = self.folder / self.pattern.format(len(self.shards))
        self.shards.append(ShardInfo(path.name, self._count, sha256_file(path), path.stat().st_size))
        self._tar, self._count, self._bytes = None, 0, 0

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close_shard()
        return self.shards


def recut_shards(folder: Path, first: list[ShardInfo], spans: list[tuple[int, int, int]], plan: list[int]) -> list[ShardInfo]:
    """Re-cut shards into `plan` counts by copying each record's tar blocks, then delete the originals.

    A tar member's blocks do not depend on where it sits, so the copies are the very bytes a
    TarWriter would write; each new shard ends with the end-of-archive blocks and record padding.
    """
    shards = []
    records = iter(spans)
    with ExitStack() as stack:
        inputs = [stack.enter_context(open(folder / s.name, "rb")) for s in first]
        for i, count in enumerate(plan):
            path = folder / SHARD_PATTERN.format(i)
            members = 0
            with open(path, "wb") as out:
                for shard, start, end in itertools.islice(records, count):
                    inputs[shard].seek(start)
                    out.write(inputs[shard].read(end - start))
                    members += end - start
                out.write(bytes(_tar_file_bytes(members) - members))
            shards.append(ShardInfo(path.name, count, sha256_file(path), path.stat().st_size))
    for s in first:
        (folder / s.name).unlink()
    return shards


class _SetWriter:
    """Stores prepared samples (`shards.record.Encoded`) in one staging folder and produces its manifest."""

    def __init__(self, folder: Path, classes: list[str], options: ShardOptions):
        self.folder, self.classes, self.options = folder, list(classes), options
        balance = options.shard_multiple > 1
        self.sink = _ShardSink(folder, _UNBALANCED_PATTERN if balance else SHARD_PATTERN, options)
        self.keys: set[str] = set()
        self.stats = DatasetStats()
        self.conversions: Counter[str] = Counter()  # normalize_image's changes worth reporting, per kind

    def add(self, encoded: Encoded) -> None:
        key = str(encoded.record["__key__"])
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self.keys.add(key)
        if encoded.change:
            self.conversions[encoded.change] += 1
        self.stats.add(encoded.summary, encoded.label, encoded.has_caption)
        self.sink.add(encoded.record)

    def finish(self, source: str, split: str, skipped: int = 0) -> Manifest:
        shards = self.sink.close()
        if not shards:
            raise ValueError(f"no samples to write for {source}" + (f" ({split})" if split else ""))
        if self.options.shard_multiple > 1:
            shards = self._balance(shards)
        stats = self.stats
        manifest = Manifest(
            shards=shards,
            classes=self.classes,
            source=source,
            split=split,
            encoding=self.options.encoding,
            image_mode=next(iter(stats.modes)) if len(stats.modes) == 1 else "",
            image_size=list(next(iter(stats.sizes))) if len(stats.sizes) == 1 else [],
            has_captions=stats.captions == stats.images,
            conversions=dict(sorted(self.conversions.items())),
            resize=self.options.resize.describe(),
            skipped=skipped,
            stats=stats.to_dict(self.classes),
        )
        manifest.save(self.folder)
        return manifest

    def _balance(self, first: list[ShardInfo]) -> list[ShardInfo]:
        """Equal shards, a multiple of `shard_multiple` of them: rename the first pass if it is, else re-cut."""
        counts = [s.count for s in first]
        if len(counts) % self.options.shard_multiple == 0 and max(counts) - min(counts) <= 1:
            renamed = []
            for i, s in enumerate(first):
                name = SHARD_PATTERN.format(i)
                os.replace(self.folder / s.name, self.folder / name)
                renamed.append(ShardInfo(name, s.count, s.sha256, s.bytes))
            return renamed
        spans = self.sink.spans
        plan = plan_balanced([end - start for _, start, end in spans], self.options)
        return recut_shards(self.folder, first, spans, plan)


def _log_skip(what: str, why: str) -> None:
    log.warning("skipped %s: %s", what, why)


def prepared(samples: Iterable[RawSample], prepare: Preparer, workers: int = 1) -> Iterator[Encoded | Unreadable]:
    """`prepare(sample)` for every sample, in order; over `workers` processes when > 1.

    At most `workers` x `_WINDOW_PER_WORKER` samples are in flight, so a large source is never read far
    ahead of the shards being written. Order is kept, so the shards are byte for byte those of one process.
    """
    if workers <= 1:
        yield from map(prepare, samples)
        return
    window = workers * _WINDOW_PER_WORKER
    slots = threading.Semaphore(window)
    stopping = False

    def feed() -> Iterator[RawSample]:  # runs in the pool's task-feeding thread
        for sample in samples:
            slots.acquire()
            if stopping:
                return
            yield sample

    pool = _pool_context().Pool(workers)
    try:
        for result in pool.imap(prepare, feed(), chunksize=_CHUNK):
            slots.release()
            yield result
        pool.close()
    finally:
        stopping = True
        for _ in range(window):  # wake the feeder if it waits for a slot, so terminate() can join it
            slots.release()
        pool.terminate()
        pool.join()


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork on Linux, as torch's DataLoader: the workers start at once with what the parent imported. spawn and
    forkserver re-run the main script's imports in every worker, and a console script (`vitssl-shards`) imports
    torch through webdataset: seconds per worker, more than the writing it saves. The pool is made before
    the feeding thread starts, and the workers only run Pillow."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _skip_reporter(samples: Iterable[RawSample], on_skip: Callable[[str, str], None] | None) -> Callable[[str, str], None]:
    """`on_skip`, else the source's own counter (`SampleSource.skip`), else a warning in the log."""
    return on_skip or (samples.skip if isinstance(samples, SampleSource) else _log_skip)


def _store(items: Iterable[Encoded | Unreadable], on_skip: Callable[[str, str], None],
           writer_for: Callable[[Encoded], _SetWriter]) -> int:
    """Add each prepared sample to its set's writer; report the unreadable ones and return how many there were."""
    skipped = 0
    for item in items:
        if isinstance(item, Unreadable):
            skipped += 1
            on_skip(item.what, item.why)
        else:
            writer_for(item).add(item)
    return skipped


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


def write_shard_set(
    samples: Iterable[RawSample],
    out_dir: str | os.PathLike,
    *,
    classes: list[str],
    source: str,
    split: str = "",
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 0,
    encoding: str = "png",
    jpg_quality: int = 95,
    shard_multiple: int = 1,
    resize: Resize | None = None,
    workers: int = 1,
    on_skip: Callable[[str, str], None] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write `samples` as `out_dir/shard-000000.tar`, ... and `out_dir/manifest.json`.

    A shard closes at `samples_per_shard` samples or before it would pass `max_shard_bytes`.
    With `shard_multiple` M > 1 the set is re-cut into a multiple of M shards whose counts differ
    by at most one, so that ranks x workers get equal shares. Images are stored as 8-bit "L" or "RGB"
    (`shards.sources.normalize_image`), sized by `resize` (`shards.resize.Resize`); how many were scaled from a
    high bit depth or composited from transparency is in the returned manifest's `conversions`, and the
    statistics of what was stored in its `stats`. `workers` > 1 opens, resizes and encodes in that many
    processes; the output is the same bytes. An image file that cannot be opened is skipped: `on_skip(what, why)`
    is told (default: the source's `skip`, which counts it) and the manifest counts it (`skipped`).
    An existing `out_dir` is replaced only when it is a shard set this project wrote and `overwrite` is given.
    """
    options = ShardOptions(samples_per_shard, max_shard_bytes, encoding, jpg_quality, shard_multiple, resize or Resize())
    _check_workers(workers)
    on_skip = _skip_reporter(samples, on_skip)
    out = Path(out_dir)
    claim_output(out, "shards", overwrite=overwrite)
    with atomic_path(out) as staging:
        staging.mkdir()
        mark_output(staging, "shards")
        writer = _SetWriter(staging, classes, options)
        skipped = _store(prepared(samples, options.preparer(classes), workers), on_skip, lambda item: writer)
        manifest = writer.finish(source, split, skipped)
    return manifest


def is_val(key: str, seed: int, val_fraction: float) -> bool:
    """Deterministic split by a seeded hash of the key: a sample's side never depends on the others."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def write_split_shard_sets(
    samples: Iterable[RawSample],
    out_dir: str | os.PathLike,
    *,
    val_fraction: float,
    seed: int = 0,
    classes: list[str],
    source: str,
    workers: int = 1,
    on_skip: Callable[[str, str], None] | None = None,
    overwrite: bool = False,
    **options: object,
) -> dict[str, Manifest]:
    """Write `out_dir/train/` and `out_dir/val/`, each a full shard set, in one pass over `samples`.

    A sample goes to val when a hash of (seed, key) falls under `val_fraction`, so the val share is
    `val_fraction` up to sampling noise. `options` are those of `write_shard_set`; skipped entries are
    counted in the train manifest.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if options.get("resize") is None:
        options["resize"] = Resize()
    opts = ShardOptions(**options)  # type: ignore[arg-type]
    _check_workers(workers)
    on_skip = _skip_reporter(samples, on_skip)
    out = Path(out_dir)
    for split in ("train", "val"):
        claim_output(out / split, "shards", overwrite=overwrite)
    with ExitStack() as stack:
        writers = {}
        for split in ("train", "val"):
            staging = stack.enter_context(atomic_path(out / split))
            staging.mkdir()
            mark_output(staging, "shards")
            writers[split] = _SetWriter(staging, classes, opts)

        def side(item: Encoded) -> _SetWriter:
            return writers["val" if is_val(str(item.record["__key__"]), seed, val_fraction) else "train"]

        skipped = _store(prepared(samples, opts.preparer(classes), workers), on_skip, side)
        return {split: w.finish(source, split, skipped if split == "train" else 0) for split, w in writers.items()}
