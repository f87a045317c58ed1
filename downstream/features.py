"""Embed a shard set with a trained backbone: batched, no-grad, exactly once per sample across ranks, cached.

Pooling:
  cls    the final CLS token (after the backbone's norm)
  mean   mean of the final patch tokens (after the norm)
  lastN  concatenation of the CLS tokens of the last N blocks, each normed (DINO's linear-probe input), e.g. last4

Every rank reads its own contiguous slice of the shard set (`ShardStream` exact mode, `remainder="pad"`), the
pads are dropped after an all-gather and rows are sorted by canonical sample index, so each sample is embedded
once and every rank returns the same, ordered result.

The cache (`cache_dir`) holds one safetensors file (features, labels, indices) and a JSON sidecar (keys,
captions, classes) per key; the key digests the backbone's fingerprint (architecture + weights), its input
normalisation, the pooling, the precision and the shard set (manifest checksums, or file sizes and times), so a
second probe on the same features does not re-embed and a cache is never reused for another checkpoint or other
data. A damaged or half-written cache is recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather, gather_object
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.backbone import data_stats
from pretrain.backbone import fingerprint as backbone_fingerprint
from pretrain.pooling import POOLINGS, pool_tokens
from pretrain.restore import load_backbone_from
from pretrain.transforms import eval_transform
from shards.atomic import atomic_path, write_text_atomic
from shards.manifest import MANIFEST_NAME, load_manifest
from shards.stream import ShardStream
from shards.tar import list_shards, manifest_class_names

CACHE_FORMAT = "vitssl-features/1"
_MODE_CHANNELS = {"L": 1, "RGB": 3}
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FeatureError(ValueError):
    """The backbone and the shards do not fit together, or the shards lack what the caller needs."""


@dataclass
class Features:
    """Embeddings of one shard set, rows in canonical sample order."""

    feats: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N,) int64, -1 where unlabelled
    indices: torch.Tensor  # (N,) int64 canonical sample index (gaps where the stream skipped a bad sample)
    keys: list[str]
    captions: list[str] = field(default_factory=list)  # one per row, "" where a sample has none
    classes: list[str] = field(default_factory=list)  # class names from the manifest, index -> name
    pooling: str = ""
    fingerprint: str = ""  # the backbone's (pretrain.backbone.fingerprint)
    source: str = ""
    num_skipped: int = 0  # samples of the set that could not be read (see the stream's warnings)
    rank_samples: list[int] = field(default_factory=list)  # real (non-pad) samples each rank embedded
    cached: bool = False  # True when read from the cache
    cache_path: str = ""

    def __len__(self) -> int:
        return len(self.feats)

    @property
    def dim(self) -> int:
        return int(self.feats.shape[1])

    @property
    def num_classes(self) -> int:
        """Classes named by the manifest, else one more than the largest label."""
        return len(self.classes) or int(self.labels.max()) + 1

    def to_dict(self) -> dict:
        """What the features are, without the tensors (for a report)."""
        return {
            "source": self.source, "pooling": self.pooling, "fingerprint": self.fingerprint,
            "count": len(self), "dim": self.dim, "num_classes": self.num_classes, "classes": list(self.classes),
            "num_skipped": self.num_skipped, "cached": self.cached, "cache_path": self.cache_path,
        }


def parse_pooling(pooling: str) -> tuple[str, int]:
    """("cls", 1), ("mean", 1) or ("last", N)."""
    if pooling in POOLINGS:
        return pooling, 1
    m = re.fullmatch(r"last([1-9]\d*)", pooling)
    if m:
        return "last", int(m.group(1))
    raise FeatureError(f"pooling={pooling!r}: use cls, mean or lastN (e.g. last4)")


def model_geometry(model) -> tuple[int, int]:
    """(image size, input channels) of a timm ViT."""
    pe = model.patch_embed
    return int(pe.img_size[0]), int(pe.proj.in_channels)


@torch.no_grad()
def embed_batch(model, images: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, D) features of a batch of normalised images ((B, N*D) for lastN)."""
    kind, n = parse_pooling(pooling)
    if kind == "last":
        if n > len(model.blocks):
            raise FeatureError(f"pooling={pooling}: the backbone has only {len(model.blocks)} blocks")
        inter = model.forward_intermediates(
            images, indices=n, norm=True, return_prefix_tokens=True, intermediates_only=True
        )
        return torch.cat([prefix[:, 0] for _, prefix in inter], dim=-1)
    return pool_tokens(model.forward_features(images), model.num_prefix_tokens, kind)  # after the final norm


# ----------------------------------------------------------------------------------------- checks, cache key


def shard_set_digest(source: str) -> str:
    """A digest of the data: the manifest's shard checksums when there is one, else each tar's name, count,
    size and modification time (URLs: name and count)."""
    p = Path(source)
    h = hashlib.sha256()
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        for s in load_manifest(p).shards:
            h.update(f"{s.name}:{s.count}:{s.sha256};".encode())
        return h.hexdigest()[:16]
    for url, count in list_shards(source):
        stamp = ""
        if os.path.isfile(url):
            st = os.stat(url)
            stamp = f"{os.path.abspath(url)}:{st.st_size}:{st.st_mtime_ns}"
        h.update(f"{url}:{count}:{stamp};".encode())
    return h.hexdigest()[:16]


def check_compatible(model, source: str, *, require_labels: bool = False) -> None:
    """Refuse, before embedding anything, shards the backbone cannot take or that lack labels a probe needs.

    Judged from the manifest (shards without one are converted to the backbone's channel count, as training
    does): stored channels must equal the backbone's; images may be upscaled at most 4x; labelled shards
    name their classes.
    """
    p = Path(source)
    if not (p.is_dir() and (p / MANIFEST_NAME).is_file()):
        return
    m = load_manifest(p)
    img_size, in_chans = model_geometry(model)
    stored = _MODE_CHANNELS.get(m.image_mode)
    if stored is not None and stored != in_chans:
        raise FeatureError(
            f"the backbone takes {in_chans}-channel images but {source} holds {m.image_mode} images "
            f"({stored} channel{'s' if stored > 1 else ''}): use a checkpoint trained on this kind of data"
        )
    if m.image_size and max(m.image_size) * 4 < img_size:
        raise FeatureError(
            f"{source} holds {m.image_size[0]}x{m.image_size[1]} images but the backbone expects {img_size}x{img_size}: "
            "upscaling more than 4x is refused; use a backbone trained at this resolution"
        )
    if require_labels and not m.classes:
        raise FeatureError(f"{source} has no labels (its manifest names no classes); a probe needs labelled shards")


def cache_key(fingerprint: str, mean, std, pooling: str, precision: str, data_digest: str) -> str:
    """Everything the feature values depend on, digested."""
    what = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "mean": list(mean), "std": list(std),
            "pooling": pooling, "precision": precision, "data": data_digest}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _cache_file(cache_dir: Path, fingerprint: str, pooling: str, key: str) -> Path:
    return cache_dir / f"feats_{fingerprint}_{pooling}_{key}.safetensors"


def _read_cache(path: Path, key: str) -> Features | None:
    """The cached features, or None when absent, damaged, half-written or for another key."""
    sidecar = path.with_suffix(".json")
    if not path.is_file() and not sidecar.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in ("feats", "labels", "indices")}
        side = json.loads(sidecar.read_text())
        feats, labels, indices = tensors["feats"], tensors["labels"], tensors["indices"]
        n = len(feats)
        ok = (
            meta.get("cache_key") == key == side["cache_key"]
            and meta.get("write_id") == side["write_id"]
            and feats.ndim == 2 and feats.dtype == torch.float32
            and labels.shape == indices.shape == (n,)
            and len(side["keys"]) == len(side["captions"]) == n
        )
        if not ok:
            raise ValueError("its two files do not belong together or do not match the key")
        return Features(
            feats, labels, indices, list(side["keys"]), list(side["captions"]), list(side["classes"]),
            pooling=side["pooling"], fingerprint=side["fingerprint"], source=side["source"],
            num_skipped=int(side["num_skipped"]), rank_samples=[], cached=True, cache_path=str(path),
        )
    except Exception as e:  # a damaged cache is recomputed, never trusted
        warnings.warn(f"feature cache {path} is unusable ({type(e).__name__}: {e}); re-embedding", stacklevel=3)
        return None


def _write_cache(path: Path, key: str, f: Features) -> None:
    # Both files carry the same write_id: a crash between the two renames leaves a pair that does not match.
    write_id = uuid.uuid4().hex
    with atomic_path(path) as tmp:
        save_file(
            {"feats": f.feats.contiguous(), "labels": f.labels.contiguous(), "indices": f.indices.contiguous()},
            str(tmp),
            metadata={"cache_key": key, "write_id": write_id, "format": CACHE_FORMAT},
        )
    side = {"cache_key": key, "write_id": write_id, "keys": f.keys, "captions": f.captions, "classes": f.classes,
            "pooling": f.pooling, "fingerprint": f.fingerprint, "source": f.source, "num_skipped": f.num_skipped}
    write_text_atomic(path.with_suffix(".json"), json.dumps(side))


# ------------------------------------------------------------------------------------------------ extraction


def _all_ranks_agree(flag: bool, accelerator) -> bool:
    """True only when `flag` is true on every rank (e.g. every rank found the cache)."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    return all(gather_object([flag]))


def extract_features(
    model,
    source: str | os.PathLike,
    *,
    pooling: str = "cls",
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator=None,
    precision: str = "no",
    cache_dir: str | os.PathLike | None = None,
    fingerprint: str | None = None,
    require_labels: bool = False,
    max_bad_fraction: float = 0.01,
) -> Features:
    """Embed every sample of `source` once (all ranks together); every rank returns the full, ordered result.

    `model`: a timm ViT. `accelerator`: an `accelerate.Accelerator` (ranks, device, its mixed precision);
    without one, one process on the model's device in `precision` ("no", "bf16", "fp16"). `cache_dir`: the
    cache folder (see the module docstring). `fingerprint`: the backbone's `pretrain.backbone.fingerprint`
    when the caller has it already (saves hashing the weights again; it must be this model's). `require_labels`:
    raise FeatureError for a sample without a label.
    """
    source = os.fspath(source)
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
        precision = accelerator.mixed_precision
    _check_request(model, pooling, precision)
    check_compatible(model, source, require_labels=require_labels)
    img_size, in_chans = model_geometry(model)
    mean, std = data_stats(model)
    fp = fingerprint or backbone_fingerprint(model)

    cache = key = None
    if cache_dir is not None:
        key = cache_key(fp, mean, std, pooling, precision, shard_set_digest(source))
        cache = _cache_file(Path(cache_dir), fp, pooling, key)
        hit = _read_cache(cache, key)
        if _all_ranks_agree(hit is not None, accelerator):
            if require_labels:
                _check_labels(hit, source)
            return hit

    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    device = accelerator.device if accelerator else next(model.parameters()).device
    stream = ShardStream(source, batch_size=batch_size, num_workers=num_workers,
                         transform=eval_transform(img_size, in_chans, mean, std), mode="exact",
                         remainder="pad",  # every rank the same batch count; pads are dropped below
                         shuffle=False, rank=rank, world_size=world, max_bad_fraction=max_bad_fraction)
    rows = _embed_rows(model, stream, device, _autocast_for(accelerator, precision, device), pooling)
    if world > 1:
        rows = _gathered(rows, device)
    f, lab, idx, pd, keys, captions = rows
    per_rank = len(f) // world
    rank_samples = [int((pd[r * per_rank : (r + 1) * per_rank] == 0).sum()) for r in range(world)]
    order = _sample_order(idx, pd)
    result = Features(
        feats=f[order].contiguous(),
        labels=lab[order].contiguous(),
        indices=idx[order].contiguous(),
        keys=[keys[i] for i in order.tolist()],
        captions=[captions[i] for i in order.tolist()],
        classes=manifest_class_names(source),
        pooling=pooling,
        fingerprint=fp,
        source=source,
        num_skipped=stream.total - len(order),
        rank_samples=rank_samples,
        cache_path=str(cache) if cache is not None else "",
    )
    if require_labels:
        _check_labels(result, source)
    if cache is not None and (accelerator is None or accelerator.is_main_process):
        _write_cache(cache, key, result)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the cache is complete before any rank goes on (e.g. to read it)
    return result


def _check_request(model, pooling: str, precision: str) -> None:
    kind, depth = parse_pooling(pooling)
    if precision not in ("no", *_AUTOCAST_DTYPES):
        raise FeatureError(f"precision={precision!r}: use no, bf16 or fp16")
    if kind == "last" and depth > len(model.blocks):
        raise FeatureError(f"pooling={pooling}: the backbone has only {len(model.blocks)} blocks")


def _autocast_for(accelerator, precision: str, device: torch.device):
    """The accelerator's autocast, else torch's for `precision` ("bf16", "fp16"), else none."""
    if accelerator is not None:
        return accelerator.autocast()
    if precision in _AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


# One rank's rows, in the stream's order: features, labels, sample indices, pad flags, keys, captions.
_Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[str]]


def _embed_rows(model, stream: ShardStream, device: torch.device, autocast, pooling: str) -> _Rows:
    """Every batch of `stream` through `model` in eval mode (its train/eval mode restored after)."""
    was_training = model.training
    model = model.to(device).eval()
    feats, labels, index, pad, keys, captions = [], [], [], [], [], []
    try:
        with torch.no_grad(), autocast:
            for batch in stream.loader():
                feats.append(embed_batch(model, batch["image"].to(device), pooling).float().cpu())
                labels.append(batch["label"].long())
                index.append(batch["index"].long())
                pad.append(batch["pad"].long())
                keys.extend(batch["key"])
                captions.extend(batch["caption"])
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels), torch.cat(index), torch.cat(pad), keys, captions


def _gathered(rows: _Rows, device: torch.device) -> _Rows:
    """Every rank's rows, rank after rank. The stream pads every rank to the same row count (remainder="pad"),
    so the tensor gather lines up with the object gather."""
    f, lab, idx, pd, keys, captions = rows
    f, lab, idx, pd = (gather(t.to(device)).cpu() for t in (f, lab, idx, pd))
    return f, lab, idx, pd, gather_object(keys), gather_object(captions)


def _sample_order(idx: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Positions of the real (not pad) rows, sorted by sample index; each sample must appear once."""
    keep = (pad == 0).nonzero().squeeze(1)
    order = keep[torch.argsort(idx[keep])]
    sorted_idx = idx[order]
    if len(sorted_idx) > 1 and bool((sorted_idx[1:] == sorted_idx[:-1]).any()):
        raise FeatureError("a sample was embedded twice: the stream's exact mode is broken")
    return order


def _check_labels(f: Features, source: str) -> None:
    missing = int((f.labels < 0).sum())
    if missing:
        first = f.keys[int((f.labels < 0).nonzero()[0])]
        raise FeatureError(
            f"{source}: {missing} of {len(f)} samples have no label (.cls), the first {first!r}; "
            "a probe needs labelled shards"
        )


def load_labelled_features(
    backbone,
    source: str | os.PathLike,
    *,
    pooling: str = "cls",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator=None,
    precision: str = "no",
) -> Features:
    """Features + labels of a labelled shard set, from a checkpoint path (run folder, checkpoint or exported
    backbone; see `pretrain.restore`) or an already loaded backbone. Raises FeatureError for shards without
    labels or that do not fit the backbone, FileNotFoundError for a missing checkpoint."""
    if isinstance(backbone, (str, os.PathLike)):
        backbone = load_backbone_from(backbone)
    return extract_features(
        backbone, source, pooling=pooling, batch_size=batch_size, num_workers=num_workers,
        accelerator=accelerator, precision=precision, cache_dir=cache_dir, require_labels=True,
    )
