"""k-NN classification by DINO's protocol on frozen features: the house's one weighted vote (`pretrain.knn`,
re-exported here as `knn_scores`), with the checks and the report a probe has."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from downstream.probe.inputs import prepare
from downstream.probe.result import ProbeResult, result_from_scores
from downstream.retrieval import RetrievalError
from pretrain.knn import knn_scores

__all__ = ["knn_classify", "knn_scores"]  # knn_scores: pretrain.knn's


def _refuse_zero_rows(x: torch.Tensor, what: str) -> None:
    """An all-zero row has no direction to compare by cosine: a `RetrievalError` naming `what` and the row."""
    norms = np.linalg.norm(np.ascontiguousarray(x.float().cpu().numpy(), dtype=np.float32), axis=1)
    if (norms == 0).any():
        raise RetrievalError(f"{what} row {int(np.flatnonzero(norms == 0)[0])} is all zeros: it has no direction "
                             "to compare by cosine")


def knn_classify(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    k: int = 20,
    temperature: float = 0.07,
    query_batch: int = 4096,
    use_gpu: bool | None = None,
) -> ProbeResult:
    """k-NN classification by DINO's protocol (k=20, T=0.07, weighted vote; see `knn_scores`).

    top-5 counts ties against the true class (a class no neighbour voted for is never a hit), where DINO's
    sort breaks ties arbitrarily; top-1 is the argmax of the votes.
    """
    started = time.perf_counter()
    train_x, train_y, test_x, test_y, num_classes = prepare(
        train_features, train_labels, test_features, test_labels, num_classes, classes
    )
    _refuse_zero_rows(train_x, "train features")
    _refuse_zero_rows(test_x, "query features")
    scores = knn_scores(train_x, train_y, test_x, num_classes=num_classes, k=k, temperature=temperature,
                        query_batch=query_batch, use_gpu=use_gpu)
    return result_from_scores(
        "knn", scores, test_y,
        num_classes=num_classes, num_train=len(train_x), classes=classes, seconds=time.perf_counter() - started,
        settings={"k": min(k, len(train_x)), "temperature": temperature, "metric": "cosine",
                  "index": "faiss.IndexFlatIP"},
        selection="none: fixed k and temperature",
    )
