"""Model selection on held-out train rows: the base_lr x weight_decay sweep (`select_hyperparameters`, a grid grown
past an edge that wins) and the protocol's choice among feature normalisations (`select`). Both return structure
(`Sweep`, `Selection`); the sentence a report shows is rendered from it at the end (`Selection.describe`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from downstream.probe.fit import ProbeRecipe, predict, train_heads
from downstream.probe.inputs import held_out_split

__all__ = ["WHITEN_MIN_ROWS_PER_DIM", "Selection", "Sweep", "held_out_rank", "select", "select_hyperparameters"]

WHITEN_MIN_ROWS_PER_DIM = 5  # a linear probe tries whitened features only with this many train rows per dimension
SELECTION_RULE = "weight_decay: best held-out top-1 (then loss); base_lr: lowest training objective"


def _next_value(grid: list[float], upward: bool) -> float | None:
    """The value one grid step beyond an edge (the ratio of the two values at that edge), or None when the edge
    cannot move: a grid of one value (fixed by the caller) or a lower edge of 0 (no weight decay)."""
    if len(grid) < 2:
        return None
    if upward:
        top, below = grid[-1], grid[-2]
        ratio = top / below if below > 0 else 10.0
        return float(f"{top * ratio:.6g}") if top > 0 else None
    bottom, above = grid[0], grid[1]
    return float(f"{bottom * bottom / above:.6g}") if bottom > 0 else None


def held_out_rank(record: dict) -> tuple:
    """Order of weight decays: highest held-out top-1, then lowest held-out loss, then the stronger decay."""
    return (-record["held_out_top1"], record["held_out_loss"], -record["weight_decay"])


def _best(records) -> dict:
    """The chosen candidate. The lr is an optimisation knob: for each weight decay the lr whose head reached the
    lowest training objective on the fit rows (mean cross-entropy + wd / 2 * |W|^2; ties: the smaller lr). The
    weight decay is the regulariser: among those heads, the best on the held-out rows (`held_out_rank`). This
    is how scikit-learn's tuned LogisticRegression works (exact optimum per C, C on held-out rows), with SGD;
    choosing lr x wd jointly on a few hundred held-out rows instead picks lucky, under-trained heads."""
    per_wd: dict[float, dict] = {}
    for r in records:
        current = per_wd.get(r["weight_decay"])
        if current is None or (r["fit_objective"], r["base_lr"]) < (current["fit_objective"], current["base_lr"]):
            per_wd[r["weight_decay"]] = r
    return min(per_wd.values(), key=held_out_rank)


@dataclass
class Sweep:
    """What one sweep saw: every candidate's record, the chosen one (`best`), the grid as grown, and the heads
    trained on the fit rows (`models`: (base_lr, weight_decay) -> (heads, index))."""

    best: dict
    records: list[dict]
    grid: dict
    extensions: list[dict]
    still_on_edge: list[str]
    models: dict = field(repr=False)
    fit_rows: int
    held_out_rows: int
    train_info: dict


def _score(model: nn.Module, candidates, info: dict, fx, fy, hx, hy, round_: int) -> list[dict]:
    """One record per head of `model`: held-out top-1 and loss, and the training objective on the fit rows."""
    logits = predict(model, hx)
    fit_logits = predict(model, fx)
    records = []
    for h, ((lr, wd), lg) in enumerate(zip(candidates, logits)):
        finite = bool(torch.isfinite(lg).all()) and bool(torch.isfinite(fit_logits[h]).all())
        fit_loss = float(F.cross_entropy(fit_logits[h], fy)) if finite else math.inf
        records.append({
            "base_lr": lr,
            "lr": lr * info["batch_size"] / 256,
            "weight_decay": wd,
            "held_out_top1": float((lg.argmax(1) == hy).float().mean()) if finite else 0.0,
            "held_out_loss": float(F.cross_entropy(lg, hy)) if finite else math.inf,
            "fit_loss": fit_loss,
            "fit_objective": fit_loss + 0.5 * wd * float(model.weight[h].detach().pow(2).sum()),
            "round": round_,
        })
    return records


def _grow(grids: dict[str, list[float]], best: dict, moves: dict, max_grid_extensions: int, round_: int) -> list[dict]:
    """Extend, in place, each grid whose best value sits on an edge that may still move; returns the extensions."""
    grown = []
    for name, grid in grids.items():
        value = best[name]
        for way, edge in (("up", grid[-1]), ("down", grid[0])):
            if value == edge and moves[(name, way)] < max_grid_extensions:
                nxt = _next_value(grid, way == "up")
                if nxt is not None and nxt not in grid:
                    moves[(name, way)] += 1
                    grown.append({"hyper_parameter": name, "direction": way, "added": nxt, "best_was": value,
                                  "round": round_})
                    break
    for extension in grown:
        grids[extension["hyper_parameter"]][:] = sorted([*grids[extension["hyper_parameter"]], extension["added"]])
    return grown


def select_hyperparameters(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, recipe: ProbeRecipe, *,
    base_lrs: Sequence[float], weight_decays: Sequence[float], held_out_fraction: float, seed: int,
    max_grid_extensions: int = 3,
) -> Sweep:
    """Sweep base_lr x weight_decay on a seeded, stratified held-out split of the *train* rows.

    Every candidate is a head trained on the rest of train (all in one pass) and chosen by `_best`: the lr by
    its training objective on those rows, the weight decay on the held-out rows. When the best value of either
    hyper-parameter sits on its grid's edge, the grid grows one step beyond that edge and only the new candidates
    are trained; at most `max_grid_extensions` times per edge. Candidates are trained from the same
    initialisation on the same batches, so a result does not depend on the grid around it.
    """
    grids = {"base_lr": sorted({float(v) for v in base_lrs}), "weight_decay": sorted({float(v) for v in weight_decays})}
    lrs, wds = grids["base_lr"], grids["weight_decay"]
    if not lrs or not wds:
        raise ValueError("the base lr and weight decay grids must not be empty")
    if lrs[0] <= 0 or wds[0] < 0:
        raise ValueError(f"base lrs must be > 0 and weight decays >= 0, got {lrs} and {wds}")
    fit_idx, held_idx = held_out_split(y, held_out_fraction, seed)
    fit_idx, held_idx = fit_idx.to(x.device), held_idx.to(x.device)
    fx, fy, hx, hy = x[fit_idx], y[fit_idx], x[held_idx], y[held_idx]
    records: dict[tuple[float, float], dict] = {}
    models: dict[tuple[float, float], tuple[nn.Module, int]] = {}
    extensions: list[dict] = []
    moves = {(name, way): 0 for name in grids for way in ("up", "down")}
    todo = [(lr, wd) for lr in lrs for wd in wds]
    round_ = 0
    info: dict = {}
    while todo:
        model, info = train_heads(fx, fy, num_classes, todo, recipe, seed)
        for h, record in enumerate(_score(model, todo, info, fx, fy, hx, hy, round_)):
            records[todo[h]] = record
            models[todo[h]] = (model, h)
        round_ += 1
        extensions += _grow(grids, _best(records.values()), moves, max_grid_extensions, round_)
        todo = [(lr, wd) for lr in lrs for wd in wds if (lr, wd) not in records]
    best = _best(records.values())
    on_edge = [name for name, grid in grids.items()
               if len(grid) > 1 and best[name] in (grid[0], grid[-1]) and not (name == "weight_decay" and best[name] == 0)]
    return Sweep(best=best, records=sorted(records.values(), key=lambda r: (r["base_lr"], r["weight_decay"])),
                 grid={"base_lrs": lrs, "weight_decays": wds}, extensions=extensions, still_on_edge=on_edge,
                 models=models, fit_rows=len(fit_idx), held_out_rows=len(held_idx), train_info=info)


def _fallback(grid: Sequence[float]) -> float:
    """The grid's median value (the lower of the two middle ones): the choice when nothing can be held out."""
    values = sorted({float(v) for v in grid})
    return values[(len(values) - 1) // 2]


@dataclass
class Selection:
    """A protocol's choice: the recipe it trains by (whitened or as the protocol has it), the base lr and weight
    decay, and the sweeps behind them (`tried`: the protocol's own normalisation first; empty when every class
    has one row and nothing could be held out)."""

    recipe: ProbeRecipe
    base_lr: float
    weight_decay: float
    tried: list[Sweep]
    chosen: Sweep | None
    base_lrs: Sequence[float]
    weight_decays: Sequence[float]
    max_grid_extensions: int

    @property
    def records(self) -> list[dict]:
        """Every candidate of every sweep, in the order tried."""
        return [r for sweep in self.tried for r in sweep.records]

    def chosen_on_held_out(self) -> dict | None:
        if self.chosen is None:
            return None
        best = self.chosen.best
        return {"base_lr": self.base_lr, "weight_decay": self.weight_decay, "held_out_top1": best["held_out_top1"],
                "held_out_loss": best["held_out_loss"], "fit_objective": best["fit_objective"],
                "held_out_rows": self.chosen.held_out_rows, "fit_rows": self.chosen.fit_rows, "rule": SELECTION_RULE}

    def grid(self) -> dict:
        if self.chosen is None:
            return {"base_lrs": sorted(self.base_lrs), "weight_decays": sorted(self.weight_decays),
                    "extensions": [], "still_on_edge": []}
        sweep = self.chosen
        return {**sweep.grid, "extensions": sweep.extensions, "still_on_edge": sweep.still_on_edge}

    def describe(self, refit: bool, train_rows: int) -> str:
        """How the values were chosen, in a sentence for the report."""
        if self.chosen is None:
            where = (f"no selection: every class has one train row, nothing to hold out; the grid's median base_lr "
                     f"{self.base_lr:g} and its smallest weight_decay {self.weight_decay:g}")
            return f"{where}, refit on all {train_rows} train rows"
        sweep, best = self.chosen, self.chosen.best
        where = ""
        if len(self.tried) > 1:
            recipe = self.recipe
            name = "whitened" if recipe.whiten else "standardised" if recipe.norm == "standardize" else "batch-normalised"
            where = (f"features {name} (held-out top-1 {self.tried[0].best['held_out_top1']:.4f} as the protocol has "
                     f"it, {self.tried[1].best['held_out_top1']:.4f} whitened), ")
        where += (f"weight_decay {self.weight_decay:g} chosen on {sweep.held_out_rows} held-out train rows (held-out "
                  f"top-1 {best['held_out_top1']:.4f}), base_lr {self.base_lr:g} by the lowest training objective on "
                  f"the other {sweep.fit_rows} ({len(sweep.records)} candidates)")
        if sweep.extensions:
            grown = ", ".join(f"{e['hyper_parameter']} {e['direction']} to {e['added']:g}" for e in sweep.extensions)
            where += f"; grid extended at its edge: {grown}"
        if sweep.still_on_edge:
            where += f"; still on the grid's edge after {self.max_grid_extensions} extensions: {sweep.still_on_edge}"
        if refit:
            return f"{where}, refit on all {train_rows} train rows"
        return f"{where}, the sweep's probe kept (trained on {sweep.fit_rows} rows)"


def select(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, recipe: ProbeRecipe, *, base_lrs: Sequence[float],
    weight_decays: Sequence[float], held_out_fraction: float, seed: int, max_grid_extensions: int,
    try_whiten: bool,
) -> Selection:
    """Choose (base_lr, weight_decay), and for a linear probe on enough rows the normalisation, on held-out train.

    With at least WHITEN_MIN_ROWS_PER_DIM rows per dimension a linear probe also sweeps whitened features and
    keeps the variant whose best head ranks first on the held-out rows (ties: the protocol's own); fewer rows
    estimate the covariance too poorly to whiten by. One labelled row per class: nothing to hold out, so the
    grid's median base_lr and its smallest weight decay.
    """
    if int(torch.bincount(y).max()) < 2:
        return Selection(recipe, _fallback(base_lrs), min(float(w) for w in weight_decays), [], None, base_lrs,
                         weight_decays, max_grid_extensions)
    variants = [recipe]
    if (try_whiten and recipe.head == "linear" and not recipe.whiten
            and len(x) >= WHITEN_MIN_ROWS_PER_DIM * x.shape[1]):
        variants.append(replace(recipe, whiten=True))
    tried = []
    for variant in variants:
        sweep = select_hyperparameters(x, y, num_classes, variant, base_lrs=base_lrs, weight_decays=weight_decays,
                                       held_out_fraction=held_out_fraction, seed=seed,
                                       max_grid_extensions=max_grid_extensions)
        for record in sweep.records:
            record["whiten"] = variant.whiten
        tried.append(sweep)
    index = min(range(len(tried)), key=lambda i: (held_out_rank(tried[i].best), i))
    best = tried[index].best
    return Selection(variants[index], best["base_lr"], best["weight_decay"], tried, tried[index], base_lrs,
                     weight_decays, max_grid_extensions)
