"""Collapse alarms: read the rows the trainer logs to metrics.jsonl and say what fired.

A loss or entropy near its ceiling and climbing while the embedding rank falls, a rank or the online k-NN
falling from its best (`CollapseAlarms.observe`); each finding names the signal, the step and the usual causes.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pretrain.recipe import AlarmConfig

log = logging.getLogger("vitssl.evaluate")  # the evaluator's name, as before the move: log filters keep working

# Higher is healthier: an alarm when one falls below its best. (key, what it is, the AlarmConfig field to use)
_FALLING = (
    ("embed_rank", "effective rank of the objective's batch embeddings", "rank_drop"),
    ("feat_rank", "effective rank of the held-out features", "rank_drop"),
    ("knn_top1", "online k-NN top-1", "knn_drop"),
)
_SMOOTH = 3  # per-row signals are read as the median of the last 3 logged values: one noisy batch is not an alarm
CAUSES = ("usual causes: an lr too high or a warmup too short (optim.base_lr, optim.warmup_epochs); for DINO "
          "also a teacher temperature too high or warmed up too fast (objective.dino.teacher_temp, "
          "warmup_teacher_temp_epochs), a teacher momentum too low (objective.dino.momentum_teacher), a centre "
          "momentum too low or too high (objective.dino.center_momentum: uniform or one-output collapse), a batch too "
          "small for the head (data.batch_size vs objective.dino.out_dim)")


@dataclass
class Finding:
    signal: str
    step: int
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"signal": self.signal, "step": self.step, "text": self.text}


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var > 0 else 0.0


class CollapseAlarms:
    """Reads logged rows (`observe(row)`, the dicts written to metrics.jsonl) and returns what fired.

    Rows without a metric simply do not feed its signal, so one instance reads training rows and evaluation rows
    alike. Signals (thresholds from `alarm.*`): `loss_near_ceiling`, `X_near_ceiling` for every `X_ceiling` a
    row carries, `loss_rising` (needs `loss_ceiling`), `embed_rank_falling`, `feat_rank_falling`,
    `knn_top1_falling`. Each signal warns again at most every `alarm.warn_every` steps."""

    def __init__(self, cfg: AlarmConfig, after_steps: int | None = None):
        self.cfg = cfg
        self.after_steps = cfg.after_steps if after_steps is None else after_steps  # the resolved alarm.after_steps
        self.series: dict[str, list[tuple[int, float]]] = {}
        self.best: dict[str, tuple[float, int]] = {}
        self.fired: list[Finding] = []
        self._warned: dict[str, int] = {}
        self._ceilings: dict[str, float] = {}

    def replay(self, rows: list[dict]) -> None:
        """Rebuild the state from earlier rows (a resumed run's metrics.jsonl): what fired then is remembered,
        not warned about again."""
        for row in rows:
            self.observe(row, quiet=True)

    def observe(self, row: dict, quiet: bool = False) -> list[Finding]:
        """Read one logged row; the signals that fire (and are due a warning) are returned and warned about."""
        if not self.cfg.enabled:
            return []
        found = self._read(row)
        due = [f for f in found if f.step - self._warned.get(f.signal, -10**12) >= self.cfg.warn_every]
        for f in due:
            self._warned[f.signal] = f.step
        self.fired.extend(due)
        if due and not quiet:
            action = ("Stopping with a checkpoint (alarm.stop_on_collapse=true)." if self.cfg.stop_on_collapse
                      else "Set alarm.stop_on_collapse=true to stop such a run with a checkpoint.")
            log.warning(f"!!! COLLAPSE ALARM at step {due[0].step}: {'; '.join(f.text for f in due)}. The "
                        f"representation may be collapsing; {CAUSES}. {action}")
        return due

    def fired_dicts(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.fired]

    # ---------------------------------------------------------------------------------------- the signals

    def _read(self, row: dict) -> list[Finding]:
        step = int(row.get("step", 0))
        values = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(float(v))}
        for k, v in values.items():
            if k.endswith("_ceiling"):
                self._ceilings[k[: -len("_ceiling")]] = v
        watched = set(self._ceilings) | {k for k, _, _ in _FALLING}
        for k in watched & set(values):
            self.series.setdefault(k, []).append((step, values[k]))
        if step < self.after_steps:
            return []
        c, out = self.cfg, []
        for k, ceiling in self._ceilings.items():
            if k not in values or ceiling <= 0:
                continue
            level = self._smoothed(k)
            if c.near_ceiling > 0 and level >= c.near_ceiling * ceiling:
                out.append(Finding(f"{k}_near_ceiling", step, f"{k} {level:.3f} is {level / ceiling:.1%} of its "
                                   f"ceiling {ceiling:.3f} (ln out_dim: the outputs are going uniform; alarm at "
                                   f"alarm.near_ceiling={c.near_ceiling:g})"))
            if c.near_floor > 0 and level <= c.near_floor * ceiling:
                out.append(Finding(f"{k}_near_zero", step, f"{k} {level:.4f} is {level / ceiling:.2%} of ln out_dim "
                                   f"{ceiling:.3f} (every image is going to one output; alarm at "
                                   f"alarm.near_floor={c.near_floor:g})"))
        if c.loss_rise > 0 and "loss" in values and "loss" in self._ceilings:
            rising = self._loss_rising(step)
            if rising is not None:
                out.append(rising)
        for k, what, field_name in _FALLING:
            if k not in values or (k != "embed_rank" and step == 0):
                continue  # the random-init evaluation (step 0) is a baseline, not a best to fall from
            # knn_top1 and feat_rank come from sparse evaluations and are read as they are; embed_rank smoothed.
            level = self._smoothed(k) if k == "embed_rank" else values[k]
            if k not in self.best or level > self.best[k][0]:
                self.best[k] = (level, step)
                continue
            best, best_step = self.best[k]
            drop = getattr(c, field_name)
            if drop > 0 and level < (1 - drop) * best:
                out.append(Finding(f"{k}_falling", step, f"{what} {level:.3f} is {level / best:.0%} of its best "
                                   f"{best:.3f} (step {best_step}; alarm below {1 - drop:.0%} of it: "
                                   f"alarm.{field_name}={drop:g})"))
        return out

    def _loss_rising(self, step: int) -> Finding | None:
        """The loss climbing towards its ceiling over the last `window` rows (least-squares fit) while the batch
        embeddings' effective rank falls over the same rows (when the objective reports one). A healthy DINO run
        can climb for a while after its warmup, its rank steady or growing; a collapsing one loses rank as it
        climbs."""
        c, ceiling = self.cfg, self._ceilings["loss"]
        pts = [p for p in self.series["loss"][-c.window :] if p[0] >= self.after_steps]  # the warmup's are no trend
        if len(pts) < c.window:
            return None
        xs, ys = [float(s) for s, _ in pts], [v for _, v in pts]
        rise = _slope(xs, ys) * (xs[-1] - xs[0])
        if rise < c.loss_rise * ceiling:
            return None
        ranks = [(s, v) for s, v in self.series.get("embed_rank", []) if s >= pts[0][0]]
        rank_text = ""
        if c.rank_fall > 0 and len(ranks) >= 3:
            rx, ry = [float(s) for s, _ in ranks], [v for _, v in ranks]
            change = _slope(rx, ry) * (rx[-1] - rx[0]) / (sum(ry) / len(ry))
            if change > -c.rank_fall:
                return None
            rank_text = (f", while the effective rank fell {-change:.0%} ({ry[0]:.1f} -> {ry[-1]:.1f}; alarm at "
                         f"alarm.rank_fall={c.rank_fall:g})")
        return Finding("loss_rising", step, f"the loss rose {rise:+.3f} over the last {len(pts)} logged values (steps "
                       f"{int(xs[0])}-{int(xs[-1])}: {ys[0]:.3f} -> {ys[-1]:.3f}, ceiling ln out_dim = {ceiling:.3f}; "
                       f"alarm at alarm.loss_rise={c.loss_rise:g} x ceiling){rank_text}")

    def _smoothed(self, k: str) -> float:
        return statistics.median(v for _, v in self.series[k][-_SMOOTH:])
