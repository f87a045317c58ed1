"""The vectors of a retrieval index: a FAISS index whose ids are row numbers, compared by inner product.

Here live the index's choice of factory, its training, its search-time parameter (`nprobe` for IVF, `efSearch`
for HNSW) and the tuning that picks it, L2 normalisation, batched search with one id left out per query, and
the GPU copy used for searching when FAISS has GPUs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from downstream.metrics import approximate_recall
from downstream.retrieval.errors import RetrievalError


def default_factory(n: int, exact_below: int = 100_000) -> str:
    """The FAISS factory string used for `n` vectors when the caller names none.

    IVF rather than HNSW above the threshold: at equal recall IVF builds faster (bench/README.md, retrieval),
    needs no per-vector graph links, trains its k-means on a GPU, and keeps `add` cheap. nlist ~ 4 sqrt(n), at
    least 39 training points per list (FAISS's own floor).
    """
    if n < exact_below:
        return "Flat"
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 39))
    return f"IVF{nlist},Flat"


def faiss_gpu_count() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu, whose builds have no GPU symbols at all."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def faiss_reason(e: RuntimeError) -> str:
    """The line of a FAISS exception that says what went wrong (the rest is a C++ stack location)."""
    return str(e).strip().splitlines()[-1]


def as_vectors(x: Any, what: str, dim: int | None = None) -> np.ndarray:
    """`x` as a contiguous float32 (N, D) array of finite reals (a single row of length `dim` becomes (1, D)),
    or a `RetrievalError` naming `what`."""
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


def drop_excluded(scores: np.ndarray, ids: np.ndarray, excl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    database = as_vectors(database, "database")
    queries = as_vectors(queries, "queries", database.shape[1])
    extra = 0 if exclude_ids is None else 1
    s, i = faiss.knn(queries, database, k + extra, metric=faiss.METRIC_INNER_PRODUCT)
    if exclude_ids is not None:
        s, i = drop_excluded(s, i, np.asarray(exclude_ids, dtype=np.int64).reshape(-1))
    return s, i


def make_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product FAISS index of `factory` for `dim`-d vectors."""
    if "IDMap" in factory:
        raise RetrievalError(f"factory {factory!r}: ids are row numbers here, leave out IDMap")
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise RetrievalError(f"FAISS cannot make factory {factory!r} for dim {dim}: {faiss_reason(e)}") from e


# Candidate nprobe values in steps of ~1.5x: the smallest value that reaches the target is the fastest, so a
# coarse grid (doubling) can cost up to 2x in query throughput.
_NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
_EF_SEARCH_GRID = (12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)


class VectorIndex:
    """A FAISS index (ids = row numbers) with its search parameters and, when FAISS has GPUs, a GPU copy to search.

    `info` is the index's info.json dict, shared with the `RetrievalIndex` that owns both: the vectors read
    `normalized` and `factory` from it and record `search_params` and `tuning` in it.
    """

    def __init__(self, index: faiss.Index, info: dict):
        self.index = index
        self.info = info
        self._gpu_index: faiss.Index | None = None
        self._gpu_failed = False

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    # ---- building -------------------------------------------------------------------------------------

    def train(self, x: np.ndarray, seed: int) -> None:
        """Train an untrained index (IVF's k-means, on a GPU when there is one) on a seeded sample of `x`."""
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
                                 f"{faiss_reason(e)}") from e
        finally:
            if gpu_clustering is not None:
                faiss.extract_index_ivf(self.index).clustering_index = None

    def make_direct_map(self) -> None:
        """IVF: an id -> list position map, so that stored vectors can be given back (`vectors`)."""
        with contextlib.suppress(RuntimeError):
            faiss.extract_index_ivf(self.index).make_direct_map()

    def add(self, x: np.ndarray) -> None:
        """Append checked (and, if the index normalises, normalised) vectors; FAISS's RuntimeError passes up."""
        self.index.add(x)
        self._gpu_index = None

    # ---- search parameters ----------------------------------------------------------------------------

    def tunable(self) -> str | None:
        """The search-time knob FAISS knows for this index: "nprobe" (IVF), "efSearch" (HNSW) or None."""
        ps = faiss.ParameterSpace()
        ps.initialize(self.index)
        names = {ps.parameter_ranges.at(i).name for i in range(ps.parameter_ranges.size())}
        return next((name for name in ("nprobe", "efSearch") if name in names), None)

    def apply_search_params(self) -> None:
        """Set the search parameters info.json records (a loaded index's) on the FAISS index."""
        for name, value in self.info.get("search_params", {}).items():
            faiss.ParameterSpace().set_index_parameter(self.index, name, int(value))

    def set_search_params(self, **params: int) -> None:
        """`RetrievalIndex.set_search_params`: each recorded in info's search_params."""
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
        """`RetrievalIndex.tune`; the table it walked is recorded in info's tuning."""
        param = self.tunable()
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
            values = [v for v in _NPROBE_GRID if v < nlist] + [nlist]
        else:
            values = [k] + [v for v in _EF_SEARCH_GRID if v > k]
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

    def search(self, queries: np.ndarray, k: int, *, exclude_ids: Sequence[int] | np.ndarray | None = None,
               batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """`RetrievalIndex.search`: queries checked and, if the index normalises, normalised."""
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise RetrievalError(f"k must be a positive integer, got {k!r}")
        q = as_vectors(queries, "queries", self.dim)
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
                s, i = drop_excluded(s, i, excl[lo:hi])
            scores[lo:hi], ids[lo:hi] = s, i
        return scores, ids

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of `ids`, (len(ids), D)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise RetrievalError(f"id {int(bad)} is not in the index (0..{len(self) - 1})")
        try:
            return self.index.reconstruct_batch(ids)
        except RuntimeError as e:
            raise RetrievalError(f"{self.info['factory']!r} cannot give back stored vectors: "
                                 f"{faiss_reason(e)}") from e
