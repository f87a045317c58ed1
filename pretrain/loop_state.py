"""The state of one launch's training loop that is not checkpointed: the log window, the update in the making,
the clock and the time budget's marks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pretrain.time_budget import TimeBudget


@dataclass
class Window:
    """What the next metrics row averages: the loss of the micro-batches since the previous row, and the rate."""

    loss: Any = 0.0  # a sum of loss tensors (finite ones only), read once per row
    n: Any = 0  # how many were added (a tensor too once one was)
    t0: float = 0.0
    samples: int = 0
    micro: int = 0  # micro-batches since the row (a plain count: is there anything to average?)

    def add_loss(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        self.loss = self.loss + torch.where(finite, loss.float(), 0.0)
        self.n = self.n + finite.int()
        self.micro += 1

    def mean(self) -> float:
        """The mean finite loss of the window (one host read); NaN when none was finite."""
        n = int(self.n)
        return float(self.loss) / n if n else float("nan")

    def restart(self, now: float) -> None:
        self.loss, self.n, self.t0, self.samples, self.micro = 0.0, 0, now, 0, 0


@dataclass
class Update:
    """One optimizer update in the making, over its accumulated micro-batches."""

    finite: Any = None  # a device flag: every micro-batch's loss was finite (read once, at the update)
    samples: int = 0
    skipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def count(self, batch: dict) -> None:
        """Samples trained: pads (duplicates standing in for unreadable samples) are not counted."""
        self.samples += batch["real"] if "real" in batch else len(batch["index"])
        self.skipped += int(batch.get("skipped", 0))


@dataclass
class LoopState:
    """The state of one launch's training loop that is not checkpointed (the clock, the log window, the progress
    bar, the run.fit_to_max_minutes marks)."""

    t_start: float
    time_budget: TimeBudget
    last_checkpoint_time: float
    window: Window = field(default_factory=Window)
    final_loss: float = float("nan")
    bad_in_a_row: int = 0
    stopped: str = ""
    progress: Any = None

    @classmethod
    def start(cls, wall_seconds: float, step: int, run: Any) -> LoopState:
        now = time.monotonic()
        return cls(now - wall_seconds, TimeBudget.start(now, wall_seconds, step, run), now)
