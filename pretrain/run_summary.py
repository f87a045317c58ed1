"""What a run reports at its end: TrainResult, kept as train_summary.json in the run folder."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards.atomic import write_text_atomic


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    epochs_done: int
    final_loss: float
    checkpoint: Path | None
    backbone_dir: Path | None
    nonfinite_skipped: int
    samples_seen: int
    wall_seconds: float
    pictures: list[Path] = field(default_factory=list)
    # why the run ended before its schedule ("", "max_minutes", "signal", "collapse")
    stopped_early: str = ""
    skipped_samples: int = 0  # unreadable samples the stream skipped, all ranks, whole run
    skipped_per_epoch: list[int] = field(default_factory=list)
    # online k-NN top-1 (pretrain.evaluate): best and last with their steps, the random-init baseline ("init"), the
    # evaluations' count and seconds; {} when off
    online_knn: dict[str, Any] = field(default_factory=dict)
    collapse_alarms: list[dict[str, Any]] = field(default_factory=list)  # alarms that fired: signal, step, text

    def summary(self) -> dict[str, Any]:
        """As train_summary.json holds it: paths as strings, a missing loss as null (NaN is not JSON)."""
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        out["pictures"] = [str(p) for p in self.pictures]
        if not math.isfinite(out["final_loss"]):
            out["final_loss"] = None
        return out


def summary_path(out_dir: Path) -> Path:
    return out_dir / "train_summary.json"


def write_summary(result: TrainResult) -> None:
    write_text_atomic(summary_path(result.out_dir), json.dumps(result.summary(), indent=2, allow_nan=False))


def read_summary(out_dir: Path) -> TrainResult:
    """The result a finished run wrote (the inverse of `write_summary`)."""
    s = json.loads(summary_path(out_dir).read_text())
    return TrainResult(
        **{**s, "out_dir": Path(s["out_dir"]),
           "final_loss": float("nan") if s["final_loss"] is None else s["final_loss"],
           "checkpoint": Path(s["checkpoint"]) if s.get("checkpoint") else None,
           "backbone_dir": Path(s["backbone_dir"]) if s.get("backbone_dir") else None,
           "pictures": [Path(x) for x in s.get("pictures", [])]})
