"""What watches a run while it trains: the online k-NN (pretrain.evaluate) and the collapse alarms
(pretrain.alarms), which read the rows the trainer logs."""

from __future__ import annotations

from typing import Any

from pretrain.alarms import CollapseAlarms
from pretrain.evaluate import OnlineEvaluator
from pretrain.metrics_log import MetricsLog
from pretrain.recipe import Recipe


class Watchers:
    def __init__(self, recipe: Recipe, accelerator: Any, transform: Any, out_dir: Any, *, sharded: bool,
                 is_main: bool):
        d = recipe.data
        self.recipe, self.is_main = recipe, is_main
        # The evaluator only reads the backbone.
        self.evaluator = OnlineEvaluator(
            recipe.eval, train_source=d.train, out_dir=out_dir, accelerator=accelerator,
            transform=transform, num_workers=d.num_workers,
            max_bad_fraction=d.max_bad_fraction, allow_pipe=d.allow_pipe,
        )
        if sharded and recipe.eval.enabled:
            self.evaluator.off_reason = "run.fsdp=true: the online k-NN does not embed with a sharded backbone yet"
        self.alarms: CollapseAlarms | None = None  # made in start(), when the warmup length is known
        self.eval_row: dict[str, float] = {}  # evaluation numbers waiting for the next logged row
        self.collapse_pending = False  # an alarm fired on the main process: every rank stops at the next update

    def start(self, backbone: Any, step: int, warmup_steps: int, metrics: MetricsLog) -> None:
        """The collapse alarms (with what a resumed run logged before) and the online k-NN (which keeps a fresh
        run's starting weights for its random-init baseline)."""
        a = self.recipe.alarm
        self.alarms = CollapseAlarms(a, after_steps=a.after_steps if a.after_steps >= 0 else warmup_steps)
        if self.is_main and step > 0 and metrics.path.is_file():
            self.alarms.replay(metrics.rows())
        self.eval_row = {}
        self.collapse_pending = False
        self.evaluator.begin(backbone, fresh=step == 0)

    def evaluate(self, backbone: Any, step: int) -> None:
        """The online k-NN of the backbone as it is now (every rank: the embedding is collective)."""
        self.eval_row.update(self.evaluator.evaluate(backbone, step))

    def take_eval_row(self) -> dict[str, float]:
        """knn_top1, feat_rank, eval_seconds when an evaluation ran since the last row; then forgotten."""
        row, self.eval_row = self.eval_row, {}
        return row

    def watch(self, row: dict[str, Any]) -> None:
        """The alarms read the row just logged (main process); with alarm.stop_on_collapse a firing stops the run."""
        if self.alarms is None or not self.is_main:
            return
        if self.alarms.observe(row) and self.recipe.alarm.stop_on_collapse:
            self.collapse_pending = True

    def fired(self) -> list[dict[str, Any]]:
        return list(self.alarms.fired_dicts()) if self.alarms is not None and self.is_main else []
