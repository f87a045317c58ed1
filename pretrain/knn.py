"""DINO's weighted k-NN vote (Caron et al. 2021, Sec. 4.1; their `eval_knn.py`): the one k-NN of the house, used by
the online evaluator (`pretrain.evaluate`), the offline probe (`downstream.probe`) and label efficiency.

It lives in pretrain because the online evaluator may not import downstream; downstream imports it from here.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

__all__ = ["knn_scores", "knn_top1", "unit_rows"]


def unit_rows(x: torch.Tensor) -> np.ndarray:
    """Rows of unit length as a float32 array FAISS takes (a copy); an all-zero row stays zero (similarity 0)."""
    rows = np.ascontiguousarray(x.float().cpu().numpy(), dtype=np.float32).copy()
    faiss.normalize_L2(rows)
    return rows


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    query_batch: int = 4096,
    use_gpu: bool | None = None,
) -> torch.Tensor:
    """(Q, C) class scores: score[q, c] = sum over the k nearest bank rows of class c of exp(cos_sim / temperature).

    Rows are L2-normalised; neighbours come from an exact FAISS inner-product index (IndexFlatIP), searched
    `query_batch` queries at a time so memory stays bounded for millions of bank rows. `use_gpu`: the index on
    every FAISS GPU; None = when the build has any (faiss-cpu builds have no GPU symbols at all).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if query_batch < 1:
        raise ValueError(f"query_batch must be >= 1, got {query_batch}")
    k = min(k, len(bank))
    index = faiss.IndexFlatIP(bank.shape[1])
    if use_gpu or (use_gpu is None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(unit_rows(bank))
    labels = bank_labels.long().cpu()
    scores = torch.zeros(len(query), num_classes, dtype=torch.float32)
    for start in range(0, len(query), query_batch):
        queries = unit_rows(query[start : start + query_batch])
        sims, ids = index.search(queries, k)
        weights = torch.from_numpy(sims).div_(temperature).exp_()
        scores[start : start + len(queries)].scatter_add_(1, labels[torch.from_numpy(ids)], weights)
    return scores


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
             *, k: int = 20, temperature: float = 0.07) -> float:
    """Fraction of queries whose vote's argmax (the first of tied maxima) is their label."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    # On the CPU, as the online evaluation always ran: a training run's GPUs stay its own.
    scores = knn_scores(bank, bank_labels, query, num_classes=num_classes, k=k, temperature=temperature, use_gpu=False)
    return float((scores.argmax(dim=1) == query_labels.long().cpu()).float().mean())
