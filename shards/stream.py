"""Stream decoded, collated batches from WebDataset tar shards, split over ranks and DataLoader workers.

Two modes:

- ``mode="exact"`` (training epochs, feature extraction): every sample once per epoch across all
  ranks x workers, whatever the shard count and sizes. Per epoch the shard order is permuted with an
  RNG seeded by (seed, epoch), identical on every rank; the concatenation is one virtual sequence of
  N samples; rank r takes the contiguous slice [r*N//R, (r+1)*N//R). Ranks must run the same number
  of batches (or DDP hangs at the epoch's end), so ``remainder`` equalises them:
  ``"drop"`` (training) yields FULL batches only: every rank T = floor(floor(N/R) / B) * B samples, so
  up to R*B - 1 samples per epoch go unseen; with ``shuffle`` the virtual sequence also starts at an
  offset drawn from (seed, epoch), so the unseen few differ each epoch even with a single shard. A set
  too small for one full batch per rank is a ValueError (use ``"pad"``). ``"pad"`` (feature
  extraction) extends every rank to T = ceil(N/R) with ``pad=True`` duplicates (the samples after the
  slice, wrapping round), so a feature gather that drops pads sees each sample exactly once; its last
  batch may be short. A rank's K = ceil(T/B) batches are dealt to workers round-robin (batch k to
  worker k % W, matching the DataLoader's round-robin), and each worker reads a contiguous part of the
  rank's slice, touching only the shards that overlap it, skipping the rest undecoded.
- ``mode="resampled"`` (endless or huge data): each worker draws shards with replacement (weighted
  by sample count) with an RNG seeded by (seed, epoch, rank, worker); an epoch is
  ``epoch_samples // world_size`` samples per rank.

A worker shuffles its records in a buffer seeded by (seed, epoch, rank, worker). Before a sample's
``transform`` runs, torch's CPU RNG and python's ``random`` are seeded from (seed, epoch, sample
index), so augmentations do not depend on the worker count or the resume point. In the main process
(num_workers=0) those RNG states are restored afterwards: iterating never disturbs the trainer's RNG.

Bad input is warned about (`StreamWarning`, naming shard and key), skipped and counted: truncated or
corrupt tars (the samples the manifest promised but the tar did not deliver), unreadable images, a
missing label or caption when ``require`` asks for it. Each batch carries ``skipped``: bad samples its
worker met since its previous batch. A worker short of samples pads with ``pad=True`` duplicates so
batch counts stay equal; past ``max_bad_fraction`` of its samples a worker raises `StreamError`.

Resume: ``set_position(epoch, batches_done)`` makes each worker drop the records of the batches it
already delivered, after the shuffle and before decoding. Batches after resume are identical (keys,
order and augmented tensors) when world size, num_workers, batch size and seed are unchanged and the
skipped part of the epoch held no bad samples.

Images reach the transform as 8-bit "L" or "RGB" (`shards.sources.normalize_image`: 16-bit and float
images scaled, not clipped; transparency composited onto white).

Tars are read, and sources resolved into shards, by `shards.tar` (local, ``http(s)://``; ``pipe:`` only when
allowed).
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import itertools
import os
import random
import struct
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.filters import shuffle as buffer_shuffle

from shards.lifeline import WorkerLifeline
from shards.record import decode_image, image_extension, no_image_problem, parse_label
from shards.tar import PipeSourceError, StreamError, StreamWarning, iter_tar_samples, list_shards, open_shard

REQUIRABLE = ("label", "caption")
# Distinct tags keep the RNG streams derived from the same seed independent.
_TAG_SHARD_ORDER, _TAG_BUFFER, _TAG_VIEW, _TAG_RESAMPLE, _TAG_VIEW_RESAMPLED, _TAG_ROTATE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Shard:
    url: str  # local path or URL, as given to `shards.tar.open_shard`
    count: int  # samples it holds (manifest or scan)
    offset: int  # canonical index of its first sample


class _Record(NamedTuple):
    index: int
    key: str
    files: dict[str, bytes]
    pad: bool
    url: str


class _Tally:
    """One worker's bad-sample book-keeping."""

    def __init__(self, planned: int, max_bad_fraction: float, where: str) -> None:
        self.planned, self.max_bad_fraction, self.where = planned, max_bad_fraction, where
        self.read = self.bad = self.reported = 0
        self.last = ""

    def add_bad(self, n: int, reason: str) -> None:
        self.read += n
        self.bad += n
        self.last = reason
        warnings.warn(reason, StreamWarning, stacklevel=3)
        self.check()

    def check(self) -> None:
        # Judged against the worker's whole share, so it fails as early as the end-of-epoch check would.
        if self.bad > self.max_bad_fraction * max(self.read, self.planned):
            raise StreamError(
                f"{self.where}: {self.bad} bad samples of {self.read} read ({self.planned} planned) exceed "
                f"max_bad_fraction={self.max_bad_fraction}; last: {self.last}"
            )

    def take_new(self) -> int:
        new, self.reported = self.bad - self.reported, self.bad
        return new


def to_float_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a float32 CxHxW tensor in [0, 1]: bit-identical to transforms.v2 `ToImage` then
    `ToDtype(torch.float32, scale=True)`, faster on small images (numpy does it in one pass; bench/README.md)."""
    pixels = np.asarray(image)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    out = np.empty(pixels.shape, dtype=np.float32)
    np.multiply(pixels, np.float32(1 / 255), out=out, dtype=np.float32)
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------------------
# Planning


def _seed_of(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers given."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def worker_batch_sizes(total: int, batch_size: int, workers: int) -> list[list[int]]:
    """Sizes of each worker's batches: batch k (of ceil(total/B), only the last one short) goes to worker k % W."""
    sizes: list[list[int]] = [[] for _ in range(workers)]
    for k in range(-(-total // batch_size)):
        sizes[k % workers].append(min(batch_size, total - k * batch_size))
    return sizes


class _Segment(NamedTuple):
    shard: int  # position in ShardStream.shards
    lo: int  # first sample within the shard
    hi: int  # one past the last
    pad: bool


class _Plan(NamedTuple):
    order: list[int]  # shard positions in this epoch's order
    starts: list[int]  # virtual start of each shard in `order`


# ---------------------------------------------------------------------------------------------------------
# The stream


class ShardStream(IterableDataset):
    """An iterable of collated batches (dicts) from WebDataset shards; see the module docstring.

    A batch holds `image` (stacked transform outputs; without a transform `to_float_tensor`: float
    CxHxW in [0, 1], 1 channel for "L", 3 for "RGB"),
    `label` (int64, -1 when absent), `caption` (list of str, "" when absent), `key` (list of str),
    `index` (int64, canonical sample index), `pad` (bool) and `skipped` (int). Call `set_epoch` before
    each epoch, as with `DistributedSampler`; iterate through `loader()`.

    `remainder` defaults to "pad": every sample exactly once (on one rank without a single pad); training
    passes the recipe's `data.remainder`, "drop" by default: full batches only.
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        batch_size: int,
        num_workers: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
        mode: str = "exact",
        remainder: str = "pad",
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        epoch_samples: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_bad_fraction: float = 0.01,
        require: Sequence[str] = (),
        allow_pipe: bool = False,
    ) -> None:
        super().__init__()
        _check_arguments(batch_size, num_workers, mode, remainder, max_bad_fraction, epoch_samples, require)
        rank, world_size = _rank_and_world(rank, world_size)

        self.batch_size, self.num_workers, self.transform = batch_size, num_workers, transform
        self.mode, self.remainder, self.shuffle, self.shuffle_buffer = (
            mode,
            remainder,
            shuffle,
            shuffle_buffer,
        )
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.max_bad_fraction, self.require = max_bad_fraction, tuple(require)
        self.allow_pipe = allow_pipe  # pipe: sources run shell commands: refused unless allowed
        self.epoch, self.batches_done = 0, 0

        # non-empty shards in canonical order, the empty ones' urls, and the sample count
        self.shards, self.empty_shards, self.total = _nonempty_shards(source, allow_pipe)
        if self.total == 0:
            raise ValueError(
                f"shard source {source!r} holds no samples ({len(self.empty_shards)} empty shards)"
            )
        self.epoch_samples = epoch_samples or self.total
        if self.samples_per_epoch() == 0:
            if mode == "resampled":
                raise ValueError(
                    f"epoch_samples={self.epoch_samples} cannot fill world_size={world_size} ranks (each would "
                    "get none); raise epoch_samples"
                )
            raise ValueError(
                f"remainder='drop' leaves no full batch: {self.total} samples over world_size={world_size} ranks "
                f"is {self.total // world_size} per rank, fewer than batch_size={batch_size}; use "
                "remainder='pad', a smaller batch_size or fewer ranks"
            )

    # ---- position ----------------------------------------------------------------------------------------

    @property
    def _workers(self) -> int:
        return max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (call before every epoch; the order depends on it)."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, batches_done: int) -> None:
        """Resume `epoch` after the `batches_done` batches this rank already consumed."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch}: must be >= 0")
        if not 0 <= batches_done <= self.batches_per_epoch():
            raise ValueError(f"batches_done={batches_done}: must be in [0, {self.batches_per_epoch()}]")
        self.epoch, self.batches_done = epoch, batches_done

    def samples_per_epoch(self) -> int:
        """Samples each rank yields per epoch (pads included); identical on every rank."""
        if self.mode == "resampled":
            return self.epoch_samples // self.world_size
        if self.remainder == "drop":  # full batches only
            return self.total // self.world_size // self.batch_size * self.batch_size
        return -(-self.total // self.world_size)

    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch; identical on every rank."""
        return -(-self.samples_per_epoch() // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def loader(self, **dataloader_kwargs: Any) -> DataLoader:
        """A DataLoader over this stream: batching done here (batch_size=None), own seeded generator so the
        global torch RNG is untouched, workers re-created each epoch (they read `set_epoch`)."""
        for fixed in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if fixed in dataloader_kwargs:
                raise ValueError(f"loader(): {fixed} is set by the stream, not the DataLoader")
        workers = dataloader_kwargs.pop("num_workers", self.num_workers)
        if workers != self.num_workers:
            raise ValueError(
                f"loader(num_workers={workers}) differs from the stream's num_workers={self.num_workers}"
            )
        if dataloader_kwargs.pop("persistent_workers", False):
            raise ValueError(
                "persistent workers would keep the first epoch's position; the stream needs fresh ones"
            )
        if not dataloader_kwargs.pop("in_order", True):
            raise ValueError("in_order=False breaks the batch order that resume relies on")
        # Workers die with this process (SIGKILL of a rank), then run the caller's own worker_init_fn.
        dataloader_kwargs["worker_init_fn"] = WorkerLifeline(dataloader_kwargs.get("worker_init_fn"))
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return DataLoader(
            self,
            batch_size=None,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=False,
            in_order=True,
            **dataloader_kwargs,
        )

    # ---- iteration -----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers, done = self._workers, self.batches_done
        info = get_worker_info()
        if info is None:  # main process: play every worker's part, in the DataLoader's round-robin order
            queue = collections.deque(self._iter_worker((p + done) % workers, False) for p in range(workers))
            while queue:
                part = queue.popleft()
                batch = next(part, None)
                if batch is not None:
                    yield batch
                    queue.append(part)
            return
        if info.num_workers != workers:
            raise ValueError(
                f"the DataLoader has num_workers={info.num_workers} but the stream was built for {self.num_workers}; "
                "use ShardStream.loader()"
            )
        # After a resume the DataLoader starts again at worker 0, so worker 0 plays the part that owes batch `done`.
        yield from self._iter_worker((info.id + done) % workers, True)

    def _plan(self, epoch: int) -> _Plan:
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(_seed_of(_TAG_SHARD_ORDER, self.seed, epoch)).shuffle(order)
        starts = list(itertools.accumulate((self.shards[i].count for i in order), initial=0))[:-1]
        return _Plan(order, starts)

    def _segments(self, plan: _Plan, first: int, stop: int, pad: bool) -> list[_Segment]:
        """Shard pieces covering virtual positions [first, stop) of this epoch's sequence (no wrap)."""
        out = []
        i = bisect.bisect_right(plan.starts, first) - 1
        while first < stop:
            shard = plan.order[i]
            end = min(stop, plan.starts[i] + self.shards[shard].count)
            out.append(_Segment(shard, first - plan.starts[i], end - plan.starts[i], pad))
            first, i = end, i + 1
        return out

    def _rotation(self, epoch: int) -> int:
        """Where this epoch's virtual sequence starts: 0, or with shuffle and remainder="drop" an offset drawn
        from (seed, epoch), so the samples that do not fill a batch change every epoch even with one shard."""
        if not (self.shuffle and self.remainder == "drop"):
            return 0
        return random.Random(_seed_of(_TAG_ROTATE, self.seed, epoch)).randrange(self.total)

    def _worker_segments(self, worker: int) -> list[_Segment]:
        """Exact mode: the shard pieces one worker reads this epoch, in order."""
        plan, n, world = self._plan(self.epoch), self.total, self.world_size
        rank_start = self.rank * n // world + self._rotation(self.epoch)
        rank_len = (self.rank + 1) * n // world - self.rank * n // world
        quotas = [
            sum(s) for s in worker_batch_sizes(self.samples_per_epoch(), self.batch_size, self._workers)
        ]
        first = sum(quotas[:worker])
        stop = first + quotas[worker]
        # Positions [first, stop) of the rank's slice, wrapping round the sequence; those past the slice are
        # pads (remainder="pad"): the samples after it.
        segments, pos = [], first
        while pos < stop:
            pad = pos >= rank_len
            v = (rank_start + pos) % n
            run = min((stop if pad else min(stop, rank_len)) - pos, n - v)
            segments += self._segments(plan, v, v + run, pad)
            pos += run
        return segments

    def _iter_worker(self, worker: int, in_worker_process: bool) -> Iterator[dict[str, Any]]:
        """The batches of one (logical) worker for the current epoch, from the resume point on."""
        sizes = worker_batch_sizes(self.samples_per_epoch(), self.batch_size, self._workers)[worker]
        done = max(0, -(-(self.batches_done - worker) // self._workers))  # its batches among the first done
        sizes = sizes[done:]
        if not sizes:
            return
        where = f"rank {self.rank} worker {worker} epoch {self.epoch}"
        tally = _Tally(sum(sizes), self.max_bad_fraction, where)
        exact = self.mode == "exact"
        if exact:
            records: Iterator[_Record] = itertools.chain.from_iterable(
                read_segment(self.shards[s.shard], s, tally, self.allow_pipe) for s in self._worker_segments(worker)
            )
        else:
            rng = random.Random(_seed_of(_TAG_RESAMPLE, self.seed, self.epoch, self.rank, worker))
            records = _resampled_records(self.shards, rng, tally, self.allow_pipe)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(_seed_of(_TAG_BUFFER, self.seed, self.epoch, self.rank, worker))
            # A full buffer before the first output: each worker's slice starts at a shard boundary.
            records = buffer_shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(records)
        skip = done * self.batch_size
        restore_rng = not in_worker_process
        batch: list[dict[str, Any]] = []
        last_good: dict[str, Any] | None = None
        for ordinal, rec in enumerate(records):
            if ordinal < skip:
                continue  # delivered before the resume: dropped undecoded
            parsed = parse_record(rec.files, self.require)
            if isinstance(parsed, str):
                tally.add_bad(1, f"{rec.url}: sample {rec.key!r}: {parsed}")
                continue
            tally.read += 1
            image, label, caption = parsed
            if self.transform is None:
                view = to_float_tensor(image)
            else:
                if exact:
                    seed = _seed_of(_TAG_VIEW, self.seed, self.epoch, rec.index)
                else:
                    seed = _seed_of(_TAG_VIEW_RESAMPLED, self.seed, self.epoch, self.rank, worker, ordinal)
                view = seeded_view(self.transform, image, seed, restore_rng)
            sample = {
                "image": view,
                "label": label,
                "caption": caption,
                "key": rec.key,
                "index": rec.index,
                "pad": rec.pad,
            }
            last_good = sample
            batch.append(sample)
            if len(batch) == sizes[0]:
                yield _collate(batch, tally)
                batch, sizes = [], sizes[1:]
                if not sizes:
                    return
        while sizes:  # bad samples left this worker short: pad so every rank runs the same batches
            if last_good is None:
                raise StreamError(
                    f"{where}: no readable sample to pad with; last problem: {tally.last or 'none'}"
                )
            batch.append({**last_good, "pad": True})
            if len(batch) == sizes[0]:
                yield _collate(batch, tally)
                batch, sizes = [], sizes[1:]


def _check_arguments(batch_size: int, num_workers: int, mode: str, remainder: str, max_bad_fraction: float,
                     epoch_samples: int, require: Sequence[str]) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be > 0")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}: must be >= 0")
    if mode not in ("exact", "resampled"):
        raise ValueError(f"mode={mode!r}: must be 'exact' or 'resampled'")
    if remainder not in ("drop", "pad"):
        raise ValueError(f"remainder={remainder!r}: must be 'drop' or 'pad'")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction={max_bad_fraction}: must be in [0, 1]")
    if epoch_samples < 0:
        raise ValueError(f"epoch_samples={epoch_samples}: must be >= 0")
    unknown = sorted(set(require) - set(REQUIRABLE))
    if unknown:
        raise ValueError(f"require={list(require)}: unknown {unknown}; valid: {list(REQUIRABLE)}")


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The given rank and world size, the initialised process group's where not given (else 0 of 1)."""
    if rank is None or world_size is None:
        distributed = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} with world_size={world_size}: need 0 <= rank < world_size")
    return rank, world_size


def _nonempty_shards(source, allow_pipe: bool) -> tuple[list[Shard], list[str], int]:
    """(non-empty shards in canonical order, urls of the empty ones, total samples); an empty shard warns."""
    shards, empty, offset = [], [], 0
    for url, count in list_shards(source, allow_pipe=allow_pipe):
        if count == 0:
            warnings.warn(f"{url}: shard holds no samples; skipped", StreamWarning, stacklevel=3)
            empty.append(url)
        else:
            shards.append(Shard(url, count, offset))
        offset += count
    return shards, empty, offset


def read_segment(shard: Shard, segment: _Segment, tally: _Tally, allow_pipe: bool) -> Iterator[_Record]:
    """Records [lo, hi) of one shard; samples before `lo` are read past undecoded. Samples the shard promised
    (by its manifest or scan) and does not hold are counted as bad in `tally`."""
    got, problem = 0, ""
    try:
        with open_shard(shard.url, allow_pipe=allow_pipe) as stream:
            for pos, (key, files) in enumerate(iter_tar_samples(stream)):
                got = pos + 1
                if pos >= segment.lo:
                    yield _Record(shard.offset + pos, key, files, segment.pad, shard.url)
                if got == segment.hi:
                    return
    except PipeSourceError:
        raise  # a refusal, not a damaged shard
    except (tarfile.ReadError, OSError, EOFError, ValueError) as e:
        problem = f"unreadable after sample {got} ({type(e).__name__}: {e})"
    missing = segment.hi - max(segment.lo, got)
    if missing > 0:
        problem = problem or f"ends after {got} of {shard.count} samples"
        tally.add_bad(missing, f"{shard.url}: {problem}; {missing} samples skipped")


def _resampled_records(shards: list[Shard], rng: random.Random, tally: _Tally, allow_pipe: bool) -> Iterator[_Record]:
    """Whole shards drawn with replacement, in proportion to their sizes, for ever."""
    weights = list(itertools.accumulate(s.count for s in shards))
    everything = range(len(shards))
    while True:
        i = rng.choices(everything, cum_weights=weights)[0]
        yield from read_segment(shards[i], _Segment(i, 0, shards[i].count, False), tally, allow_pipe)


def parse_record(files: dict[str, bytes], require: Sequence[str] = ()) -> tuple[Image.Image, int, str] | str:
    """(image, label, caption) of a record (label -1 and caption "" when absent), or why it is bad."""
    if "__bad__" in files:
        return files["__bad__"].decode()
    ext = image_extension(files)
    if ext is None:
        return no_image_problem(files)
    try:
        image = decode_image(files[ext])  # 8-bit L/RGB: high bit depth scaled, transparency onto white
    except Exception as e:  # PIL raises many types for damaged data; each means the same here
        return f"unreadable image ({type(e).__name__}: {e})"
    try:
        label = parse_label(files)
    except ValueError as e:
        return str(e)
    if label is None:
        if "label" in require:
            return "no label (.cls) but require has 'label'"
        label = -1
    caption = ""
    if "txt" in files:
        try:
            caption = files["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            return ".txt caption is not UTF-8"
    if not caption and "caption" in require:
        return "no caption (.txt) but require has 'caption'"
    return image, label, caption


def seeded_view(transform: Callable[[Image.Image], Any], image: Image.Image, seed: int, restore_rng: bool) -> Any:
    """`transform(image)` with torch's CPU RNG and python's `random` seeded by `seed` (their states restored
    after when `restore_rng`: in the main process, where the trainer's own draws must not move)."""
    if restore_rng:
        torch_state, python_state = torch.default_generator.get_state(), random.getstate()
    # Only the CPU generator: seeding CUDA here would disturb the trainer's GPU RNG.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        return transform(image)
    finally:
        if restore_rng:
            torch.default_generator.set_state(torch_state)
            random.setstate(python_state)


def _collate(samples: list[dict[str, Any]], tally: _Tally) -> dict[str, Any]:
    batch = default_collate(samples)
    batch["skipped"] = tally.take_new()
    # Samples that are not pads, as a plain int: the trainer counts them without reading a device tensor.
    batch["real"] = sum(1 for s in samples if not s.get("pad", False))
    return batch
