"""What every probe, k-NN and fine-tune reports: `ProbeResult`, which writes itself as JSON + a confusion PNG."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from downstream.metrics import classification_metrics
from downstream.visualize import confusion_matrix_png
from shards.atomic import write_text_atomic

__all__ = ["ProbeResult", "result_from_scores"]


@dataclass
class ProbeResult:
    """What a probe or k-NN reports; every protocol gives the same shape.

    `settings` holds the protocol's own knobs (lr/epochs/batch_size for a linear probe, k/temperature for
    k-NN); `sweep` the candidates model selection saw, `selection` how the reported one was chosen.
    `to_dict()` / `to_json()` give everything but the trained classifier; `save(folder)` writes JSON + PNG.
    """

    protocol: str
    top1: float
    top5: float | None
    num_classes: int
    num_train: int
    num_test: int
    per_class_accuracy: list[float | None]
    confusion_matrix: list[list[int]]
    settings: dict = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)
    selection: str = ""
    classes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    classifier: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "classifier"}
        return copy.deepcopy(d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, folder: str | os.PathLike, name: str | None = None) -> dict[str, Path]:
        """Write `folder/<name>.json` and the confusion matrix `folder/<name>_confusion.png` (each atomically;
        `name` defaults to the protocol); returns their paths."""
        folder = Path(folder)
        name = name or self.protocol
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad result name {name!r}: use a plain file stem")
        paths = {"json": folder / f"{name}.json", "confusion_png": folder / f"{name}_confusion.png"}
        write_text_atomic(paths["json"], self.to_json() + "\n")
        title = f"{self.protocol} ({self.num_train} train / {self.num_test} test)"
        confusion_matrix_png(np.asarray(self.confusion_matrix, dtype=np.int64), paths["confusion_png"],
                             classes=self.classes or None, title=title)
        return paths


def result_from_scores(
    protocol: str, scores: torch.Tensor, test_y: torch.Tensor, *, num_classes: int, num_train: int,
    classes: Sequence[str] | None, seconds: float, classifier: nn.Module | None = None, **extra,
) -> ProbeResult:
    """Metrics of class scores against labels, as the ProbeResult every protocol (and fine-tuning) reports."""
    metrics = classification_metrics(scores, test_y, num_classes)
    names = list(classes or [])
    if names and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return ProbeResult(
        protocol=protocol,
        top1=metrics["top1"],
        top5=metrics["top5"],
        num_classes=num_classes,
        num_train=num_train,
        num_test=len(test_y),
        per_class_accuracy=metrics["per_class_accuracy"],
        confusion_matrix=metrics["confusion_matrix"].tolist(),
        classes=names,
        seconds=round(seconds, 3),
        classifier=classifier,
        **extra,
    )
