"""How well an index retrieves: recall@k and mAP@k where an indexed item is relevant to a query when a field
(label, key or any metadata field: `parse_relevant`) has the query's value. The hit matrix made here is scored by
`downstream.metrics`, like every other evaluation in the house."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from downstream.metrics import map_from_hits, recall_from_hits
from downstream.retrieval.errors import RetrievalError


class SearchableIndex(Protocol):
    """What evaluation needs of an index (`RetrievalIndex` has it)."""

    def __len__(self) -> int: ...

    def search(self, queries: np.ndarray, k: int, *, exclude_ids: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]: ...

    def vectors(self, ids: np.ndarray) -> np.ndarray: ...

    def field_values(self, name: str) -> list: ...


def parse_relevant(spec: str) -> str:
    """`label`, `key` or `field:NAME` (what makes an indexed item relevant to a query) -> the field compared."""
    if spec in ("label", "key"):
        return spec
    if isinstance(spec, str) and spec.startswith("field:") and spec[len("field:"):].strip():
        return spec[len("field:"):].strip()
    raise RetrievalError(f"relevant={spec!r}: use label, key or field:NAME (NAME: source, source_stem, shard, "
                         "caption, label_name or any field of the samples' .json)")


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
    index: SearchableIndex,
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


def evaluate_against_self(
    index: SearchableIndex, ks: Iterable[int], *, relevant: str, queries: int | None, seed: int
) -> dict:
    """Each member of `index` with a relevant other member (or a seeded sample of `queries` of them) queries the
    rest, itself excluded; `evaluate_relevance`'s result with the members that could not be scored as `skipped`."""
    values = index.field_values(parse_relevant(relevant))
    candidates, skipped = select_queries(values, values, exclude_ids=np.arange(len(index), dtype=np.int64))
    if candidates.size == 0:
        raise RetrievalError(f"no member can be scored against the others by {relevant}: "
                             f"{skipped['no_value']} have no value, {skipped['no_relevant']} share theirs with "
                             "no other member")
    if queries is not None and queries < candidates.size:
        candidates = np.sort(np.random.default_rng(seed).choice(candidates, queries, replace=False))
    got = evaluate_relevance(index, index.vectors(candidates), [values[i] for i in candidates], values, ks,
                             exclude_ids=candidates)
    return {**got, "skipped": skipped}


def self_report(got: dict, ks: Sequence[int]) -> dict:
    """`evaluate_against_self`'s result flat, as `RetrievalIndex.evaluate_self` reports it: recall@k for each
    of the sorted `ks`, mAP@max(ks), queries and skipped."""
    out = {f"recall@{k}": v for k, v in got["recall"].items()}
    out[f"mAP@{ks[-1]}"] = got["map"]
    out["queries"] = got["queries"]
    out["skipped"] = got["skipped"]
    return out
