"""A FAISS retrieval index over embeddings, with per-vector metadata in SQLite.

An index folder holds three files, written together (the folder is built under a temporary name and renamed):

    index.faiss   the vectors (`faiss.write_index`); ids are row numbers 0..N-1
    meta.sqlite   one row per vector: id, key, shard, label, label_name, caption, source (the sample's source name:
                  file path relative to the source root, or a table's row id), meta (the sample's .json, as
                  JSON text), thumbnail (PNG bytes); an index saved before source names lacks source and meta:
                  they read as None, and the first `add` gives the table those columns
    info.json     what the vectors are: checkpoint fingerprint, pooling, dim, normalisation, factory,
                  count, search parameters, checksums of the other two files

Similarity is the inner product; with `normalize=True` (the default) vectors and queries are L2-normalised,
so scores are cosine similarities. Below `exact_below` vectors the index is exact (`Flat`); above it an
inverted file `IVF{nlist},Flat` whose `nprobe` is tuned at build time to reach `target_recall` of the exact
top-k (bench/retrieval.py measured IVF against HNSW; see `default_factory`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from downstream.metrics import approximate_recall, map_from_hits, recall_from_hits
from shards.atomic import atomic_path
from shards.manifest import sha256_file
from shards.ownership import claim_output, mark_output
from shards.sources import source_stem

FORMAT = "vitssl-retrieval/1"
INDEX_NAME = "index.faiss"
META_NAME = "meta.sqlite"
INFO_NAME = "info.json"
ROW_FIELDS = ("key", "shard", "label", "label_name", "caption", "source", "meta", "thumbnail")
_TEXT_FIELDS = ("shard", "label_name", "caption", "source")
_ADDED_COLUMNS = {"source": "TEXT", "meta": "TEXT"}  # columns that indexes saved before source names lack
# What `index eval --relevant field:NAME` may name besides the fields of each sample's .json (`row_field`).
DERIVED_FIELDS = ("source_stem",)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Keys of info.json that the index computes itself; a caller's `info` may repeat them only with equal values.
COMPUTED_INFO = ("format", "dim", "count", "normalized", "metric", "factory", "faiss_version", "search_params",
                 "tuning", "sha256")

_SCHEMA = """
CREATE TABLE meta (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    shard TEXT,
    label INTEGER,
    label_name TEXT,
    caption TEXT,
    thumbnail BLOB,
    source TEXT,
    meta TEXT
)
"""
_SQL_CHUNK = 900  # stays under SQLite's host-parameter limit on old builds (999)


class RetrievalError(ValueError):
    """A retrieval index or its input is missing, corrupt, inconsistent or not what the caller expected."""


def default_factory(n: int, exact_below: int = 100_000) -> str:
    """The FAISS factory string used for `n` vectors when the caller names none.

    IVF rather than HNSW above the threshold, measured by bench/retrieval.py (1M x 384 clustered and 70k
    Fashion-MNIST, 2 threads): both reach recall@10 >= 0.95 at well over 10x exact throughput, but IVF builds
    several times faster, needs no per-vector graph links, trains its k-means on a GPU, and keeps
    `add` cheap. nlist ~ 4 sqrt(n), at least 39 training points per list (FAISS's own floor).
    """
    if n < exact_below:
        return "Flat"
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 39))
    return f"IVF{nlist},Flat"


def faiss_gpu_count() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu, whose builds have no GPU symbols at all."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def _as_vectors(x: Any, what: str, dim: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 1 and dim is not None and arr.shape[0] == dim:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise RetrievalError(f"{what} must be a 2-D array (N, D), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise RetrievalError(f"{what} must be real numbers, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise RetrievalError(f"{what} have dimension {arr.shape[1]}, the index has {dim}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise RetrievalError(f"{what} row {bad} has NaN or infinite values")
    return arr


def l2_normalized(x: np.ndarray, what: str) -> np.ndarray:
    """Rows of unit length (a copy, float32 as FAISS takes it); an all-zero row has no direction to compare by
    cosine and is a `RetrievalError` naming `what` and the row."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise RetrievalError(f"{what} row {int(np.flatnonzero(norms == 0)[0])} is all zeros: it has no direction "
                             "to compare by cosine")
    x = x.copy()
    faiss.normalize_L2(x)
    return x


def _clean_row(row: dict, n: int) -> tuple:
    if not isinstance(row, dict):
        raise RetrievalError(f"row {n} must be a dict with fields {', '.join(ROW_FIELDS)}, got {type(row).__name__}")
    unknown = set(row) - set(ROW_FIELDS)
    if unknown:
        raise RetrievalError(f"row {n} has unknown field(s) {sorted(unknown)}; valid: {', '.join(ROW_FIELDS)}")
    key = row.get("key")
    if not isinstance(key, str) or not key:
        raise RetrievalError(f"row {n} needs a non-empty string 'key', got {key!r}")
    label = row.get("label")
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise RetrievalError(f"row {n} ({key}): label must be an int or None, got {label!r}")
        label = int(label)
    thumb = row.get("thumbnail")
    if thumb is not None:
        if not isinstance(thumb, (bytes, bytearray, memoryview)) or not bytes(thumb[:8]) == PNG_SIGNATURE:
            raise RetrievalError(f"row {n} ({key}): thumbnail must be PNG bytes "
                                 "(see downstream.contact_sheet.thumbnail_png)")
        thumb = bytes(thumb)
    texts = []
    for name in _TEXT_FIELDS:
        v = row.get(name)
        if v is not None and not isinstance(v, str):
            raise RetrievalError(f"row {n} ({key}): {name} must be a string or None, got {type(v).__name__}")
        texts.append(v)
    meta = row.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise RetrievalError(f"row {n} ({key}): meta must be a dict (the sample's .json) or None, "
                                 f"got {type(meta).__name__}")
        try:
            meta = json.dumps(meta, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise RetrievalError(f"row {n} ({key}): meta is not JSON-serialisable ({e})") from e
    return key, texts[0], label, texts[1], texts[2], thumb, texts[3], meta


_INSERT = ("INSERT INTO meta (id, key, shard, label, label_name, caption, thumbnail, source, meta) "
           f"VALUES ({', '.join('?' * 9)})")


def _columns(db: sqlite3.Connection) -> set[str]:
    return {rec[1] for rec in db.execute("PRAGMA table_info(meta)")}


def _parse_meta(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) else None


def comparable(value: Any) -> Any:
    """A hashable stand-in for a metadata value, equal exactly when the values are: strings and ints stay as
    they are, anything else (float, bool, list, object) becomes its canonical JSON; None stays None (no value)."""
    if value is None or (isinstance(value, (str, int)) and not isinstance(value, bool)):
        return value
    return json.dumps(value, sort_keys=True)


def row_field(row: dict, name: str) -> Any:
    """The value of field `name` for a metadata row (`rows_for`, `downstream.search.metadata_rows`):
    one of its columns (key, shard, label, label_name, caption, source), `source_stem` (the source's file name
    without its image extension), or else the field `name` of the sample's .json (`row["meta"]`); None when
    absent. Comparable with `==` (see `comparable`)."""
    if name == "source_stem":
        return source_stem(row.get("source"))
    if name in ROW_FIELDS and name not in ("meta", "thumbnail"):
        return comparable(row.get(name))
    meta = row.get("meta")
    return comparable(meta.get(name)) if isinstance(meta, dict) else None


def parse_relevant(spec: str) -> str:
    """`label`, `key` or `field:NAME` (what makes an indexed item relevant to a query) -> the field compared."""
    if spec in ("label", "key"):
        return spec
    if isinstance(spec, str) and spec.startswith("field:") and spec[len("field:"):].strip():
        return spec[len("field:"):].strip()
    raise RetrievalError(f"relevant={spec!r}: use label, key or field:NAME (NAME: source, source_stem, shard, "
                         "caption, label_name or any field of the samples' .json)")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


class RetrievalIndex:
    """Vectors in a FAISS index (ids = row numbers) plus their metadata rows in SQLite.

    Make one with `build` or `load`; `add` appends, `search` queries, `save` writes the folder.
    """

    def __init__(self, index: faiss.Index, db: sqlite3.Connection, info: dict, *, folder: Path | None = None):
        self.index = index
        self.info = info
        self._db = db
        self._folder = folder  # set when `_db` is a loaded folder's meta.sqlite (in memory, read-only)
        self._loaded_from = folder  # `save` may replace the folder it was loaded from: growing in place
        self._columns = _columns(db)
        self._labels: np.ndarray | None = None
        self._gpu_index: faiss.Index | None = None
        self._gpu_failed = False

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        rows: Sequence[dict],
        *,
        info: dict,
        factory: str | None = None,
        exact_below: int = 100_000,
        normalize: bool = True,
        target_recall: float = 0.95,
        k_tune: int = 10,
        tune_queries: int = 500,
        seed: int = 0,
    ) -> RetrievalIndex:
        """Index `embeddings` (N, D) with one metadata row per vector.

        `info` goes into info.json (record at least the checkpoint `fingerprint` and `pooling`). `factory` is
        any FAISS factory string (inner-product metric); by default `default_factory(N, exact_below)`. IVF
        is trained on a seeded random sample; its `nprobe` (or HNSW's `efSearch`) is the smallest that finds
        `target_recall` of the exact top-`k_tune` for `tune_queries` members queried without themselves.
        """
        x = _as_vectors(embeddings, "embeddings")
        n, dim = x.shape
        if n == 0:
            raise RetrievalError("no embeddings to index")
        if len(rows) != n:
            raise RetrievalError(f"{n} embeddings but {len(rows)} metadata rows")
        if not isinstance(info, dict):
            raise RetrievalError(f"info must be a dict, got {type(info).__name__}")
        try:
            user_info = _jsonable(info)
        except (TypeError, ValueError) as e:
            raise RetrievalError(f"info must be JSON-serialisable: {e}") from e
        if normalize:
            x = l2_normalized(x, "embeddings")
        factory = factory or default_factory(n, exact_below)
        if "IDMap" in factory:
            raise RetrievalError(f"factory {factory!r}: ids are row numbers here, leave out IDMap")
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise RetrievalError(f"FAISS cannot make factory {factory!r} for dim {dim}: "
                                 f"{str(e).strip().splitlines()[-1]}") from e

        computed = {"format": FORMAT, "dim": dim, "normalized": bool(normalize), "metric": "inner_product",
                    "factory": factory, "faiss_version": faiss.__version__}
        for name, value in user_info.items():
            if name in COMPUTED_INFO and computed.get(name, object()) != value:
                raise RetrievalError(f"info[{name!r}] = {value!r}: the index records {name} itself "
                                     f"({computed.get(name, 'when saved')!r})")
        db = sqlite3.connect(":memory:")
        db.execute(_SCHEMA)
        self = cls(index, db, {**user_info, **computed, "count": 0, "search_params": {}})

        if not index.is_trained:
            self._train(x, seed)
        with contextlib.suppress(RuntimeError):  # IVF: an id -> list position map lets `vector(id)` work
            faiss.extract_index_ivf(index).make_direct_map()
        self.add(x, rows, _normalized_already=True)
        if self._tunable():
            self.tune(target_recall=target_recall, k=k_tune, queries=tune_queries, seed=seed, database=x)
        return self

    def _train(self, x: np.ndarray, seed: int) -> None:
        n = x.shape[0]
        try:
            nlist = faiss.extract_index_ivf(self.index).nlist
        except RuntimeError:
            nlist = 0
        # 64 points per list is plenty for k-means (FAISS subsamples above 256 anyway); seeded for repeatability.
        n_train = min(n, max(64 * nlist, 10_000))
        sample = x if n_train == n else x[np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))]
        gpu_clustering = None
        if nlist and faiss_gpu_count() > 0:
            ivf = faiss.extract_index_ivf(self.index)
            gpu_clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
            ivf.clustering_index = gpu_clustering
        try:
            self.index.train(sample)
        except RuntimeError as e:
            raise RetrievalError(f"training {self.info['factory']!r} on {n_train} vectors failed: "
                                 f"{str(e).strip().splitlines()[-1]}") from e
        finally:
            if gpu_clustering is not None:
                faiss.extract_index_ivf(self.index).clustering_index = None

    def add(self, embeddings: np.ndarray, rows: Sequence[dict], *, _normalized_already: bool = False) -> np.ndarray:
        """Append vectors and their metadata; returns their ids. Nothing changes if any input is bad."""
        x = _as_vectors(embeddings, "embeddings", self.dim)
        if len(rows) != x.shape[0]:
            raise RetrievalError(f"{x.shape[0]} embeddings but {len(rows)} metadata rows")
        if self.info["normalized"] and not _normalized_already:
            x = l2_normalized(x, "embeddings")
        start = len(self)
        ids = np.arange(start, start + x.shape[0], dtype=np.int64)
        records = [(int(i), *_clean_row(r, int(i))) for i, r in zip(ids, rows)]
        self._make_writable()
        try:
            with self._db:  # one transaction: rolled back if a key repeats or FAISS refuses the vectors
                try:
                    self._db.executemany(_INSERT, records)
                except sqlite3.IntegrityError as e:
                    raise RetrievalError(f"duplicate key among the new rows or already indexed: {e}") from e
                self.index.add(x)
        except RuntimeError as e:
            raise RetrievalError(f"FAISS refused the vectors: {str(e).strip().splitlines()[-1]}") from e
        self.info["count"] = int(self.index.ntotal)
        self._labels = None
        self._gpu_index = None
        return ids

    # ---- search parameters ----------------------------------------------------------------------------

    def _tunable(self) -> str | None:
        """The search-time knob FAISS knows for this index: "nprobe" (IVF), "efSearch" (HNSW) or None."""
        ps = faiss.ParameterSpace()
        ps.initialize(self.index)
        names = {ps.parameter_ranges.at(i).name for i in range(ps.parameter_ranges.size())}
        return next((name for name in ("nprobe", "efSearch") if name in names), None)

    def set_search_params(self, **params: int) -> None:
        """Set FAISS search parameters, e.g. `nprobe=16` (IVF) or `efSearch=64` (HNSW); saved in info.json."""
        ps = faiss.ParameterSpace()
        for name, value in params.items():
            try:
                ps.set_index_parameter(self.index, name, int(value))
            except RuntimeError as e:
                raise RetrievalError(f"{self.info['factory']!r} has no search parameter {name!r}") from e
            self.info["search_params"][name] = int(value)
        self._gpu_index = None

    def tune(
        self, *, target_recall: float = 0.95, k: int = 10, queries: int = 500, seed: int = 0,
        database: np.ndarray | None = None,
    ) -> dict:
        """Pick the smallest nprobe / efSearch whose top-k finds `target_recall` of the exact top-k.

        Queries are `queries` random members, each searched without itself (like a new query from the same
        distribution); ground truth is brute force over `database` (the indexed vectors; reconstructed from
        the index when not given). Returns {"param", "value", "recall", "table": [[value, recall], ...]}.
        """
        param = self._tunable()
        if param is None:
            raise RetrievalError(f"{self.info['factory']!r} has no nprobe or efSearch to tune")
        n = len(self)
        k = min(k, n - 1)
        if k < 1:
            raise RetrievalError("tuning needs at least two indexed vectors")
        qids = np.sort(np.random.default_rng(seed).choice(n, min(queries, n), replace=False))
        if database is None:
            database = self.vectors(np.arange(n))
        q = database[qids]
        _, exact = exact_search(database, q, k, exclude_ids=qids)
        if param == "nprobe":
            nlist = faiss.extract_index_ivf(self.index).nlist
            # steps of ~1.5x: the smallest value that reaches the target is the fastest, so a coarse grid
            # (doubling) can cost up to 2x in query throughput
            grid = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
            values = [v for v in grid if v < nlist] + [nlist]
        else:
            values = [k] + [v for v in (12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024) if v > k]
        table = []
        for value in values:
            self.set_search_params(**{param: value})
            _, approx = self.search(q, k, exclude_ids=qids)
            r = approximate_recall(approx, exact, k)
            table.append([value, round(r, 4)])
            if r >= target_recall:
                break
        self.info["tuning"] = {"target_recall": target_recall, "k": k, "queries": int(qids.size), "table": table}
        return {"param": param, "value": table[-1][0], "recall": table[-1][1], "table": table}

    # ---- queries --------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _searcher(self) -> faiss.Index:
        if faiss_gpu_count() == 0 or self._gpu_failed:
            return self.index
        if self._gpu_index is None:
            try:  # a clone carries the CPU index's nprobe; HNSW and some others have no GPU version
                self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
            except RuntimeError:
                self._gpu_failed = True
                return self.index
        return self._gpu_index

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude_ids: Sequence[int] | np.ndarray | None = None,
        batch_size: int = 8192,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), both (Q, k), best first; id -1 (score -inf-like) where fewer than k exist.

        `exclude_ids` (one id per query, -1 for none) drops that id from the query's results, e.g. a member
        queried with its own vector; k results are still returned.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise RetrievalError(f"k must be a positive integer, got {k!r}")
        q = _as_vectors(queries, "queries", self.dim)
        if self.info["normalized"]:
            q = l2_normalized(q, "queries")
        excl = None
        if exclude_ids is not None:
            excl = np.asarray(exclude_ids, dtype=np.int64).reshape(-1)
            if excl.shape[0] != q.shape[0]:
                raise RetrievalError(f"{q.shape[0]} queries but {excl.shape[0]} exclude_ids")
        searcher = self._searcher()
        extra = 0 if excl is None else 1
        scores = np.empty((q.shape[0], k), dtype=np.float32)
        ids = np.empty((q.shape[0], k), dtype=np.int64)
        for lo in range(0, q.shape[0], batch_size):
            hi = min(lo + batch_size, q.shape[0])
            s, i = searcher.search(q[lo:hi], k + extra)
            if excl is not None:
                s, i = _drop_excluded(s, i, excl[lo:hi])
            scores[lo:hi], ids[lo:hi] = s, i
        return scores, ids

    def search_by_keys(self, keys: Sequence[str], k: int, *, exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Query with the stored vectors of indexed items (by key), by default without the item itself."""
        qids = np.array([self.lookup_key(key) for key in keys], dtype=np.int64)
        return self.search(self.vectors(qids), k, exclude_ids=qids if exclude_self else None)

    # ---- metadata -------------------------------------------------------------------------------------

    def lookup_key(self, key: str) -> int:
        """The id of the vector stored under `key`; KeyError if none."""
        row = self._db.execute("SELECT id FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(f"no indexed item with key {key!r}")
        return int(row[0])

    def vector(self, id: int) -> np.ndarray:
        """The stored (normalised, if the index normalises) embedding of `id`, shape (D,)."""
        return self.vectors([id])[0]

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise RetrievalError(f"id {int(bad)} is not in the index (0..{len(self) - 1})")
        try:
            return self.index.reconstruct_batch(ids)
        except RuntimeError as e:
            raise RetrievalError(f"{self.info['factory']!r} cannot give back stored vectors: "
                                 f"{str(e).strip().splitlines()[-1]}") from e

    def rows_for(self, ids: Sequence[int] | np.ndarray, *, thumbnails: bool = True) -> list:
        """Metadata dicts for ids: a list for 1-D ids, a list of lists for 2-D (search results); None for -1."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim not in (1, 2):
            raise RetrievalError(f"ids must be 1-D or 2-D, got shape {arr.shape}")
        cols = ("id",) + ROW_FIELDS if thumbnails else ("id",) + ROW_FIELDS[:-1]
        select = ", ".join(c if c in self._columns or c == "id" else f"NULL AS {c}" for c in cols)
        wanted = [int(i) for i in np.unique(arr) if i >= 0]
        found: dict[int, dict] = {}
        for lo in range(0, len(wanted), _SQL_CHUNK):
            chunk = wanted[lo:lo + _SQL_CHUNK]
            sql = f"SELECT {select} FROM meta WHERE id IN ({','.join('?' * len(chunk))})"
            for rec in self._db.execute(sql, chunk):
                row = dict(zip(cols, rec))
                row["meta"] = _parse_meta(row["meta"])
                found[rec[0]] = row
        missing = [i for i in wanted if i not in found]
        if missing:
            raise RetrievalError(f"id {missing[0]} has no metadata row")
        if arr.ndim == 1:
            return [found.get(int(i)) for i in arr]
        return [[found.get(int(i)) for i in line] for line in arr]

    def labels(self) -> np.ndarray:
        """Every vector's label, indexed by id; -1 where unlabelled."""
        if self._labels is None:
            out = np.full(len(self), -1, dtype=np.int64)
            for i, label in self._db.execute("SELECT id, label FROM meta WHERE label IS NOT NULL"):
                out[i] = label
            self._labels = out
        return self._labels

    def field_values(self, name: str) -> list:
        """Every vector's value of field `name` (see `row_field`), indexed by id; None where it has none."""
        column = "source" if name == "source_stem" else name
        if column not in ROW_FIELDS or column in ("meta", "thumbnail"):
            column = "meta"
        if column not in self._columns:  # an index saved before source names
            return [None] * len(self)
        values: list = [None] * len(self)
        for i, value in self._db.execute(f"SELECT id, {column} FROM meta"):
            values[i] = row_field({column: _parse_meta(value) if column == "meta" else value}, name)
        return values

    def _make_writable(self) -> None:
        # A loaded index holds meta.sqlite in memory, read-only; the first change copies it into a writable
        # database (and gives an index saved before source names their columns).
        if self._folder is not None:
            mem = sqlite3.connect(":memory:")
            self._db.backup(mem)
            self._db.close()
            self._db = mem
            self._folder = None
        for name, kind in _ADDED_COLUMNS.items():
            if name not in self._columns:
                self._db.execute(f"ALTER TABLE meta ADD COLUMN {name} {kind}")
                self._columns.add(name)

    # ---- evaluation -----------------------------------------------------------------------------------

    def evaluate_self(
        self, ks: Iterable[int] = (1, 5, 10), *, queries: int | None = None, seed: int = 0, relevant: str = "label"
    ) -> dict:
        """Retrieval quality of the index against itself: each member with a value of the `relevant` field
        (`parse_relevant`: label, key or field:NAME) and at least one other relevant member (or a seeded sample
        of `queries` of them) queries the rest, itself excluded.

        Returns recall@k for each k, mAP@max(ks) normalised by min(k, relevant items in the index), the number
        of queries and `skipped` (members without a value, members whose value no other member shares).
        """
        ks = sorted(set(int(k) for k in ks))
        got = self.evaluate_against_self(ks, relevant=relevant, queries=queries, seed=seed)
        out = {f"recall@{k}": v for k, v in got["recall"].items()}
        out[f"mAP@{ks[-1]}"] = got["map"]
        out["queries"] = got["queries"]
        out["skipped"] = got["skipped"]
        return out

    def evaluate_against_self(
        self, ks: Iterable[int] = (1, 5, 10), *, relevant: str = "label", queries: int | None = None, seed: int = 0
    ) -> dict:
        """`evaluate_self` in the shape of `evaluate_relevance`: {"queries", "skipped", "recall": {k: ...}, "map"}."""
        values = self.field_values(parse_relevant(relevant))
        candidates, skipped = select_queries(values, values, exclude_ids=np.arange(len(self), dtype=np.int64))
        if candidates.size == 0:
            raise RetrievalError(f"no member can be scored against the others by {relevant}: "
                                 f"{skipped['no_value']} have no value, {skipped['no_relevant']} share theirs with "
                                 "no other member")
        if queries is not None and queries < candidates.size:
            candidates = np.sort(np.random.default_rng(seed).choice(candidates, queries, replace=False))
        got = evaluate_relevance(self, self.vectors(candidates), [values[i] for i in candidates], values, ks,
                                 exclude_ids=candidates)
        return {**got, "skipped": skipped}

    # ---- persistence ----------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write index.faiss, meta.sqlite and info.json into `folder`, all or nothing. An existing `folder` is
        replaced only when it is an index this project wrote and `overwrite` is given, or is the folder this index
        was loaded from (saving a grown index in place)."""
        folder = Path(folder)
        own = self._loaded_from is not None and self._loaded_from.resolve() == folder.resolve()
        claim_output(folder, "index", overwrite=overwrite or own)
        if own:
            self._make_writable()  # the old folder is about to be replaced under the open database
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            mark_output(tmp, "index")
            index_path, meta_path = tmp / INDEX_NAME, tmp / META_NAME
            faiss.write_index(self.index, str(index_path))
            dst = sqlite3.connect(meta_path)
            try:
                self._db.backup(dst)
            finally:
                dst.close()
            for p in (index_path, meta_path):
                _fsync(p)
            self.info["count"] = len(self)
            self.info["sha256"] = {INDEX_NAME: sha256_file(index_path), META_NAME: sha256_file(meta_path)}
            (tmp / INFO_NAME).write_text(json.dumps(self.info, indent=2, sort_keys=True))
            _fsync(tmp / INFO_NAME)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, expect: dict | None = None, *, verify: bool = True) -> RetrievalIndex:
        """Open a saved index folder. `expect` ({"fingerprint": ..., "dim": ...}) must agree with info.json.

        `verify` checks the files against the checksums in info.json (reads them once).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise RetrievalError(f"no retrieval index folder at {folder}")
        for name in (INFO_NAME, INDEX_NAME, META_NAME):
            if not (folder / name).is_file():
                raise RetrievalError(f"{folder} has no {name}: not a complete retrieval index")
        try:
            info = json.loads((folder / INFO_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RetrievalError(f"{folder / INFO_NAME} is not valid JSON: {e}") from e
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            got = info.get("format") if isinstance(info, dict) else None
            raise RetrievalError(f"{folder / INFO_NAME}: format {got!r}, this code reads {FORMAT!r}")
        for name, want in _jsonable(expect or {}).items():
            if name not in info:
                raise RetrievalError(f"index at {folder} records no {name!r}; expected {want!r}")
            if info[name] != want:
                raise RetrievalError(f"index at {folder} has {name} = {info[name]!r}, expected {want!r}")
        # Each file is read once, into memory, and checksummed from the very bytes that are loaded: nothing is read
        # from the folder afterwards, so a file damaged or rewritten in place later cannot reach a loaded index.
        digests: dict[str, str] = {}
        index, digests[INDEX_NAME], unreadable = _read_faiss(folder / INDEX_NAME)
        data = (folder / META_NAME).read_bytes()
        digests[META_NAME] = hashlib.sha256(data).hexdigest()
        if verify:
            for name, digest in info.get("sha256", {}).items():
                if digests.get(name, digest) != digest:
                    raise RetrievalError(f"{folder / name} does not match the checksum in {INFO_NAME}: "
                                         "truncated or modified since it was saved")
        if index is None:
            raise RetrievalError(unreadable)
        db = _memory_db(folder / META_NAME, data)
        if index.d != info.get("dim"):
            db.close()
            raise RetrievalError(f"{folder / INDEX_NAME} holds {index.d}-d vectors, info.json says {info.get('dim')}")
        try:
            count, lo, hi = db.execute("SELECT count(*), min(id), max(id) FROM meta").fetchone()
        except sqlite3.DatabaseError as e:
            db.close()
            raise RetrievalError(f"{folder / META_NAME} is not a readable metadata database: {e}") from e
        if count != index.ntotal or (count and (lo, hi) != (0, count - 1)):
            db.close()
            raise RetrievalError(f"{folder}: {index.ntotal} vectors in {INDEX_NAME} but {count} metadata rows "
                                 f"(ids {lo}..{hi}) in {META_NAME}")
        if info.get("count") != index.ntotal:
            db.close()
            raise RetrievalError(f"{folder}: info.json count {info.get('count')} but {index.ntotal} vectors")
        self = cls(index, db, info, folder=folder)
        for name, value in info.get("search_params", {}).items():
            faiss.ParameterSpace().set_index_parameter(index, name, int(value))
        return self


def _read_faiss(path: Path) -> tuple[faiss.Index | None, str, str | None]:
    """The FAISS index at `path`, read once while hashing the bytes FAISS consumes (and any after them):
    (index, sha256, None), or (None, sha256, why) when FAISS cannot read it, so that a checksum, when there is
    one, names the damage first."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        def read(n: int) -> bytes:
            block = f.read(n)
            digest.update(block)
            return block

        try:
            index, error = faiss.read_index(faiss.PyCallbackIOReader(read)), None
        except RuntimeError as e:
            index, error = None, (f"{path} is truncated or corrupt; FAISS could not read it "
                                  f"({str(e).strip().splitlines()[-1]})")
        while block := f.read(1 << 20):
            digest.update(block)
    return index, digest.hexdigest(), error


def _memory_db(path: Path, data: bytes) -> sqlite3.Connection:
    """The metadata database read from `path` (`data`, its bytes) as an in-memory database, read-only until
    `_make_writable`."""
    db = sqlite3.connect(":memory:")
    try:
        db.deserialize(data)
        db.execute("PRAGMA query_only = ON")
    except sqlite3.DatabaseError as e:
        db.close()
        raise RetrievalError(f"{path} is not a readable metadata database: {e}") from e
    return db


def _drop_excluded(scores: np.ndarray, ids: np.ndarray, excl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From (Q, k+1) results keep k per row: without the excluded id if present, else without the last."""
    keep = (ids != excl[:, None]) | (excl[:, None] < 0)
    no_hit = keep.all(axis=1)
    keep[no_hit, -1] = False
    q, k1 = ids.shape
    return scores[keep].reshape(q, k1 - 1), ids[keep].reshape(q, k1 - 1)


def exact_search(
    database: np.ndarray, queries: np.ndarray, k: int, *, exclude_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k of `queries` against `database` (ground truth for approximate indexes)."""
    database = _as_vectors(database, "database")
    queries = _as_vectors(queries, "queries", database.shape[1])
    extra = 0 if exclude_ids is None else 1
    s, i = faiss.knn(queries, database, k + extra, metric=faiss.METRIC_INNER_PRODUCT)
    if exclude_ids is not None:
        s, i = _drop_excluded(s, i, np.asarray(exclude_ids, dtype=np.int64).reshape(-1))
    return s, i


# ---- evaluation ---------------------------------------------------------------------------------------


def relevance_codes(query_values: Sequence[Any], index_values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for values (hashable; see `comparable`): equal values get equal codes >= 0; None gets -1 on
    the index side and -2 on the query side, so that no value never matches anything."""
    codes: dict[Any, int] = {}
    index_codes = np.array([-1 if v is None else codes.setdefault(v, len(codes)) for v in index_values], dtype=np.int64)
    query_codes = np.array([-2 if v is None else codes.get(v, len(codes)) for v in query_values], dtype=np.int64)
    return query_codes, index_codes


def _relevant_counts(query_codes: np.ndarray, index_codes: np.ndarray, exclude_ids: np.ndarray | None) -> np.ndarray:
    """Relevant indexed items per query: those sharing its value, less the excluded item if it shares it too."""
    size = int(max(index_codes.max(initial=-1), query_codes.max(initial=-1))) + 1
    counts = np.bincount(index_codes[index_codes >= 0], minlength=max(size, 1))
    n = np.where(query_codes >= 0, counts[np.maximum(query_codes, 0)], 0)
    if exclude_ids is not None:
        excl = np.asarray(exclude_ids, dtype=np.int64)
        own = np.where(excl >= 0, index_codes[np.maximum(excl, 0)], -3)
        n = n - ((excl >= 0) & (own == query_codes))
    return n


def select_queries(
    query_values: Sequence[Any], index_values: Sequence[Any], *, exclude_ids: np.ndarray | None = None
) -> tuple[np.ndarray, dict]:
    """Positions of the queries that can be scored: they have a value and the index holds at least one relevant
    item (other than the excluded one). Returns them and {"no_value": n, "no_relevant": m}, the others counted."""
    q, idx = relevance_codes(query_values, index_values)
    n_rel = _relevant_counts(q, idx, exclude_ids)
    has_value = q >= 0
    usable = np.flatnonzero(has_value & (n_rel > 0))
    return usable, {"no_value": int((~has_value).sum()), "no_relevant": int((has_value & (n_rel == 0)).sum())}


def evaluate_relevance(
    index: RetrievalIndex,
    query_vectors: np.ndarray,
    query_values: Sequence[Any],
    index_values: Sequence[Any],
    ks: Iterable[int] = (1, 5, 10),
    *,
    exclude_ids: np.ndarray | None = None,
) -> dict:
    """Search `index` with `query_vectors` and score the top max(ks) by relevance = equal values (an indexed
    item i is relevant to query q when index_values[i] == query_values[q], None never matching).

    `exclude_ids` (one per query, -1 for none) leaves an item out of its query's results and its relevant count
    (a member querying the index it belongs to). Queries without a value, or with no relevant item in the index,
    cannot be scored and are skipped and counted (`select_queries`). Returns {"queries", "skipped", "recall":
    {k: recall@k}, "map": mAP@max(ks) normalised by min(k, relevant items)}.
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise RetrievalError(f"ks must be positive integers, got {ks}")
    if len(query_values) != len(query_vectors) or len(index_values) != len(index):
        raise RetrievalError(f"{len(query_vectors)} query vectors with {len(query_values)} values, {len(index)} "
                             f"indexed items with {len(index_values)} values")
    excl = None if exclude_ids is None else np.asarray(exclude_ids, dtype=np.int64).reshape(-1)
    usable, skipped = select_queries(query_values, index_values, exclude_ids=excl)
    if usable.size == 0:
        raise RetrievalError(f"no query can be scored: {skipped['no_value']} have no value of the relevant field, "
                             f"{skipped['no_relevant']} have no relevant item in the index")
    q_codes, i_codes = relevance_codes(query_values, index_values)
    _, ids = index.search(np.asarray(query_vectors)[usable], ks[-1],
                          exclude_ids=None if excl is None else excl[usable])
    retrieved = np.where(ids >= 0, i_codes[np.maximum(ids, 0)], -1)
    hits = retrieved == q_codes[usable, None]
    n_rel = _relevant_counts(q_codes, i_codes, excl)[usable]
    return {"queries": int(usable.size), "skipped": skipped, "recall": recall_from_hits(hits, ks),
            "map": map_from_hits(hits, n_rel)}
