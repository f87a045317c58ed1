"""Shards + checkpoint -> retrieval index, and queries against it: the glue behind `python -m downstream index|query`.

`downstream.retrieval` knows vectors and metadata rows; this module knows where they come from: it embeds a
shard set with a backbone (`downstream.features`, cached), reads each sample's key, shard, label, caption
and a thumbnail straight from the tars, and checks that every later query or addition uses the same backbone
(fingerprint) and pooling as the index was built with.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from downstream.contact_sheet import contact_sheet_png, thumbnail_png
from downstream.features import FeatureError, embed_batch, extract_features, model_geometry
from downstream.retrieval import RetrievalError, RetrievalIndex
from pretrain.backbone import data_stats, fingerprint
from pretrain.restore import load_backbone_from
from pretrain.transforms import eval_transform
from shards.manifest import MANIFEST_NAME, load_manifest
from shards.stream import IMAGE_EXTS, iter_tar_samples, list_shards, open_shard

THUMBNAIL_SIZE = 64


@dataclass
class QueryResult:
    """Top-k neighbours of each query, best first."""

    queries: list[str]  # what was asked: an image path or an indexed key
    hits: list[list[dict]]  # per query: {"rank", "id", "key", "score", "label", "label_name", "caption", "shard"}
    sheet: str | None = None  # contact-sheet PNG, when drawn
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A plain-text table: one block per query."""
        lines = []
        for q, hits in zip(self.queries, self.hits):
            lines.append(f"query {q}")
            lines.append(f"  {'rank':>4}  {'score':>6}  {'key':<24} {'label':<14} caption")
            for h in hits:
                label = h.get("label_name") or ("" if h.get("label") is None else str(h["label"]))
                lines.append(f"  {h['rank']:>4}  {h['score']:6.3f}  {h['key']:<24} {label:<14} {h.get('caption') or ''}")
        return "\n".join(lines)


def _class_names(source: str) -> list[str]:
    """Class names from the manifest of the source's folder (or of its first shard's folder)."""
    p = Path(source)
    if not p.is_dir():
        shards = list_shards(source)
        p = Path(shards[0][0]).parent if shards else p
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        return list(load_manifest(p).classes)
    return []


def _thumbnail(files: dict[str, bytes]) -> bytes | None:
    data = files.get("png") or files.get("jpg") or next((files[e] for e in IMAGE_EXTS if e in files), None)
    if data is None:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        if max(image.size) <= THUMBNAIL_SIZE and data[:8] == b"\x89PNG\r\n\x1a\n":
            return data  # small PNGs (28x28 Fashion-MNIST) are their own thumbnail
        image.load()
        return thumbnail_png(image, THUMBNAIL_SIZE)
    except Exception:  # the stream counted and skipped this sample already; no thumbnail then
        return None


def metadata_rows(source: str, keys: Sequence[str], *, thumbnails: bool = True) -> list[dict]:
    """One row per key (in the order given): shard, label, label name, caption and thumbnail, read from the tars."""
    classes = _class_names(source)
    wanted = set(keys)
    found: dict[str, dict] = {}
    for url, _count in list_shards(source):
        try:
            with open_shard(url) as stream:
                for key, files in iter_tar_samples(stream):
                    if key not in wanted:
                        continue
                    label = None
                    if "cls" in files:
                        try:
                            label = int(files["cls"].decode("ascii").strip())
                        except ValueError:
                            label = None
                    caption = files["txt"].decode("utf-8", "replace").strip() if "txt" in files else None
                    found[key] = {
                        "key": key,
                        "shard": os.path.basename(url),
                        "label": label,
                        "label_name": classes[label] if label is not None and 0 <= label < len(classes) else None,
                        "caption": caption,
                        "thumbnail": _thumbnail(files) if thumbnails else None,
                    }
        except Exception:  # a damaged tail: the stream already warned and counted; keep what was read
            continue
    missing = [k for k in keys if k not in found]
    if missing:
        raise RetrievalError(f"{len(missing)} embedded samples not found again in {source} (first: {missing[0]!r})")
    return [found[k] for k in keys]


class Embedder:
    """What turns images (and, for CLIP, texts) into the index's vectors.

    `space="backbone"`: the backbone's pooled features. `space="clip"`: a CLIP run's joint image-text space
    (pooled features through its image head), the only space where a text query means something.
    """

    def __init__(self, checkpoint: str | os.PathLike, pooling: str = "cls", space: str = "backbone"):
        if space not in ("backbone", "clip"):
            raise ValueError(f"space={space!r}: use backbone or clip")
        self.space, self.clip = space, None
        if space == "clip":
            from downstream.zeroshot import load_clip

            self.clip = load_clip(checkpoint)
            self.model, self.pooling = self.clip.backbone.eval(), self.clip.pooling
            head = hashlib.sha256()
            for name, t in sorted(self.clip.image_head.state_dict().items()):
                head.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
            self.fingerprint = f"{fingerprint(self.model)}-clip{head.hexdigest()[:8]}"
        else:
            self.model, self.pooling = load_backbone_from(checkpoint), pooling
            self.fingerprint = fingerprint(self.model)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.clip.embed_images(pooled) if self.clip is not None else pooled

    def shards(self, source: str, cache_dir=None, batch_size: int = 256, num_workers: int = 0):
        feats = extract_features(self.model, source, pooling=self.pooling, batch_size=batch_size,
                                 num_workers=num_workers, fingerprint=fingerprint(self.model), cache_dir=cache_dir)
        return self._project(feats.feats), feats

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self._project(torch.from_numpy(embed_images(self.model, images, self.pooling)))

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        if self.clip is None:
            raise RetrievalError("a text query needs an index built in a CLIP run's joint space "
                                 "(`index build CLIP_RUN SHARDS --space clip`)")
        return self.clip.embed_texts(list(texts))


def build_index(
    checkpoint: str | os.PathLike,
    source: str,
    out: str | os.PathLike,
    *,
    pooling: str = "cls",
    factory: str | None = None,
    exact_below: int = 100_000,
    batch_size: int = 256,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    thumbnails: bool = True,
    space: str = "backbone",
) -> RetrievalIndex:
    """Embed every sample of `source` with the backbone at `checkpoint` and save an index folder at `out`.
    `space="clip"` indexes a CLIP run's joint image-text embeddings, so text queries work too."""
    embedder = Embedder(checkpoint, pooling, space)
    vectors, feats = embedder.shards(source, cache_dir, batch_size, num_workers)
    rows = metadata_rows(source, feats.keys, thumbnails=thumbnails)
    img_size, in_chans = model_geometry(embedder.model)
    info = {"fingerprint": embedder.fingerprint, "pooling": embedder.pooling, "space": space,
            "checkpoint": str(checkpoint), "sources": [str(source)], "img_size": img_size, "in_chans": in_chans}
    index = RetrievalIndex.build(vectors.numpy(), rows, info=info, factory=factory, exact_below=exact_below)
    index.save(out)
    return index


def _open_for(index_dir: str | os.PathLike, checkpoint: str | os.PathLike | None):
    """The index and the backbone that made it (the index's own checkpoint unless another one is given,
    which must then have the same fingerprint)."""
    index = RetrievalIndex.load(index_dir)
    path = checkpoint or index.info.get("checkpoint")
    if not path:
        raise RetrievalError(f"{index_dir} records no checkpoint; pass --checkpoint")
    embedder = Embedder(path, index.info["pooling"], index.info.get("space", "backbone"))
    fp = embedder.fingerprint
    if fp != index.info.get("fingerprint"):
        raise RetrievalError(
            f"checkpoint {path} (fingerprint {fp}) is not the one the index at {index_dir} was built with "
            f"(fingerprint {index.info.get('fingerprint')}, {index.info.get('checkpoint')}): its embeddings would "
            "not be comparable; rebuild the index with this checkpoint or query with the original one"
        )
    return index, embedder


def add_to_index(
    index_dir: str | os.PathLike,
    source: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    thumbnails: bool = True,
) -> RetrievalIndex:
    """Embed `source` with the index's backbone and append it; the folder is rewritten atomically."""
    index, embedder = _open_for(index_dir, checkpoint)
    vectors, feats = embedder.shards(source, cache_dir, batch_size, num_workers)
    index.add(vectors.numpy(), metadata_rows(source, feats.keys, thumbnails=thumbnails))
    index.info["sources"] = [*index.info.get("sources", []), str(source)]
    index.save(index_dir)
    return index


def evaluate_index(
    index_dir: str | os.PathLike,
    queries: str,
    *,
    ks: Sequence[int] = (1, 5, 10),
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Label retrieval quality of a labelled query shard set against the index (same label = relevant):
    recall@k for each k and mAP@max(k) normalised by min(k, relevant items in the index)."""
    from downstream.retrieval import mean_average_precision, recall_at_k

    index, embedder = _open_for(index_dir, checkpoint)
    vectors, feats = embedder.shards(queries, cache_dir, batch_size)
    if bool((feats.labels < 0).any()):
        raise FeatureError(f"{queries} has samples without labels (.cls): evaluation needs labelled queries")
    k = max(ks)
    _, ids = index.search(vectors.numpy(), k)
    labels = index.labels()
    retrieved = np.where(ids >= 0, labels[np.clip(ids, 0, None)], -1)
    q = feats.labels.numpy()
    per_label = np.bincount(labels[labels >= 0], minlength=int(q.max()) + 1)
    num_relevant = per_label[q] if len(per_label) > q.max() else None
    return {
        "queries": len(q),
        "indexed": len(index),
        "recall": {f"@{kk}": v for kk, v in recall_at_k(q, retrieved, ks).items()},
        f"map@{k}": mean_average_precision(q, retrieved, k=k, num_relevant=num_relevant),
        "factory": index.info.get("factory"),
        "pooling": index.info.get("pooling"),
    }


def index_summary(index_dir: str | os.PathLike) -> dict:
    index = RetrievalIndex.load(index_dir)
    labels = index.labels()
    return {**{k: v for k, v in index.info.items() if k != "sha256"}, "labelled": int((labels >= 0).sum())}


def _load_images(paths: Sequence[str | os.PathLike]) -> list[Image.Image]:
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im.copy())
        except FileNotFoundError:
            raise FileNotFoundError(f"query image not found: {p}") from None
        except Exception as e:
            raise FeatureError(f"query image {p} is not a readable image: {e}") from None
    return images


@torch.no_grad()
def embed_images(model, images: Sequence[Image.Image], pooling: str, batch_size: int = 256) -> np.ndarray:
    """Embed PIL images the way the index's samples were embedded (same transform, stats and pooling)."""
    img_size, in_chans = model_geometry(model)
    transform = eval_transform(img_size, in_chans, *data_stats(model))
    model = model.eval()
    out = []
    for lo in range(0, len(images), batch_size):
        x = torch.stack([transform(im) for im in images[lo : lo + batch_size]])
        out.append(embed_batch(model, x, pooling).float())
    return torch.cat(out).numpy()


def query_index(
    index_dir: str | os.PathLike,
    *,
    images: Sequence[str | os.PathLike] = (),
    keys: Sequence[str] = (),
    texts: Sequence[str] = (),
    k: int = 10,
    checkpoint: str | os.PathLike | None = None,
    sheet: str | os.PathLike | None = None,
) -> QueryResult:
    """Top-k neighbours of image files, indexed keys (a key never finds itself) and/or texts (an index in a
    CLIP run's joint space); optional contact sheet."""
    if not images and not keys and not texts:
        raise ValueError("nothing to query: give image files, keys of indexed samples or texts")
    if images or texts:
        index, embedder = _open_for(index_dir, checkpoint)
    else:
        index = RetrievalIndex.load(index_dir)
    queries: list[str] = []
    score_rows, id_rows, query_pictures = [], [], []
    if images:
        pictures = _load_images(images)
        s, i = index.search(embedder.images(pictures).numpy(), k)
        score_rows.append(s)
        id_rows.append(i)
        queries += [str(p) for p in images]
        query_pictures += pictures
    if keys:
        try:
            s, i = index.search_by_keys(list(keys), k)
        except KeyError as e:
            raise RetrievalError(f"{e.args[0]} in {index_dir}") from None
        score_rows.append(s)
        id_rows.append(i)
        queries += [str(key) for key in keys]
        query_pictures += [r["thumbnail"] for r in index.rows_for([index.lookup_key(key) for key in keys])]
    if texts:
        s, i = index.search(embedder.texts(texts).numpy(), k)
        score_rows.append(s)
        id_rows.append(i)
        queries += [str(t) for t in texts]
        query_pictures += [None] * len(texts)
    scores, ids = np.concatenate(score_rows), np.concatenate(id_rows)
    rows = index.rows_for(ids)
    hits, drawn = [], []
    for q_scores, q_ids, q_rows in zip(scores, ids, rows):
        found = [(r, s, i, row) for r, (s, i, row) in enumerate(zip(q_scores, q_ids, q_rows)) if row is not None]
        hits.append([
            {"rank": r + 1, "id": int(i), "score": float(s),
             **{f: row[f] for f in ("key", "label", "label_name", "caption", "shard")}}
            for r, s, i, row in found
        ])  # fmt: skip
        drawn.append([{"score": float(s), "label_name": row["label_name"], "caption": row["caption"],
                       "label": row["label"], "thumbnail": row["thumbnail"]} for _, s, _, row in found])
    sheet_path = None
    if sheet is not None:
        kinds = ["image"] * len(images) + ["key"] * len(keys) + ["text"] * len(texts)
        titles = [Path(q).name if kind == "image" else f"{kind}: {q}" for kind, q in zip(kinds, queries)]
        sheet_path = str(contact_sheet_png(query_pictures, drawn, sheet, titles))
    return QueryResult(queries, hits, sheet_path, {k: index.info.get(k) for k in ("fingerprint", "pooling", "count")})


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    from shards.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
    return Path(path)
