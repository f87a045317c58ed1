"""From shard sets and a checkpoint to a probe's report: embed labelled train and test sets, run a protocol, save."""

from __future__ import annotations

import os

from downstream.features import load_labelled_features
from downstream.probe.protocols import PROTOCOLS, resolve_protocol
from downstream.probe.result import ProbeResult
from pretrain.restore import load_backbone_from

__all__ = ["embed_train_test", "probe_checkpoint"]


def embed_train_test(
    checkpoint, train: str | os.PathLike, test: str | os.PathLike, *, pooling: str = "cls",
    cache_dir: str | os.PathLike | None = None, batch_size: int = 256, num_workers: int = 0, accelerator=None,
    precision: str = "no",
) -> tuple:
    """(train Features, test Features, a description of them for a report) of two labelled shard sets embedded
    with `checkpoint` (run folder, checkpoint, exported backbone, or a loaded backbone; cached in `cache_dir`)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        backbone, where = load_backbone_from(checkpoint), str(checkpoint)
    else:
        backbone, where = checkpoint, ""
    embed = dict(pooling=pooling, cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers,
                 accelerator=accelerator, precision=precision)
    tr = load_labelled_features(backbone, train, **embed)
    te = load_labelled_features(backbone, test, **embed)
    info = {"checkpoint": where, "fingerprint": tr.fingerprint, "pooling": pooling, "dim": tr.dim,
            "train": str(train), "test": str(test), "cached": tr.cached and te.cached}
    return tr, te, info


def probe_checkpoint(
    checkpoint,
    train: str | os.PathLike,
    test: str | os.PathLike,
    *,
    protocol: str = "dino",
    head: str = "linear",
    pooling: str = "cls",
    cache_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator=None,
    precision: str = "no",
    **protocol_kwargs,
) -> ProbeResult:
    """One call for a CLI: embed labelled `train` and `test` shard sets with `checkpoint` (a run folder,
    checkpoint or exported backbone, or a loaded backbone; features cached in `cache_dir`), run `protocol`
    ("mae", "dino", "knn", "cosine" or "centre"; or `head` "cosine" / "centre" in place of the linear one, with
    `protocol_kwargs` passed on) and, given `out_dir`, write `<protocol>.json` + `<protocol>_confusion.png`
    there (main process only).

    Raises FeatureError (shards without labels, or not fitting the backbone), FileNotFoundError (no
    checkpoint), ValueError (bad protocol, head or settings).
    """
    name = resolve_protocol(protocol, head)
    tr, te, info = embed_train_test(checkpoint, train, test, pooling=pooling, cache_dir=cache_dir,
                                    batch_size=batch_size, num_workers=num_workers, accelerator=accelerator,
                                    precision=precision)
    classes = protocol_kwargs.pop("classes", None) or tr.classes or te.classes or None
    result = PROTOCOLS[name](tr.feats, tr.labels, te.feats, te.labels, classes=classes, **protocol_kwargs)
    result.settings["features"] = info
    if out_dir is not None and (accelerator is None or accelerator.is_main_process):
        result.save(out_dir)
    return result
