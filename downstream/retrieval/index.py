"""`RetrievalIndex`: the vectors, their metadata rows and info.json as one index that people build, grow, query,
evaluate, save and load. Each part has its own room (vectors, metadata, folder, evaluate); this is their face."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np

from downstream.retrieval.errors import RetrievalError
from downstream.retrieval.evaluate import evaluate_against_self, self_report
from downstream.retrieval.folder import caller_info, new_info, read_folder, save_folder
from downstream.retrieval.metadata import MetadataStore, clean_row
from downstream.retrieval.vectors import (
    VectorIndex,
    as_vectors,
    default_factory,
    faiss_reason,
    l2_normalized,
    make_index,
)


class RetrievalIndex:
    """Vectors in a FAISS index (ids = row numbers) plus their metadata rows in SQLite.

    Make one with `build` or `load`; `add` appends, `search` queries, `save` writes the folder.
    """

    def __init__(self, index: faiss.Index, store: MetadataStore, info: dict, *, folder: Path | None = None):
        self.info = info  # info.json, shared with the vectors, which record their search parameters in it
        self._vectors = VectorIndex(index, info)
        self._store = store
        self._loaded_from = folder  # `save` may replace the folder it was loaded from: growing in place

    @property
    def index(self) -> faiss.Index:
        """The FAISS index."""
        return self._vectors.index

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
        x = as_vectors(embeddings, "embeddings")
        n, dim = x.shape
        if n == 0:
            raise RetrievalError("no embeddings to index")
        if len(rows) != n:
            raise RetrievalError(f"{n} embeddings but {len(rows)} metadata rows")
        user_info = caller_info(info)
        if normalize:
            x = l2_normalized(x, "embeddings")
        factory = factory or default_factory(n, exact_below)
        index = make_index(dim, factory)
        self = cls(index, MetadataStore.empty(), new_info(user_info, dim=dim, normalize=normalize, factory=factory))
        if not index.is_trained:
            self._vectors.train(x, seed)
        self._vectors.make_direct_map()
        self.add(x, rows, _normalized_already=True)
        if self._vectors.tunable():
            self.tune(target_recall=target_recall, k=k_tune, queries=tune_queries, seed=seed, database=x)
        return self

    def add(self, embeddings: np.ndarray, rows: Sequence[dict], *, _normalized_already: bool = False) -> np.ndarray:
        """Append vectors and their metadata; returns their ids. Nothing changes if any input is bad."""
        x = as_vectors(embeddings, "embeddings", self.dim)
        if len(rows) != x.shape[0]:
            raise RetrievalError(f"{x.shape[0]} embeddings but {len(rows)} metadata rows")
        if self.info["normalized"] and not _normalized_already:
            x = l2_normalized(x, "embeddings")
        start = len(self)
        ids = np.arange(start, start + x.shape[0], dtype=np.int64)
        records = [(int(i), *clean_row(r, int(i))) for i, r in zip(ids, rows)]
        try:  # rows and vectors in one transaction: rolled back if a key repeats or FAISS refuses the vectors
            self._store.insert(records, also=lambda: self._vectors.add(x))
        except RuntimeError as e:
            raise RetrievalError(f"FAISS refused the vectors: {faiss_reason(e)}") from e
        self.info["count"] = len(self)
        return ids

    # ---- search parameters ----------------------------------------------------------------------------

    def set_search_params(self, **params: int) -> None:
        """Set FAISS search parameters, e.g. `nprobe=16` (IVF) or `efSearch=64` (HNSW); saved in info.json."""
        self._vectors.set_search_params(**params)

    def tune(
        self, *, target_recall: float = 0.95, k: int = 10, queries: int = 500, seed: int = 0,
        database: np.ndarray | None = None,
    ) -> dict:
        """Pick the smallest nprobe / efSearch whose top-k finds `target_recall` of the exact top-k.

        Queries are `queries` random members, each searched without itself (like a new query from the same
        distribution); ground truth is brute force over `database` (the indexed vectors; reconstructed from
        the index when not given). Returns {"param", "value", "recall", "table": [[value, recall], ...]}.
        """
        return self._vectors.tune(target_recall=target_recall, k=k, queries=queries, seed=seed, database=database)

    # ---- queries --------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._vectors.dim

    def __len__(self) -> int:
        return len(self._vectors)

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
        return self._vectors.search(queries, k, exclude_ids=exclude_ids, batch_size=batch_size)

    def search_by_keys(self, keys: Sequence[str], k: int, *, exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Query with the stored vectors of indexed items (by key), by default without the item itself."""
        qids = np.array([self.lookup_key(key) for key in keys], dtype=np.int64)
        return self.search(self.vectors(qids), k, exclude_ids=qids if exclude_self else None)

    # ---- metadata -------------------------------------------------------------------------------------

    def lookup_key(self, key: str) -> int:
        """The id of the vector stored under `key`; KeyError if none."""
        return self._store.lookup_key(key)

    def vector(self, id: int) -> np.ndarray:
        """The stored (normalised, if the index normalises) embedding of `id`, shape (D,)."""
        return self.vectors([id])[0]

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._vectors.vectors(ids)

    def rows_for(self, ids: Sequence[int] | np.ndarray, *, thumbnails: bool = True) -> list:
        """Metadata dicts for ids: a list for 1-D ids, a list of lists for 2-D (search results); None for -1."""
        return self._store.rows_for(ids, thumbnails=thumbnails)

    def labels(self) -> np.ndarray:
        """Every vector's label, indexed by id; -1 where unlabelled."""
        return self._store.labels(len(self))

    def field_values(self, name: str) -> list:
        """Every vector's value of field `name` (see `row_field`), indexed by id; None where it has none."""
        return self._store.field_values(name, len(self))

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
        return self_report(evaluate_against_self(self, ks, relevant=relevant, queries=queries, seed=seed), ks)

    def evaluate_against_self(
        self, ks: Iterable[int] = (1, 5, 10), *, relevant: str = "label", queries: int | None = None, seed: int = 0
    ) -> dict:
        """`evaluate_self` in the shape of `evaluate_relevance`: {"queries", "skipped", "recall": {k: ...}, "map"}."""
        return evaluate_against_self(self, ks, relevant=relevant, queries=queries, seed=seed)

    # ---- persistence ----------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write index.faiss, meta.sqlite and info.json into `folder`, all or nothing. An existing `folder` is
        replaced only when it is an index this project wrote and `overwrite` is given, or is the folder this index
        was loaded from (saving a grown index in place)."""
        return save_folder(Path(folder), self.index, self._store, self.info, overwrite=overwrite,
                           loaded_from=self._loaded_from)

    @classmethod
    def load(cls, folder: str | os.PathLike, expect: dict | None = None, *, verify: bool = True) -> RetrievalIndex:
        """Open a saved index folder. `expect` ({"fingerprint": ..., "dim": ...}) must agree with info.json.

        `verify` checks the files against the checksums in info.json (reads them once).
        """
        folder = Path(folder)
        index, store, info = read_folder(folder, expect, verify=verify)
        self = cls(index, store, info, folder=folder)
        self._vectors.apply_search_params()
        return self
