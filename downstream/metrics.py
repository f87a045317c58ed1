"""Classification metrics in one place: confusion matrix, per-class accuracy, top-k with ties counted against,
and mean +- std over repeated runs; and the retrieval metrics (recall@k, mAP@k) over a ranked relevance matrix.

Every classifier here (linear probes, k-NN, heads, fine-tuning, zero-shot, label efficiency) reports through
these functions, so one top-1 means the same thing everywhere. Retrieval scores the same way whatever makes a
result relevant (same label, same key, same source file stem): `downstream.retrieval` turns that into a (Q, k) hit
matrix and reports through `recall_from_hits` and `map_from_hits`; `recall_at_k` and `mean_average_precision` are
the same over labels, and `approximate_recall` compares an approximate index's top-k with the exact one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["approximate_recall", "classification_metrics", "confusion_matrix", "map_from_hits",
           "mean_average_precision", "mean_std", "per_class_accuracy", "recall_at_k", "recall_from_hits",
           "topk_accuracy"]


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    flat = labels.long().cpu() * num_classes + predictions.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> list[float | None]:
    """Recall of each class from a confusion matrix; None for a class with no samples."""
    totals = cm.sum(dim=1)
    return [float(cm[c, c] / totals[c]) if totals[c] > 0 else None for c in range(cm.shape[0])]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose true class ranks within the top k of `scores` (N, C).

    Ties count against: the rank of the true class is the number of *other* classes scoring >= it,
    so a class that merely ties at zero (e.g. no k-NN neighbour voted for it) is not a top-k hit.
    """
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the number of classes ({scores.shape[1]})")
    true_score = scores.gather(1, labels.long().view(-1, 1))
    rank = (scores >= true_score).sum(dim=1) - 1
    return float((rank < k).float().mean())


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top1 (argmax), top5 (None below 5 classes), per-class accuracy, confusion matrix, predictions.

    top1 is the accuracy of the argmax predictions (the first of tied maxima), so it agrees with the confusion
    matrix; top5 counts ties against the true class (`topk_accuracy`).
    """
    scores = scores.detach().float().cpu()
    labels = labels.long().cpu()
    predictions = scores.argmax(dim=1)
    cm = confusion_matrix(predictions, labels, num_classes)
    return {
        "top1": float((predictions == labels).float().mean()),
        "top5": topk_accuracy(scores, labels, 5) if num_classes >= 5 else None,
        "per_class_accuracy": per_class_accuracy(cm),
        "confusion_matrix": cm,
        "predictions": predictions,
    }


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and *sample* standard deviation (n - 1 in the denominator) of repeated measurements;
    the std is None for a single value (one run says nothing about the spread)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std of no values")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _hit_matrix(hits: object) -> np.ndarray:
    h = np.asarray(hits, dtype=bool)
    if h.ndim != 2 or h.shape[0] == 0 or h.shape[1] == 0:
        raise ValueError(f"hits must be a non-empty (queries, k) matrix, got shape {h.shape}")
    return h


def recall_from_hits(hits: object, ks: Sequence[int]) -> dict[int, float]:
    """For each k, the fraction of queries with at least one relevant result among their top k.

    `hits` (Q, K) is True where the result at that rank (best first) is relevant to the query.
    """
    h = _hit_matrix(hits)
    out = {}
    for k in ks:
        if not 1 <= k <= h.shape[1]:
            raise ValueError(f"recall@{k} needs 1 <= k <= {h.shape[1]} retrieved results per query")
        out[int(k)] = float(h[:, :k].any(axis=1).mean())
    return out


def map_from_hits(hits: object, num_relevant: object = None) -> float:
    """mAP@K of ranked relevance `hits` (Q, K): the mean over queries of sum_{relevant ranks i} precision@i,
    divided by min(K, R) when `num_relevant` R per query is given (a perfect top-K scores 1), else by the number
    of relevant results found (AP of the returned list only). A query with nothing to divide by scores 0."""
    h = _hit_matrix(hits).astype(np.float64)
    q, k = h.shape
    precision = np.cumsum(h, axis=1) / np.arange(1, k + 1)
    if num_relevant is None:
        denom = h.sum(axis=1)
    else:
        n_rel = np.asarray(num_relevant, dtype=np.float64).reshape(-1)
        if n_rel.shape[0] != q:
            raise ValueError(f"num_relevant has {n_rel.shape[0]} entries for {q} queries")
        denom = np.minimum(k, n_rel)
    ap = np.divide((precision * h).sum(axis=1), denom, out=np.zeros(q), where=denom > 0)
    return float(ap.mean())


# ---- the same over labels: a result is relevant when it has the query's label ----


def _label_arrays(query_labels: Any, retrieved_labels: Any) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(query_labels).reshape(-1)
    r = np.asarray(retrieved_labels)
    if r.ndim != 2 or r.shape[0] != q.shape[0]:
        raise ValueError(f"retrieved_labels must be (Q, k) with Q = {q.shape[0]} queries, got {r.shape}")
    if q.shape[0] == 0:
        raise ValueError("no queries to evaluate")
    return q, r


def recall_at_k(query_labels: Any, retrieved_labels: Any, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries with at least one result of their own label among the top k, for each k.

    `retrieved_labels` is (Q, K), best first; mark missing results with a label no query has (e.g. -1).
    """
    q, r = _label_arrays(query_labels, retrieved_labels)
    for k in ks:
        if not 1 <= k <= r.shape[1]:
            raise ValueError(f"recall@{k} needs 1 <= k <= {r.shape[1]} retrieved results per query")
    return recall_from_hits(r == q[:, None], ks)


def mean_average_precision(
    query_labels: Any, retrieved_labels: Any, *, k: int | None = None, num_relevant: Any = None
) -> float:
    """mAP@k over the returned top-k ranking (same label = relevant).

    AP@k = sum over relevant ranks i <= k of precision@i, divided by min(k, R) when `num_relevant` R per query
    is given (the standard normalisation; a perfect top-k scores 1), else by the number of relevant results
    found in the top k (AP of the returned list only). A query with no relevant result scores 0.
    """
    q, r = _label_arrays(query_labels, retrieved_labels)
    k = r.shape[1] if k is None else k
    if not 1 <= k <= r.shape[1]:
        raise ValueError(f"mAP@{k} needs 1 <= k <= {r.shape[1]} retrieved results per query")
    n_rel = None
    if num_relevant is not None:
        n_rel = np.asarray(num_relevant, dtype=np.float64).reshape(-1)
        if n_rel.shape[0] != q.shape[0]:
            raise ValueError(f"num_relevant has {n_rel.shape[0]} entries for {q.shape[0]} queries")
    return map_from_hits(r[:, :k] == q[:, None], n_rel)


def approximate_recall(approx_ids: Any, exact_ids: Any, k: int) -> float:
    """Fraction of the exact top-k ids that the approximate top-k also returns (mean over queries)."""
    a, e = np.asarray(approx_ids), np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ValueError(f"approx_ids {a.shape} and exact_ids {e.shape} must be (Q, >=k) for the same Q")
    if not 1 <= k <= min(a.shape[1], e.shape[1]):
        raise ValueError(f"k={k} needs at least k columns in both, got {a.shape[1]} and {e.shape[1]}")
    a, e = a[:, :k], e[:, :k]
    valid = int((e >= 0).sum())
    if valid == 0:
        raise ValueError("exact_ids hold no results")
    found = 0
    for lo in range(0, a.shape[0], 1024):  # (chunk, k, k) comparisons stay small
        ea = e[lo:lo + 1024]
        found += int(((a[lo:lo + 1024, :, None] == ea[:, None, :]).any(axis=1) & (ea >= 0)).sum())
    return found / valid
