"""What every rank must agree on after an update, reduced across the ranks in one all-reduce.

Clock- and signal-driven decisions differ per rank, and so do sample counts; summing them once makes them shared
(a flag is set when it is set on any rank).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


def rank_sums(accelerator: Any, *values: float | bool) -> list[float]:
    """Each value summed over the ranks, in one all-reduce (none with one process: no device round trip)."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def any_rank(accelerator: Any, *flags: bool) -> list[bool]:
    """Each flag True when it is True on any rank (skip/stop decisions every rank must share)."""
    return [v > 0 for v in rank_sums(accelerator, *flags)]


@dataclass(frozen=True)
class RankDecision:
    """One update's counts (summed over the ranks) and decisions (set on any rank)."""

    samples: int = 0  # samples trained (pads standing in for unreadable samples not counted)
    skipped: int = 0  # unreadable samples the stream skipped
    signalled: bool = False  # SIGTERM/SIGINT received
    checkpoint_due: bool = False  # run.checkpoint_every_minutes has passed since the last checkpoint
    time_up: bool = False  # run.max_minutes is spent
    fit_due: bool = False  # run.fit_to_max_minutes re-measures the update rate now
    eval_due: bool = False  # the online k-NN is due
    collapse: bool = False  # a collapse alarm fired with alarm.stop_on_collapse

    def shared(self, accelerator: Any) -> RankDecision:
        """This rank's view summed with every other rank's, in one all-reduce."""
        names = [f.name for f in dataclasses.fields(self)]
        sums = rank_sums(accelerator, *(getattr(self, n) for n in names))
        counts = {"samples", "skipped"}
        return RankDecision(**{n: int(v) if n in counts else v > 0 for n, v in zip(names, sums)})
