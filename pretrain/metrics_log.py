"""metrics.jsonl: one row per logged update, written by the main process (and sent to the trackers), cut back to
a checkpoint on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pretrain.checkpoint import TrainerState
from pretrain.curves import curve_png
from shards.atomic import write_text_atomic


class MetricsLog:
    def __init__(self, path: Path, accelerator: Any, is_main: bool):
        self.path, self.accelerator, self.is_main = path, accelerator, is_main

    def append(self, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["step"])

    def rows(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def truncate_to(self, state: TrainerState) -> None:
        """On resume, drop log lines past the checkpoint (they will be redone). Progress is compared in samples:
        a relaunch with another global batch numbers its steps differently."""
        if not self.is_main or not self.path.is_file():
            return

        def done(row: dict) -> bool:
            if "samples_seen" in row:
                return row["samples_seen"] <= state.samples_seen
            return row.get("step", 0) <= state.step

        kept = [ln for ln in self.path.read_text().splitlines() if ln and done(json.loads(ln))]
        write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))


def last_logged_loss(metrics_path: Path) -> float:
    """The loss of the last row of metrics.jsonl (NaN when there is none)."""
    if metrics_path.is_file():
        for line in reversed(metrics_path.read_text().splitlines()):
            row = json.loads(line) if line.strip() else {}
            if isinstance(row.get("loss"), (int, float)):
                return float(row["loss"])
    return float("nan")


def loss_curve_png(metrics_path: Path, out: Path) -> Path | None:
    if not metrics_path.is_file():
        return None
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    if len(rows) < 2:
        return None
    return curve_png([r["step"] for r in rows], [r["loss"] for r in rows], out, ylabel="loss", title="training loss")
