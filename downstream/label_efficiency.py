"""Label efficiency: accuracy on frozen features as a function of the number of labels per class.

For each seed, each class's train rows are shuffled once (seeded) and the k-shot subset is the first k of every
class, so subsets are nested (a seed's 5-shot set holds its 1-shot set) and drawn from the train split only.
Every method (linear probe by a protocol of `downstream.probe`, DINO's k-NN, and optionally the cosine and
class-centre heads) learns from the subset alone, choosing its own hyper-parameters on a held-out part of the
subset when it can (a 1-shot subset has nothing to hold out: the probe then uses its grid's median lr), and is
scored on the whole evaluation split. Reported: per (method, k) the top-1 of every seed, their mean and sample
standard deviation; written as JSON plus a PNG (accuracy vs labels per class, error bars = 1 std).

    python -m downstream label-efficiency RUN TRAIN VAL --shots 1,5,10,25,100 --seeds 5 --out DIR
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from downstream.metrics import mean_std
from downstream.probe import PROTOCOLS, embed_train_test
from downstream.probe.inputs import prepare
from shards.atomic import atomic_path, write_text_atomic

__all__ = [
    "DEFAULT_SHOTS",
    "METHODS",
    "LabelEfficiencyResult",
    "few_shot_subsets",
    "label_efficiency",
    "label_efficiency_checkpoint",
    "label_efficiency_png",
]

DEFAULT_SHOTS: tuple[int, ...] = (1, 5, 10, 25, 100)
# method -> what it runs; "linear" runs the linear-probe protocol given (dino or mae).
METHODS = ("linear", "knn", "cosine", "centre")


def few_shot_subsets(labels: torch.Tensor | np.ndarray, shots: Sequence[int], seed: int) -> dict[int, torch.Tensor]:
    """{k: sorted row indices with exactly k rows of every class present in `labels`} for one seed.

    One seeded permutation per class; the k-shot subset takes its first k rows, so a seed's subsets are nested.
    Raises ValueError when a class has fewer rows than the largest k (naming the class and its count).
    """
    labels = torch.as_tensor(labels).long().cpu()
    shots = sorted({int(k) for k in shots})
    if not shots or shots[0] < 1:
        raise ValueError(f"shots must be positive integers, got {shots}")
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        if len(members) < shots[-1]:
            raise ValueError(f"class {c} has {len(members)} train rows, fewer than {shots[-1]} labels per class")
        orders.append(members[torch.randperm(len(members), generator=generator)])
    return {k: torch.cat([o[:k] for o in orders]).sort().values for k in shots}


@dataclass
class LabelEfficiencyResult:
    """Top-1 per (method, labels per class) over seeds; `rows` holds one dict per pair (see `label_efficiency`)."""

    shots: list[int]
    seeds: list[int]
    methods: list[str]
    rows: list[dict]
    num_classes: int
    num_train_pool: int
    num_test: int
    classes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def row(self, method: str, shots: int) -> dict:
        for r in self.rows:
            if r["method"] == method and r["shots"] == shots:
                return r
        raise KeyError(f"no row for method {method!r} at {shots} labels per class")

    def table(self) -> str:
        """A plain-text table: one line per method, mean +- std per number of labels per class."""
        head = f"{'labels/class':<14}" + "".join(f"{k:>16}" for k in self.shots)
        lines = [head]
        for m in self.methods:
            cells = []
            for k in self.shots:
                r = self.row(m, k)
                std = "" if r["top1_std"] is None else f" ± {r['top1_std']:.3f}"
                cells.append(f"{r['top1_mean']:.3f}{std}".rjust(16))
            lines.append(f"{m:<14}" + "".join(cells))
        return "\n".join(lines)

    def save(self, folder: str | os.PathLike, name: str = "label_efficiency") -> dict[str, Path]:
        """Write `folder/<name>.json` and `folder/<name>.png`, each atomically; returns their paths."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad result name {name!r}: use a plain file stem")
        folder = Path(folder)
        paths = {"json": folder / f"{name}.json", "png": folder / f"{name}.png"}
        write_text_atomic(paths["json"], self.to_json() + "\n")
        label_efficiency_png(self, paths["png"])
        return paths


def label_efficiency_png(result: LabelEfficiencyResult, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Top-1 against labels per class (log axis), one line per method, error bars of one std over seeds."""
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"picture path must end in .png, got {path}")
    fig = Figure(figsize=(6.4, 4.4), dpi=dpi)
    ax = fig.subplots()
    for m in result.methods:
        rows = [result.row(m, k) for k in result.shots]
        means = [r["top1_mean"] for r in rows]
        stds = [r["top1_std"] or 0.0 for r in rows]
        ax.errorbar(result.shots, means, yerr=stds, marker="o", capsize=3, label=rows[0]["label"])
    ax.set_xscale("log")
    ax.set_xticks(result.shots, [str(k) for k in result.shots])
    ax.set_xlabel("labels per class")
    ax.set_ylabel(f"top-1 on {result.num_test} evaluation samples")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"label efficiency: mean ± std over {len(result.seeds)} seeds", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def label_efficiency(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: int | Sequence[int] = 5,
    methods: Sequence[str] = ("linear", "knn"),
    protocol: str = "dino",
    knn_k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    probe_kwargs: dict | None = None,
    log=None,
) -> LabelEfficiencyResult:
    """Each method trained on k labelled train rows per class (k in `shots`) for each seed, scored on the test set.

    `seeds`: a count n (seeds 0..n-1) or explicit seeds; a seed draws the subsets (`few_shot_subsets`) and seeds
    the probe. `methods`: "linear" (the linear probe of `protocol`, "dino" or "mae", with `probe_kwargs`),
    "knn" (DINO's weighted k-NN, `knn_k` neighbours clipped to the subset, `temperature`), "cosine", "centre".
    Each row: method, shots, num_train, top1 per seed, top1_mean, top1_std (sample std; None for one seed), and
    for trained probes the hyper-parameters each seed chose on its held-out rows. `log`: a print-like callable.
    """
    started = time.perf_counter()
    train_x, train_y, test_x, test_y, num_classes = prepare(
        train_features, train_labels, test_features, test_labels, num_classes, classes
    )
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must name at least one seed")
    shot_list = sorted({int(k) for k in shots})
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods {list(methods)}: use some of {list(METHODS)}")
    if protocol not in ("dino", "mae"):
        raise ValueError(f"protocol={protocol!r}: the linear probe is 'dino' or 'mae'")
    probe_kwargs = dict(probe_kwargs or {})
    runners = {
        "linear": (f"linear probe ({protocol})", lambda *d, **kw: PROTOCOLS[protocol](*d, **kw, **probe_kwargs)),
        "knn": (f"k-NN (k={knn_k}, T={temperature})",
                lambda *d, **kw: PROTOCOLS["knn"](*d, **kw, k=knn_k, temperature=temperature)),
        "cosine": ("cosine classifier", lambda *d, **kw: PROTOCOLS["cosine"](*d, **kw)),
        "centre": ("class centre (cosine)", lambda *d, **kw: PROTOCOLS["centre"](*d, **kw)),
    }
    per_seed = {s: few_shot_subsets(train_y, shot_list, s) for s in seed_list}
    rows = []
    for method in methods:
        label, run = runners[method]
        for k in shot_list:
            values, chosen = [], []
            for s in seed_list:
                idx = per_seed[s][k].to(train_x.device)
                if method == "linear":
                    probe_kwargs["seed"] = s
                r = run(train_x[idx], train_y[idx], test_x, test_y, num_classes=num_classes)
                values.append(r.top1)
                if "weight_decay" in r.settings:
                    chosen.append({"base_lr": r.settings["base_lr"], "weight_decay": r.settings["weight_decay"],
                                   "on_held_out": r.settings["chosen_on_held_out"] is not None})
            mean, std = mean_std(values)
            rows.append({"method": method, "label": label, "shots": k, "num_train": k * len(torch.unique(train_y)),
                         "top1": values, "top1_mean": mean, "top1_std": std, "seeds": seed_list,
                         **({"chosen": chosen} if chosen else {})})
            if log is not None:
                spread = "" if std is None else f" ± {std:.4f}"
                log(f"{label}, {k} labels/class: top-1 {mean:.4f}{spread} over {len(seed_list)} seeds")
    return LabelEfficiencyResult(
        shots=shot_list, seeds=seed_list, methods=list(methods), rows=rows, num_classes=num_classes,
        num_train_pool=len(train_x), num_test=len(test_x), classes=list(classes or []),
        settings={"protocol": protocol, "knn_k": knn_k, "temperature": temperature, "probe_kwargs": probe_kwargs
                  | {"seed": "per seed"}, "subsets": "per class, seeded, nested across shots, from train only"},
        seconds=round(time.perf_counter() - started, 3),
    )


def label_efficiency_checkpoint(
    checkpoint,
    train: str | os.PathLike,
    test: str | os.PathLike,
    *,
    pooling: str = "cls",
    cache_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    **kwargs,
) -> LabelEfficiencyResult:
    """One call for the CLI: embed `train` and `test` shard sets with `checkpoint` (as `probe_checkpoint` does),
    run `label_efficiency(**kwargs)` and, given `out_dir`, write label_efficiency.json + .png there."""
    tr, te, info = embed_train_test(checkpoint, train, test, pooling=pooling, cache_dir=cache_dir,
                                    batch_size=batch_size, num_workers=num_workers)
    classes = kwargs.pop("classes", None) or tr.classes or te.classes or None
    result = label_efficiency(tr.feats, tr.labels, te.feats, te.labels, classes=classes, **kwargs)
    result.settings["features"] = info
    if out_dir is not None:
        result.save(out_dir)
    return result
