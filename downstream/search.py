"""Search: shards + checkpoint -> retrieval index, and queries against it (`python -m downstream index|query`).

`downstream.retrieval` knows vectors and metadata rows; this module knows where they come from: it embeds a
shard set with a backbone (`downstream.features`, cached), reads each sample's key, shard, label, caption,
source name, .json and a thumbnail straight from the tars, and checks that every later query or addition uses
the same backbone (fingerprint) and pooling as the index was built with.

Queries come as image files, folders of images (recursive), `@list.txt` files of image paths, shard sets,
indexed keys or texts, and are answered in batches, so thousands of them stream out as JSON lines.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from downstream.contact_sheet import contact_sheet_png, thumbnail_png
from downstream.features import FeatureError, embed_batch, extract_features, model_geometry
from downstream.retrieval import RetrievalError, RetrievalIndex, evaluate_relevance, parse_relevant, row_field
from pretrain.backbone import data_stats, fingerprint
from pretrain.restore import load_backbone_from
from pretrain.transforms import eval_transform
from shards.atomic import write_text_atomic
from shards.bounds import ImageBoundsError, check_image_size
from shards.manifest import MANIFEST_NAME
from shards.ownership import claim_output, refuse_input_overlap
from shards.record import image_extension, read_label
from shards.sources import image_files, image_suffixes, sample_source
from shards.tar import iter_tar_samples, list_shards, manifest_class_names, open_shard

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 64
SHEET_ROWS = 20  # a contact sheet draws the first this many queries: a row per query, thousands would not fit
HIT_FIELDS = ("key", "label", "label_name", "caption", "shard", "source")


def query_block(record: dict) -> str:
    """One query's plain-text table: a header line, then a line per hit (rank, score, key, label, source, caption)."""
    head = f"query {record['query']}"
    if record.get("source") and record["source"] != record["query"]:
        head += f"  (source {record['source']})"
    lines = [head, f"  {'rank':>4}  {'score':>6}  {'key':<24} {'label':<14} {'source':<24} caption"]
    for h in record["hits"]:
        label = h.get("label_name") or ("" if h.get("label") is None else str(h["label"]))
        lines.append(f"  {h['rank']:>4}  {h['score']:6.3f}  {h['key']:<24} {label:<14} {h.get('source') or '':<24} "
                     f"{h.get('caption') or ''}")
    return "\n".join(lines)


@dataclass
class QueryResult:
    """Top-k neighbours of each query, best first."""

    queries: list[str]  # what was asked: an image path, a shard sample's key, an indexed key or a text
    hits: list[list[dict]]  # per query: {"rank", "id", "score", "key", "label", "label_name", "caption", "shard",
    #                         "source"}
    sheet: str | None = None  # contact-sheet PNG, when drawn
    info: dict = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)  # per query: "image", "shard", "key" or "text"
    sources: list[str | None] = field(default_factory=list)  # per query: its source name, when it has one
    skipped: list[dict] = field(default_factory=list)  # {"input", "reason"} per input that could not be queried
    count: int = 0  # queries answered (also when their hits were not kept)

    def to_dict(self) -> dict:
        return asdict(self)

    def records(self) -> list[dict]:
        return [{"query": q, "kind": kind, "source": src, "hits": hits}
                for q, kind, src, hits in zip(self.queries, self.kinds, self.sources, self.hits)]

    def table(self) -> str:
        """A plain-text table: one block per query."""
        return "\n".join(query_block(r) for r in self.records())


def _thumbnail(files: dict[str, bytes]) -> bytes | None:
    ext = image_extension(files)
    if ext is None:
        return None
    data = files[ext]
    try:
        image = Image.open(io.BytesIO(data))
        if max(image.size) <= THUMBNAIL_SIZE and data[:8] == b"\x89PNG\r\n\x1a\n":
            return data  # small PNGs (28x28 Fashion-MNIST) are their own thumbnail
        image.load()
        return thumbnail_png(image, THUMBNAIL_SIZE)
    except Exception:  # the stream counted and skipped this sample already; no thumbnail then
        return None


def _sample_meta(files: dict[str, bytes]) -> dict | None:
    """The sample's .json as a dict; None when it has none or it is not a JSON object."""
    if "json" not in files:
        return None
    try:
        meta = json.loads(files["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def metadata_rows(source: str, keys: Sequence[str], *, thumbnails: bool = True) -> list[dict]:
    """One row per key (in the order given): shard, label, label name, caption, source name, the sample's .json
    (`meta`) and thumbnail, read from the tars."""
    classes = manifest_class_names(source)
    wanted = set(keys)
    found: dict[str, dict] = {}
    for url, _count in list_shards(source):
        try:
            with open_shard(url) as stream:
                for key, files in iter_tar_samples(stream):
                    if key not in wanted:
                        continue
                    label = read_label(files)
                    caption = files["txt"].decode("utf-8", "replace").strip() if "txt" in files else None
                    meta = _sample_meta(files)
                    found[key] = {
                        "key": key,
                        "shard": os.path.basename(url),
                        "label": label,
                        "label_name": classes[label] if label is not None and 0 <= label < len(classes) else None,
                        "caption": caption,
                        "source": sample_source(meta),
                        "meta": meta,
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
    overwrite: bool = False,
) -> RetrievalIndex:
    """Embed every sample of `source` with the backbone at `checkpoint` and save an index folder at `out`.
    `space="clip"` indexes a CLIP run's joint image-text embeddings, so text queries work too. An existing `out`
    is replaced only when it is an earlier index and `overwrite` is given; it may not overlap `source`."""
    if Path(source).exists():
        refuse_input_overlap(out, [source])
    claim_output(out, "index", overwrite=overwrite)  # before the embedding, so a refusal costs nothing
    embedder = Embedder(checkpoint, pooling, space)
    vectors, feats = embedder.shards(source, cache_dir, batch_size, num_workers)
    rows = metadata_rows(source, feats.keys, thumbnails=thumbnails)
    img_size, in_chans = model_geometry(embedder.model)
    info = {"fingerprint": embedder.fingerprint, "pooling": embedder.pooling, "space": space,
            "checkpoint": str(checkpoint), "sources": [str(source)], "img_size": img_size, "in_chans": in_chans}
    index = RetrievalIndex.build(vectors.numpy(), rows, info=info, factory=factory, exact_below=exact_below)
    index.save(out, overwrite=overwrite)
    return index


def open_index(index_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> tuple[RetrievalIndex, Embedder]:
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
    index, embedder = open_index(index_dir, checkpoint)
    vectors, feats = embedder.shards(source, cache_dir, batch_size, num_workers)
    index.add(vectors.numpy(), metadata_rows(source, feats.keys, thumbnails=thumbnails))
    index.info["sources"] = [*index.info.get("sources", []), str(source)]
    index.save(index_dir, overwrite=True)  # extending an index rewrites its own folder: what `add` is for
    return index


def evaluate_index(
    index_dir: str | os.PathLike,
    queries: str | None = None,
    *,
    relevant: str = "label",
    ks: Sequence[int] = (1, 5, 10),
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Retrieval quality of the index: recall@k for each k and mAP@max(k) normalised by min(k, relevant items).

    `relevant` says which indexed items are relevant to a query (`downstream.retrieval.parse_relevant`):
    `label` (same class), `key` (same sample key) or `field:NAME` (equal metadata field, e.g.
    `field:source_stem`: the same source file name in another folder, style or view; see
    `downstream.retrieval.row_field`). `queries` is a shard set embedded with the index's backbone; without
    it the index queries itself, each member leaving itself out. Queries without a value of the field, or
    with no relevant item in the index, cannot be scored: they are left out and counted under `skipped`.
    """
    name = parse_relevant(relevant)
    spec = name if name in ("label", "key") else f"field:{name}"
    if queries is None:
        index = RetrievalIndex.load(index_dir)
        index_values = index.field_values(name)
        _check_values(index_values, name, f"the index at {index_dir}")
        got = index.evaluate_against_self(ks, relevant=spec)
    else:
        index, embedder = open_index(index_dir, checkpoint)
        vectors, feats = embedder.shards(queries, cache_dir, batch_size)
        if name == "label":
            values = [None if v < 0 else int(v) for v in feats.labels.tolist()]
        elif name == "key":
            values = list(feats.keys)
        else:
            values = [row_field(r, name) for r in metadata_rows(queries, feats.keys, thumbnails=False)]
        index_values = index.field_values(name)
        _check_values(index_values, name, f"the index at {index_dir}")
        _check_values(values, name, f"the queries {queries}")
        got = evaluate_relevance(index, vectors.numpy(), values, index_values, ks)
    k = max(ks)
    result = {
        "relevant": spec,
        "queries": got["queries"],
        "self": queries is None,
        "skipped": got["skipped"],
        "indexed": len(index),
        "recall": {f"@{kk}": v for kk, v in got["recall"].items()},
        f"map@{k}": got["map"],
        "factory": index.info.get("factory"),
        "pooling": index.info.get("pooling"),
    }
    if queries is not None and str(queries) in index.info.get("sources", []):
        result["note"] = (f"the queries {queries} are a source of the index: each finds itself first; leave out "
                          "the queries to score the index against itself, each member leaving itself out")
    return result


def _check_values(values: Sequence, name: str, where: str) -> None:
    if values and all(v is None for v in values):
        hint = (" (shards and indexes written before source names have none: rewrite the shards and rebuild the "
                "index)" if name in ("source", "source_stem") else "")
        raise RetrievalError(f"no item of {where} has a value of {name!r}, so no relevance can be judged{hint}")


def index_summary(index_dir: str | os.PathLike) -> dict:
    index = RetrievalIndex.load(index_dir)
    labels = index.labels()
    with_source = sum(v is not None for v in index.field_values("source"))
    return {**{k: v for k, v in index.info.items() if k != "sha256"}, "labelled": int((labels >= 0).sum()),
            "with_source": with_source}


def _load_image(path: str | os.PathLike) -> Image.Image:
    try:
        with Image.open(path) as im:
            check_image_size(*im.size)  # from the header: a 1 x 2M image would blow up in the resize
            im.load()
            return im.copy()
    except ImageBoundsError as e:
        raise FeatureError(f"query image {path} is refused: {e}") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"query image not found: {path}") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"query image {path} is a folder") from None
    except Exception as e:
        raise FeatureError(f"query image {path} is not a readable image: {e}") from None


def _load_images(paths: Sequence[str | os.PathLike]) -> list[Image.Image]:
    return [_load_image(p) for p in paths]


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


@dataclass(frozen=True)
class ImageQuery:
    """An image file to query with: where it is, its source name, and whether it was named on its own (then a
    missing or unreadable file is an error; found in a folder or a list, it is skipped and counted)."""

    path: Path
    source: str
    named: bool = True


def resolve_image_inputs(items: Sequence[str | os.PathLike]) -> tuple[list[ImageQuery], list[str]]:
    """Image files, folders and `@list.txt` files -> (image queries, shard sets).

    A folder is searched recursively for the image files a shard writer takes (`shards.sources.image_files`); its
    images' source names are their paths relative to it, as the folder writer records them. A folder holding a
    manifest.json is a shard set. `@FILE` lists image paths, one a line (blank lines and `#` comments ignored),
    relative to the list's folder unless absolute; each keeps its line as its source name.
    """
    images: list[ImageQuery] = []
    shard_sets: list[str] = []
    for item in items:
        text = str(item)
        if text.startswith("@"):
            listing = Path(text[1:])
            if not listing.is_file():
                raise FileNotFoundError(f"query list {listing} not found (@FILE: a text file of image paths)")
            try:
                lines = listing.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise FeatureError(f"query list {listing} is not UTF-8 text: {e}") from None
            for line in (raw.strip() for raw in lines):
                if line and not line.startswith("#"):
                    path = Path(line)
                    images.append(ImageQuery(path if path.is_absolute() else listing.parent / path, line, False))
            continue
        path = Path(text)
        if path.is_dir():
            if (path / MANIFEST_NAME).is_file():
                shard_sets.append(text)
                continue
            found = image_files(path)
            if not found:
                raise FeatureError(
                    f"query folder {path} holds no image files ({', '.join(sorted(image_suffixes())[:6])}, ...); "
                    "a shard set without manifest.json goes to --shards"
                )
            images += [ImageQuery(f, f.relative_to(path).as_posix(), False) for f in found]
        else:
            images.append(ImageQuery(path, text, True))
    return images, shard_sets


@dataclass
class _Batch:
    """Queries answered together: what they were, their pictures (for a sheet) and their top-k."""

    queries: list[str]
    kinds: list[str]
    sources: list[str | None]
    extra: list[dict]  # per query: more fields for its JSON record (a shard sample's key and shard)
    pictures: list
    scores: np.ndarray
    ids: np.ndarray


def _image_batches(index, embedder, images: Sequence[ImageQuery], k: int, batch_size: int,
                   skip: Callable[[str, str], None]) -> Iterator[_Batch]:
    for lo in range(0, len(images), batch_size):
        loaded, pictures = [], []
        for q in images[lo : lo + batch_size]:
            if q.named:
                pictures.append(_load_image(q.path))
            else:
                try:
                    pictures.append(_load_image(q.path))
                except (FileNotFoundError, FeatureError) as e:
                    skip(str(q.path), str(e))
                    continue
            loaded.append(q)
        if not loaded:
            continue
        s, i = index.search(embedder.images(pictures).numpy(), k)
        yield _Batch([str(q.path) for q in loaded], ["image"] * len(loaded), [q.source for q in loaded],
                     [{}] * len(loaded), pictures, s, i)


def _shard_batches(index, embedder, spec: str, k: int, batch_size: int, cache_dir, pictures: bool,
                   skip: Callable[[str, str], None]) -> Iterator[_Batch]:
    vectors, feats = embedder.shards(spec, cache_dir, batch_size)
    if feats.num_skipped:
        skip(spec, f"{feats.num_skipped} unreadable samples in the shard set")
    rows = metadata_rows(spec, feats.keys, thumbnails=pictures)
    vectors = vectors.numpy()
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        s, i = index.search(vectors[lo : lo + batch_size], k)
        yield _Batch([r["key"] for r in chunk], ["shard"] * len(chunk), [r["source"] for r in chunk],
                     [{"key": r["key"], "shard": r["shard"], "label": r["label"]} for r in chunk],
                     [r["thumbnail"] for r in chunk], s, i)


def query_index(
    index_dir: str | os.PathLike,
    *,
    images: Sequence[str | os.PathLike] = (),
    shards: Sequence[str] = (),
    keys: Sequence[str] = (),
    texts: Sequence[str] = (),
    k: int = 10,
    checkpoint: str | os.PathLike | None = None,
    sheet: str | os.PathLike | None = None,
    sheet_rows: int = SHEET_ROWS,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    on_result: Callable[[dict], None] | None = None,
    keep: bool = True,
) -> QueryResult:
    """Top-k neighbours of images (files, folders, `@list.txt`: `resolve_image_inputs`), the samples of shard
    sets, indexed keys (a key never finds itself) and/or texts (an index in a CLIP run's joint space).

    Queries are answered `batch_size` at a time; `on_result` gets each query's JSON record
    ({"query", "kind", "source", "hits", ...}) as soon as it is answered, and `keep=False` keeps no hits in the
    result (for very many queries). The contact sheet, when asked for, draws the first `sheet_rows` queries.
    Unreadable images found in folders or lists, and unreadable shard samples, are skipped and counted
    (`QueryResult.skipped`); a named image that is missing or unreadable is an error.
    """
    image_inputs, shard_sets = resolve_image_inputs(images)
    shard_sets += [str(x) for x in shards]
    _check_query(bool(image_inputs or shard_sets or keys or texts), sheet, sheet_rows, batch_size)
    if image_inputs or shard_sets or texts:
        index, embedder = open_index(index_dir, checkpoint)
    else:
        index, embedder = RetrievalIndex.load(index_dir), None
    result = QueryResult([], [], None, {k: index.info.get(k) for k in ("fingerprint", "pooling", "count")})

    def skip(what: str, why: str) -> None:
        log.warning("query input skipped: %s: %s", what, why)
        result.skipped.append({"input": what, "reason": why})

    def want_pictures() -> bool:
        return sheet is not None and len(sheet_pictures) < sheet_rows

    def batches() -> Iterator[_Batch]:
        yield from _image_batches(index, embedder, image_inputs, k, batch_size, skip)
        for spec in shard_sets:
            yield from _shard_batches(index, embedder, spec, k, batch_size, cache_dir, want_pictures(), skip)
        if keys:
            yield _key_batch(index, index_dir, keys, k, want_pictures())
        if texts:
            s, i = index.search(embedder.texts(texts).numpy(), k)
            yield _Batch([str(t) for t in texts], ["text"] * len(texts), [None] * len(texts), [{}] * len(texts),
                         [None] * len(texts), s, i)

    sheet_pictures, sheet_drawn, sheet_titles = [], [], []
    for batch in batches():
        rows = index.rows_for(batch.ids, thumbnails=want_pictures())
        for n, (record, found) in enumerate(_records(batch, rows)):
            hits = record["hits"]
            result.count += 1
            if keep:
                result.queries.append(record["query"])
                result.kinds.append(record["kind"])
                result.sources.append(record["source"])
                result.hits.append(hits)
            if on_result is not None:
                on_result(record)
            if want_pictures():
                sheet_pictures.append(batch.pictures[n])
                sheet_titles.append(_sheet_title(record))
                sheet_drawn.append([{"score": float(s), "label_name": row["label_name"], "caption": row["caption"],
                                     "label": row["label"], "source": row["source"],
                                     "thumbnail": row.get("thumbnail")} for _, s, _, row in found])
    if result.count == 0:
        raise FeatureError(f"no query could be answered: all {len(result.skipped)} inputs were skipped "
                           f"(first: {result.skipped[0]['input']}: {result.skipped[0]['reason']})"
                           if result.skipped else "no query could be answered: the inputs hold no samples")
    if sheet is not None:
        result.sheet = str(contact_sheet_png(sheet_pictures, sheet_drawn, sheet, sheet_titles))
    return result


def _check_query(anything: bool, sheet, sheet_rows: int, batch_size: int) -> None:
    if not anything:
        raise ValueError("nothing to query: give image files, folders, @lists, shard sets, keys of indexed samples "
                         "or texts")
    if sheet is not None and sheet_rows < 1:
        raise ValueError(f"sheet_rows must be >= 1, got {sheet_rows}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _key_batch(index: RetrievalIndex, index_dir, keys: Sequence[str], k: int, pictures: bool) -> _Batch:
    """Indexed samples as queries, by key (a key never finds itself)."""
    try:
        s, i = index.search_by_keys(list(keys), k)
    except KeyError as e:
        raise RetrievalError(f"{e.args[0]} in {index_dir}") from None
    rows = index.rows_for([index.lookup_key(key) for key in keys], thumbnails=pictures)
    return _Batch([str(key) for key in keys], ["key"] * len(keys), [r["source"] for r in rows],
                  [{}] * len(keys), [r.get("thumbnail") for r in rows], s, i)


def _records(batch: _Batch, rows: list) -> Iterator[tuple[dict, list]]:
    """Each query of `batch` as its JSON record ({"query", "kind", "source", ..., "hits"}), with the hits found
    as (rank, score, id, row) for the contact sheet; ids without a row (FAISS's -1) are left out."""
    for n, (q_scores, q_ids, q_rows) in enumerate(zip(batch.scores, batch.ids, rows)):
        found = [(r, s, i, row) for r, (s, i, row) in enumerate(zip(q_scores, q_ids, q_rows)) if row is not None]
        hits = [{"rank": r + 1, "id": int(i), "score": float(s), **{f: row[f] for f in HIT_FIELDS}}
                for r, s, i, row in found]
        yield {"query": batch.queries[n], "kind": batch.kinds[n], "source": batch.sources[n], **batch.extra[n],
               "hits": hits}, found


def _sheet_title(record: dict) -> str:
    kind, query, source = record["kind"], record["query"], record.get("source")
    if kind == "image":
        return source or Path(query).name
    if kind == "shard":
        return f"{query}\n{source}" if source else query
    if kind == "key":
        return f"key: {query}\n{source}" if source else f"key: {query}"
    return f"text: {query}"


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
    return Path(path)
