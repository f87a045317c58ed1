"""PNG pictures of downstream results, each function drawing one picture and writing it atomically.

Figures are made with `matplotlib.figure.Figure` (no pyplot), so drawing never touches a global backend or
opens a window, and works in any thread or process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from shards.atomic import atomic_path

__all__ = ["confusion_matrix_png"]

_MAX_ANNOTATED = 20  # classes up to which every cell carries its count


def _png_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"picture path must end in .png, got {path}")
    return path


def confusion_matrix_png(
    cm: Sequence[Sequence[int]] | np.ndarray,
    path: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """Draw a confusion matrix (rows = true class, columns = predicted) and write it as a PNG; returns the path.

    Cells are coloured by the row-normalised rate (each true class sums to 1, so rare classes read as clearly
    as common ones) and, up to 20 classes, annotated with their counts; each row is labelled with its recall.
    """
    path = _png_path(path)
    counts = np.asarray(cm)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"a confusion matrix must be square (C, C) with C >= 1, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError("a confusion matrix holds non-negative integer counts")
    c = counts.shape[0]
    names = [str(i) for i in range(c)] if classes is None else [str(n) for n in classes]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for a {c}x{c} confusion matrix")
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)

    side = min(max(4.0, 0.45 * c + 2.5), 40.0)
    fig = Figure(figsize=(side + 1.2, side), dpi=dpi)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= _MAX_ANNOTATED:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ticks = np.arange(c)
    fontsize = 8 if c <= 30 else 5
    ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
    recall = [f"{n} ({rates[i, i]:.2f})" if totals[i, 0] else f"{n} (-)" for i, n in enumerate(names)]
    ax.set_yticks(ticks, recall, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (recall)")
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else 0.0
    ax.set_title(f"{title + ': ' if title else ''}top-1 {accuracy:.4f} on {total} samples", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
