"""run.max_minutes and run.fit_to_max_minutes: when to re-measure the update rate, and the schedule length the
rest of the budget holds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("vitssl.trainer")

# Shares of run.max_minutes at which run.fit_to_max_minutes re-measures the update rate; a machine that slows
# down later in the run shortens the schedule again.
FIT_POINTS = (0.03, 0.25, 0.5, 0.75, 0.9)


@dataclass
class TimeBudget:
    """The marks of one launch (not checkpointed): from where the rate is measured, and the points still ahead."""

    fit_mark: tuple[float, int]  # (time, step) from which run.fit_to_max_minutes measures the rate
    fit_points: list[float]
    budget: float  # seconds of run.max_minutes

    @classmethod
    def start(cls, now: float, wall_seconds: float, step: int, run: Any) -> TimeBudget:
        budget = 60 * run.max_minutes
        points = [f for f in FIT_POINTS if f * budget > wall_seconds] if run.fit_to_max_minutes else []
        return cls((now, step), points, budget)

    def fit_due(self, wall_seconds: float, step: int) -> bool:
        return bool(self.fit_points) and wall_seconds >= self.fit_points[0] * self.budget and step - self.fit_mark[1] >= 5

    def fitted(self, now: float, step: int, wall_seconds: float) -> None:
        self.fit_mark = (now, step)
        self.fit_points = [f for f in self.fit_points if f * self.budget > wall_seconds]


def fitted_schedule(*, step: int, remaining: float, rate: float, total_steps: int, planned_steps: int,
                    planned_warmup: int, warmup_in_steps: bool, max_minutes: float,
                    is_main: bool) -> tuple[int, int] | None:
    """The schedule (updates, warmup) that the `remaining` seconds hold at `rate` updates/s, or None when the
    current length stays. Re-fitted in both directions (a busy moment at one measurement must not waste the rest
    of the budget), never beyond the recipe's own length."""
    # Shorten to what the rest of the budget holds with a 5% margin (checkpoints, the final export, a machine
    # that slows down later). Lengthen only past 10% more, with a 10% margin: a late lengthening that the
    # budget cannot hold would cut the cosine off after all.
    total = min(planned_steps, max(step + 1, int(step + 0.95 * remaining * rate)))
    if total >= total_steps:
        longer = min(planned_steps, int(step + 0.9 * remaining * rate))
        total = longer if longer > 1.1 * total_steps else total_steps
    if total == total_steps:
        return None
    if is_main:
        log.warning(
            f"run.max_minutes={max_minutes:g} holds about {total} of the recipe's {planned_steps} "
            f"updates (measured {rate:.2f} updates/s on the slowest rank): the lr schedule now ends at update "
            f"{total} (was {total_steps})"
        )
    # optim.warmup_steps counts updates: the first updates need it however long the run turns out to be,
    # so it is kept (at most a quarter of the fitted run); optim.warmup_epochs is a share of the plan and
    # shrinks with it.
    if warmup_in_steps:
        return total, min(planned_warmup, total // 4)
    return total, round(planned_warmup * total / planned_steps)
