"""What pretraining is learning, measured while it learns: the online k-NN and the collapse alarms that read it.

Online k-NN (`OnlineEvaluator`): DINO's weighted k-NN top-1 (cosine similarity, k=20, votes exp(sim / 0.07); Caron
et al. 2021, Sec. 4.1 / their `eval_knn.py`) of a labelled query set against a labelled bank, both embedded with
the backbone the run is training (in eval mode, under no_grad; train mode restored afterwards).

  * The split. Query (`eval.holdout` samples) and bank (`eval.bank_samples` other samples) are drawn once per
    run from `eval.shards`, else from data.train (never from data.val or a test set unless named), by a salted
    hash of each sample's key: the samples with the smallest hashes, the first `holdout` of them the query. The
    rule depends on the keys alone, so every run on the same data (any seed, any recipe) is scored on the same
    split and their curves compare. Only labelled samples (`.cls`) are candidates; a source with none turns the
    evaluation off with one log line. The chosen samples are copied byte for byte into two small shard sets
    under `<run>/eval_split/` (query/, bank/), so every evaluation streams them like any shard set, a resumed run
    reuses them, and the split can be scored offline (`python -m downstream knn`) to check the online number.
    The query images are also training images: the objective never reads a label, so k-NN here measures how
    well the unsupervised features separate the classes, as DINO's k-NN on ImageNet-train does.
  * When. Every `eval.every_steps` updates, every `eval.every_minutes` (stretched so that an evaluation of s
    seconds is followed by at least s / `eval.max_fraction` seconds of training), and at the end of a launch that
    evaluated. The first evaluation also scores the starting weights of a fresh run (the random-init baseline),
    kept on the CPU until then, so a run shorter than one interval (a smoke test) pays nothing.
  * Across ranks. Each rank embeds its slice of each set (`ShardStream` exact mode, remainder="pad": the same
    batch count everywhere), the features are gathered and the pads dropped (as `downstream.features` does);
    the main process searches an exact FAISS inner-product index (IndexFlatIP) and votes.
  * Nothing else moves: the RNG streams exact resume relies on (torch CPU and CUDA, python, numpy) are saved
    and restored around an evaluation, and the DataLoader draws from its own generator.
  * Cost: the transform is deterministic, so a rank's decoded batches are kept after the first evaluation when
    they fit in `CACHE_BYTES`; later evaluations are forward passes only. Off under run.fsdp (one log line): a
    sharded backbone cannot be called piecewise yet.

Collapse alarms (`pretrain.alarms.CollapseAlarms`) read the rows the trainer logs to metrics.jsonl (the objective's metrics and
the evaluator's), never an objective's name. An objective says what to watch through its metrics:
  * `X_ceiling` beside a metric `X` (DINO: `loss_ceiling` and `teacher_entropy_ceiling`, both ln(out_dim), the
    values of a teacher that outputs the uniform distribution): alarm when X comes near its ceiling (outputs going
    uniform) or near zero (every image going to one output); for the loss also when it climbs towards the
    ceiling (least-squares fit over the last `alarm.window` rows) while the effective rank falls;
  * `embed_rank` (the objective's batch embeddings), `feat_rank` and `knn_top1` (the evaluator's, any
    objective): alarm when they fall well below their best.
Each firing is one loud warning with the numbers and the usual causes; `alarm.stop_on_collapse` stops the run at
the next update with a checkpoint (train_summary.json: stopped_early="collapse").
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import heapq
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.curves import curve_png
from pretrain.knn import knn_top1
from pretrain.monitors import effective_rank
from pretrain.pooling import pool_tokens
from shards.atomic import atomic_path
from shards.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest, sha256_file
from shards.ownership import mark_output
from shards.record import image_extension, read_label
from shards.stream import ShardStream
from shards.tar import iter_source_samples, list_shards, manifest_class_names, tar_writer

if TYPE_CHECKING:
    from pretrain.recipe import EvalConfig

log = logging.getLogger("vitssl.evaluate")

SPLIT_DIR = "eval_split"
SPLIT_FORMAT = "vitssl-eval-split/1"
_SALT = "vitssl-online-knn"  # fixed: the same data gives the same split in every run
_SPLIT_SHARD = 1000  # samples per shard of the copied split
CACHE_BYTES = 1 << 30  # per process: the evaluation sets' decoded images (query + bank) are kept up to this size


# ------------------------------------------------------------------------------------------------ features


def feature_rank(feats: torch.Tensor) -> float:
    """Effective rank of the L2-normalised features after removing their mean: how many directions the
    samples spread over (1 = all on one line; a shared offset, which every ViT's CLS token has, is not counted)."""
    z = F.normalize(feats.float(), dim=1)
    return float(effective_rank(z - z.mean(dim=0, keepdim=True)))


# ------------------------------------------------------------------------------------------------ the split


def key_rank(key: str) -> float:
    """A key's place in [0, 1) by a salted hash: the split takes the smallest."""
    digest = hashlib.blake2b(f"{_SALT}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class EvalSplit:
    folder: Path
    source: str
    num_query: int
    num_bank: int
    num_classes: int
    labelled: int  # labelled samples the source holds

    @property
    def query(self) -> Path:
        return self.folder / "query"

    @property
    def bank(self) -> Path:
        return self.folder / "bank"


def _label(files: dict[str, bytes]) -> int | None:
    if "__bad__" in files or image_extension(files) is None:
        return None
    label = read_label(files)
    return label if label is not None and label >= 0 else None


def _source_stamp(source: str, allow_pipe: bool) -> list:
    return [[url, count] for url, count in list_shards(source, allow_pipe=allow_pipe)]


def _write_set(folder: Path, samples: list[tuple[int, str, dict[str, bytes]]], classes: list[str], source: str,
               split: str) -> None:
    folder.mkdir(parents=True)
    infos = []
    for n, first in enumerate(range(0, len(samples), _SPLIT_SHARD)):
        path = folder / f"shard-{n:06d}.tar"
        with tar_writer(path, encoder=False, mtime=946684800) as tar:
            for _, key, files in samples[first : first + _SPLIT_SHARD]:
                tar.write({"__key__": key, **files})
        infos.append(ShardInfo(path.name, min(_SPLIT_SHARD, len(samples) - first), sha256_file(path),
                               path.stat().st_size))
    Manifest(infos, classes=classes, source=f"{source} (online k-NN {split}, by key hash)", split=split).save(folder)


def draw_split(source: str, holdout: int, bank: int, folder: str | Path, *, allow_pipe: bool = False) -> EvalSplit | str:
    """Copy the query and bank samples of `source` into `folder` (query/, bank/, split.json) and describe them;
    a string (why not) when the source has too few labelled samples. Reuses a folder drawn by the same rule from
    the same shards. One read of the source, nothing decoded; memory holds only the chosen samples."""
    folder = Path(folder)
    want = {"format": SPLIT_FORMAT, "source": source, "holdout": holdout, "bank": bank,
            "shards": _source_stamp(source, allow_pipe)}
    meta_path = folder / "split.json"
    if meta_path.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            meta = json.loads(meta_path.read_text())
            if {k: meta.get(k) for k in want} == want:
                return meta["off"] if meta.get("off") else _split_from(folder, meta)
    classes = manifest_class_names(source)
    n = holdout + bank
    heap: list[tuple[float, int, str, dict[str, bytes]]] = []  # (-rank, index, key, files): the n smallest ranks
    labelled, index = 0, 0
    for _url, key, files in iter_source_samples(source, allow_pipe=allow_pipe):
        index += 1
        if _label(files) is None:
            continue
        labelled += 1
        item = (-key_rank(key), index, key, files)
        if len(heap) < n:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    chosen = sorted(heap, key=lambda t: (-t[0], t[1]))
    off = ""
    if labelled < 2:
        off = (f"{source} holds {labelled} labelled samples (.cls) of {index}: the online k-NN needs labels, so it "
               f"is off (set eval.shards to a labelled shard set to score this run)")
    meta: dict[str, Any] = {**want, "off": off}
    if not off:
        # A source smaller than holdout + bank: both shrink in proportion (at least one sample each).
        n_query = holdout if labelled >= n else min(max(1, round(labelled * holdout / n)), labelled - 1)
        query = sorted((i, k, f) for _, i, k, f in chosen[:n_query])
        bank_rows = sorted((i, k, f) for _, i, k, f in chosen[n_query:])
        labels = [_label(f) for _, _, f in query + bank_rows]
        meta.update(num_query=len(query), num_bank=len(bank_rows), labelled=labelled,
                    num_classes=max(len(classes), max(labels) + 1))
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        mark_output(tmp, "split")
        if not off:
            _write_set(tmp / "query", query, classes, source, "query")
            _write_set(tmp / "bank", bank_rows, classes, source, "bank")
        (tmp / "split.json").write_text(json.dumps(meta, indent=2))
    return off or _split_from(folder, meta)


def read_split(folder: str | Path) -> EvalSplit | str:
    """The split another process drew into `folder` (its split.json), or why there is none."""
    meta = json.loads((Path(folder) / "split.json").read_text())
    return meta["off"] if meta.get("off") else _split_from(Path(folder), meta)


def _split_from(folder: Path, meta: dict) -> EvalSplit:
    return EvalSplit(folder, meta["source"], meta["num_query"], meta["num_bank"], meta["num_classes"],
                     meta["labelled"])


# ------------------------------------------------------------------------------------------------ embedding


@contextlib.contextmanager
def preserved_rng():
    """Every RNG stream the trainer's exact resume relies on, as it was before the block."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def pooled(model, images: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, D): the final CLS token ("cls") or the mean of the final patch tokens ("mean"), after the norm —
    `downstream.features`' definitions."""
    return pool_tokens(model.forward_features(images), model.num_prefix_tokens, pooling)


def stream_batches(source: str | Path, transform, *, batch_size: int = 256, accelerator=None, num_workers: int = 0,
                   max_bad_fraction: float = 0.01):
    """This rank's batches of `source` (exact mode, remainder="pad": every rank the same batch count), as
    (images, labels, index, pad) CPU tensors."""
    stream = ShardStream(str(source), batch_size=batch_size, num_workers=num_workers, transform=transform,
                         mode="exact", remainder="pad", shuffle=False,
                         rank=accelerator.process_index if accelerator else 0,
                         world_size=accelerator.num_processes if accelerator else 1, max_bad_fraction=max_bad_fraction)
    for batch in stream.loader():
        yield batch["image"], batch["label"].long(), batch["index"].long(), batch["pad"]


@torch.no_grad()
def embed_batches(model, batches, *, pooling: str = "cls", accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every sample, in canonical order, on every rank: each rank embeds its batches (its
    slice, `stream_batches`), the slices are gathered and the pads dropped (as `downstream.features` does)."""
    device = accelerator.device if accelerator else next(model.parameters()).device
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    feats, labels, index, pad = [], [], [], []
    with autocast:
        for images, lab, idx, pd in batches:
            feats.append(pooled(model, images.to(device), pooling).float())
            labels.append(lab.to(device))
            index.append(idx.to(device))
            pad.append(pd.to(device))
    f, lab, idx, pd = torch.cat(feats), torch.cat(labels), torch.cat(index), torch.cat(pad)
    if accelerator is not None and accelerator.num_processes > 1:
        f, lab, idx, pd = (accelerator.gather(t) for t in (f, lab, idx, pd))
    keep = (~pd.bool()).nonzero().squeeze(1)
    order = keep[torch.argsort(idx[keep])]
    return f[order].cpu(), lab[order].cpu()


# ------------------------------------------------------------------------------------------------ evaluator


class OnlineEvaluator:
    """The trainer's online k-NN: `begin(backbone, fresh)` at the start of a launch, `due(step)` after every
    update, `evaluate(backbone, step)` when due and `end_due()` at the end (on every rank: the embedding is
    collective); the main process gets the numbers, the others an empty dict.

    A run shorter than `eval.every_minutes` (a smoke test) pays nothing: the split is drawn at the first
    evaluation, and the random-init baseline is scored then too, on a copy of the starting weights kept on the CPU
    until that moment."""

    def __init__(self, cfg: EvalConfig, *, train_source: str, out_dir: str | Path, accelerator=None,
                 transform=None, num_workers: int = 0, max_bad_fraction: float = 0.01, allow_pipe: bool = False):
        self.cfg = cfg
        self.source = cfg.shards or train_source
        self.folder = Path(out_dir) / SPLIT_DIR
        self.accelerator = accelerator
        self.transform = transform
        self.num_workers, self.max_bad_fraction, self.allow_pipe = num_workers, max_bad_fraction, allow_pipe
        self.split: EvalSplit | None = None
        self.off_reason = "" if cfg.enabled else "eval.enabled=false"
        self.last_step: int | None = None
        self.count = 0  # evaluations in this launch
        self._last_end = time.monotonic()  # the previous evaluation's end, else the launch's start
        self._last_cost = 0.0  # the previous evaluation's seconds
        self._init_backbone = None  # the starting weights of a fresh run, until their evaluation
        # The decoded, transformed batches of this rank's slices, kept after the first evaluation when they fit in
        # CACHE_BYTES (the transform is deterministic, so every evaluation would decode the same tensors again).
        self._cache: dict[str, list] = {}

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def active(self) -> bool:
        return not self.off_reason

    def _off(self, reason: str) -> None:
        self.off_reason = reason
        self._init_backbone = None
        if self.is_main:
            log.warning(f"online k-NN off: {reason}")

    def begin(self, backbone, fresh: bool) -> None:
        """The start of a launch: say at once when there is nothing to score (off, or a manifest naming no
        classes); in a fresh run keep the starting weights for the random-init baseline."""
        self._last_end = time.monotonic()
        if not self.active:
            if self.is_main:
                log.info(f"online k-NN off: {self.off_reason}")
            return
        p = Path(self.source)
        if p.is_dir() and (p / MANIFEST_NAME).is_file() and not load_manifest(p).classes:
            self._off(f"{self.source} is unlabelled (its manifest names no classes): the online k-NN needs labels "
                      f"(.cls); set eval.shards to a labelled shard set to score this run")
            return
        if fresh:
            self._init_backbone = copy.deepcopy(backbone).to("cpu")

    def due(self, step: int, now: float | None = None) -> bool:
        """This rank's view of whether an evaluation is due after update `step` (the trainer ORs it over ranks)."""
        if not self.active or step == self.last_step:
            return False
        eval_cfg = self.cfg
        if eval_cfg.every_steps and step % eval_cfg.every_steps == 0:
            return True
        if eval_cfg.every_minutes > 0:
            now = time.monotonic() if now is None else now
            # ... and not before the last evaluation's cost is eval.max_fraction of the time since it ended.
            cost_wait = self._last_cost / eval_cfg.max_fraction if eval_cfg.max_fraction > 0 else 0.0
            wait = max(60 * eval_cfg.every_minutes, cost_wait)
            return now - self._last_end >= wait
        return False

    def end_due(self, step: int) -> bool:
        """An evaluation at the end of the schedule or time budget, when this launch has evaluated already (a
        launch too short for its first evaluation gets none at its end either)."""
        return self.active and self.count > 0 and step != self.last_step

    def evaluate(self, backbone, step: int) -> dict[str, float]:
        """Embed query and bank with `backbone` (eval mode, no grad, RNG untouched) and score the k-NN; at the
        first evaluation also draw the split and score the starting weights (`*_init` keys)."""
        started = time.monotonic()
        if self.split is None and not self._prepare():
            return {}
        out: dict[str, float] = {}
        if self._init_backbone is not None:
            device = next(backbone.parameters()).device
            initial, self._init_backbone = self._init_backbone.to(device), None
            out.update({f"{k}_init": v for k, v in self._score(initial).items()})
            del initial
        out.update(self._score(backbone))
        self.last_step, self.count = step, self.count + 1
        self._last_end = time.monotonic()
        self._last_cost = self._last_end - started
        if self.is_main:
            out["eval_seconds"] = self._last_cost
        return out

    def _prepare(self) -> bool:
        """Draw (or reuse) the split on the main process; every rank then reads it."""
        if self.is_main:
            drawn = draw_split(self.source, self.cfg.holdout, self.cfg.bank_samples, self.folder,
                               allow_pipe=self.allow_pipe)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        if not self.is_main:
            drawn = read_split(self.folder)
        if isinstance(drawn, str):
            self._off(drawn)
            return False
        self.split = drawn
        if self.is_main:
            log.info(f"online k-NN: {drawn.num_query} query vs {drawn.num_bank} bank samples of {drawn.source} "
                     f"({drawn.num_classes} classes, drawn by key hash into {drawn.folder}); k={self.cfg.k}, "
                     f"T={self.cfg.temperature:g}, {self.cfg.pooling} pooling")
        return True

    def _score(self, backbone) -> dict[str, float]:
        was_training = backbone.training
        backbone.eval()
        try:
            with preserved_rng():
                query, query_labels = self._embed(backbone, "query")
                bank, bank_labels = self._embed(backbone, "bank")
        finally:
            backbone.train(was_training)
        if not self.is_main:
            return {}
        return {"knn_top1": knn_top1(bank, bank_labels, query, query_labels, k=self.cfg.k,
                                     temperature=self.cfg.temperature),
                "feat_rank": feature_rank(query)}

    def _embed(self, backbone, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.split is not None
        batches = self._cache.get(which)
        if batches is None:
            batches = stream_batches(getattr(self.split, which), self.transform, batch_size=self.cfg.batch_size,
                                     accelerator=self.accelerator, num_workers=self.num_workers,
                                     max_bad_fraction=self.max_bad_fraction)
            samples = self.split.num_query + self.split.num_bank
            world = self.accelerator.num_processes if self.accelerator is not None else 1
            pe = backbone.patch_embed
            per_rank_bytes = -(-samples // world) * pe.proj.in_channels * pe.img_size[0] * pe.img_size[1] * 4
            if per_rank_bytes <= CACHE_BYTES:
                batches = self._cache[which] = list(batches)
        return embed_batches(backbone, batches, pooling=self.cfg.pooling, accelerator=self.accelerator)


# ------------------------------------------------------------------------------------------------ reports


def knn_rows(metrics_path: Path) -> list[tuple[int, float]]:
    """(step, k-NN top-1) of every evaluation logged in metrics.jsonl; the random-init one (logged with the first
    row as `knn_top1_init`) at step 0."""
    if not metrics_path.is_file():
        return []
    out = []
    for ln in metrics_path.read_text().splitlines():
        row = json.loads(ln) if ln.strip() else {}
        for key, step in (("knn_top1_init", 0), ("knn_top1", row.get("step", 0))):
            if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]):
                out.append((int(step), float(row[key])))
    return out


def knn_summary(metrics_path: Path) -> dict[str, Any]:
    """Best and last online k-NN top-1 with their steps, the random-init baseline and the evaluation time, from
    metrics.jsonl; {} when none was measured."""
    points = knn_rows(metrics_path)
    if not points:
        return {}
    later = [p for p in points if p[0] > 0] or points
    best = max(later, key=lambda p: (p[1], -p[0]))
    out: dict[str, Any] = {"best": best[1], "best_step": best[0], "last": later[-1][1], "last_step": later[-1][0]}
    if points[0][0] == 0:
        out["init"] = points[0][1]
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    out["evaluations"] = len(points)
    out["eval_seconds"] = round(sum(r.get("eval_seconds", 0.0) + r.get("eval_seconds_init", 0.0) for r in rows), 3)
    return out


def knn_curve_png(metrics_path: Path, out: Path) -> Path | None:
    """The online k-NN top-1 against the step (dashed: the random-init baseline at step 0)."""
    points = knn_rows(metrics_path)
    if len(points) < 2:
        return None
    baseline = (f"random init {points[0][1]:.3f}", points[0][1]) if points[0][0] == 0 else None
    return curve_png([p[0] for p in points], [p[1] for p in points], out, ylabel="k-NN top-1",
                     title="online k-NN (held-out query vs bank)", baseline=baseline, marker="o")
