"""Fashion-MNIST evaluation: raw-pixel baselines and a checkpoint's frozen features, side by side; one JSON table.

First the raw-pixel baselines of the Fashion-MNIST paper (Xiao et al. 2017: logistic regression 0.842, k-NN
0.854 for its best setting), recomputed with this project's own linear probes (DINO's and MAE's protocol) and
k-NN on pixels / 255, beside the independent reference they are held to: scikit-learn's LogisticRegression on
standardised features with C chosen on the same held-out split of train the probes use (`gap_to_sklearn` on each
probe row). Then the label-efficiency table (linear probe and k-NN from 1, 5, 10, 25, 100 labels per class,
mean ± std over seeds). Given `--checkpoint` (a run folder, a checkpoint or an exported backbone), the same
evaluations on its frozen features, each with its ratio to raw pixels by the same method. Fine-tuning has its row
(`finetune_row`), filled when `--finetune-recipe` is given.

    python bench/fmnist_eval.py [--quick] [--checkpoint runs/mae-fmnist] [--pooling cls]
                                [--train-shards DIR --test-shards DIR] [--cache-dir DIR] [--out DIR]
                                [--train-limit N] [--test-limit N] [--min-steps N] [--shots 1,5,10] [--seeds 5]

The data is read from VITSSL_FMNIST_DIR (default ../shared/datasets/fashion-mnist beside the project). For a
checkpoint without `--train-shards/--test-shards` the IDX files are written as shards to a temporary folder.
`--quick`: the first 600 train / 300 test images, short probes on narrow grids, a 3-value C grid (50 iterations),
2 seeds at 1 and 10 labels per class; same JSON shape, a smoke check, not a result.
`--train-limit/--test-limit/--min-steps` make a reduced full run (the README says which one it ran). Run with
OMP_NUM_THREADS set to the cores you mean to use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from downstream.features import load_labelled_features  # noqa: E402
from downstream.label_efficiency import label_efficiency  # noqa: E402
from downstream.probe import (  # noqa: E402
    ProbeResult,
    held_out_split,
    knn_classify,
    linear_probe_dino,
    linear_probe_mae,
    result_from_scores,
)
from shards.manifest import MANIFEST_NAME  # noqa: E402
from shards.sources import FASHION_MNIST_CLASSES, find_mnist_files, idx_source, read_idx  # noqa: E402
from shards.writer import write_shard_set  # noqa: E402

FMNIST_DIR = Path(os.environ.get("VITSSL_FMNIST_DIR", ROOT.parent / "shared" / "datasets" / "fashion-mnist"))
# The paper's raw-pixel results (its benchmark table, best setting of each scikit-learn classifier).
PAPER = {
    "linear": {"top1": 0.842, "what": "LogisticRegression on raw pixels (Xiao et al. 2017)"},
    "knn": {"top1": 0.854, "what": "KNeighborsClassifier on raw pixels, best setting (Xiao et al. 2017)"},
    "finetune": {"top1": 0.923, "what": "tiny ViT trained from scratch, 200 epochs (issue 4's reference)"},
}
QUICK_SIZES = (600, 300)
LINEAR_PROBES = ("linear probe (DINO protocol)", "linear probe (MAE protocol)")


def protocols(quick: bool, min_steps: int | None = None) -> dict:
    """The evaluations every feature set gets: name -> (paper key, function of (train_x, train_y, test_x, test_y)).

    Full: each protocol as `python -m downstream probe` runs it (its grids, held-out selection, refit), MAE at its
    batch of 4,096 and 90 epochs, DINO at 1,024 and 100; `min_steps` overrides the floor on optimizer steps.
    Quick: short runs on narrow grids (a smoke check of the code path, same JSON shape)."""
    classes = list(FASHION_MNIST_CLASSES)
    if quick:
        dino = dict(epochs=5, min_steps=20, base_lrs=(0.1, 1.0), weight_decays=(0.0, 1e-3), max_grid_extensions=0)
        mae = dict(epochs=5, warmup_epochs=1, batch_size=512, min_steps=20, base_lrs=(1.0, 10.0),
                   weight_decays=(0.0, 1e-3), max_grid_extensions=0)
    else:
        steps = {} if min_steps is None else {"min_steps": min_steps}
        dino, mae = dict(epochs=100, **steps), dict(epochs=90, batch_size=4096, **steps)
    return {
        "logistic regression (scikit-learn reference)": (
            "linear", lambda *d: sklearn_logistic_regression(*d, classes=classes, quick=quick)),
        LINEAR_PROBES[0]: ("linear", lambda *d: linear_probe_dino(*d, classes=classes, **dino)),
        LINEAR_PROBES[1]: ("linear", lambda *d: linear_probe_mae(*d, classes=classes, **mae)),
        "k-NN (DINO protocol: k=20, T=0.07, cosine)": ("knn", lambda *d: knn_classify(*d, classes=classes)),
    }


def sklearn_logistic_regression(
    train_x, train_y, test_x, test_y, *, classes=None, quick: bool = False, held_out_fraction: float = 0.2,
    seed: int = 0,
) -> ProbeResult:
    """The reference every linear probe is held to: scikit-learn's LogisticRegression (lbfgs, multinomial) on
    standardised features, C chosen on the same seeded held-out split of train the probes use (best held-out
    accuracy, then log-loss), refit on all of train with that C, scored on test."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    # Half-decades of C: a reference tuned at least as finely as the probes' weight decays (C ~ 1 / (wd * n)).
    cs, max_iter = ((0.01, 0.1, 1.0), 50) if quick else (tuple(10.0 ** np.arange(-4, 1.01, 0.5)), 1000)
    fit, held = held_out_split(train_y, held_out_fraction, seed)
    x, y = train_x.numpy(), train_y.numpy()
    scaler = StandardScaler().fit(x[fit])
    xf, xh = scaler.transform(x[fit]), scaler.transform(x[held])
    # Warm-started along increasing C (stronger regularisation first): the same optimum per C, fewer iterations.
    model = LogisticRegression(max_iter=max_iter, warm_start=True)
    sweep = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # quick's short runs; the iterations are reported
        for c in cs:
            model.set_params(C=c).fit(xf, y[fit])
            proba = model.predict_proba(xh)
            sweep.append({"C": c, "held_out_top1": float(model.score(xh, y[held])),
                          "held_out_loss": float(log_loss(y[held], proba, labels=model.classes_)),
                          "iterations": int(np.max(model.n_iter_))})
        best = max(sweep, key=lambda r: (r["held_out_top1"], -r["held_out_loss"]))
        scaler = StandardScaler().fit(x)
        final = LogisticRegression(C=best["C"], max_iter=max_iter).fit(scaler.transform(x), y)
    scores = torch.from_numpy(final.predict_proba(scaler.transform(test_x.numpy())))
    return result_from_scores(
        "sklearn-logreg", scores, test_y, num_classes=len(classes) if classes else int(test_y.max()) + 1,
        num_train=len(train_x), classes=classes, seconds=time.perf_counter() - started,
        settings={"C": best["C"], "max_iter": max_iter, "solver": "lbfgs", "held_out_fraction": held_out_fraction,
                  "iterations": int(np.max(final.n_iter_))},
        sweep=sweep, selection=f"C {best['C']:g} chosen on {len(held)} held-out train rows, refit on all of train",
    )


def load_pixels(folder: Path, n_train: int | None, n_test: int | None):
    """(train_x, train_y, test_x, test_y): pixels / 255 as float32 (N, 784), labels int64; first n of each."""
    files = find_mnist_files(folder)
    out = []
    for split, n in (("train", n_train), ("val", n_test)):
        images, labels = read_idx(files[split][0]), read_idx(files[split][1])
        images, labels = images[:n], labels[:n]
        out.append(torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255))
        out.append(torch.from_numpy(labels.astype(np.int64)))
    return tuple(out)


def write_idx_shards(folder: Path, out: Path, n_train: int | None, n_test: int | None) -> None:
    """The IDX files (first n of each split) as two shard sets under `out`: train/ and test/."""
    files = find_mnist_files(folder)
    for split, name, n in (("train", "train", n_train), ("val", "test", n_test)):
        source = idx_source(*files[split], classes=list(FASHION_MNIST_CLASSES), split=name)
        limit = source.count if n is None else n
        samples = (s for s in source if int(s.key) < limit)
        write_shard_set(samples, out / name, classes=source.classes, source=source.description, split=name,
                        samples_per_shard=2500, shard_multiple=4)


def row(features: str, method: str, paper_key: str, result: ProbeResult | None, **extra) -> dict:
    paper = PAPER[paper_key]["top1"]
    top1 = None if result is None else round(result.top1, 4)
    return {
        "features": features,
        "method": method,
        "top1": top1,
        "top5": None if result is None or result.top5 is None else round(result.top5, 4),
        "paper_top1": paper,
        "ratio_to_paper": None if top1 is None else round(top1 / paper, 4),
        "seconds": None if result is None else result.seconds,
        "settings": {} if result is None else result.settings,
        **extra,
    }


def evaluate(features: str, data: tuple, quick: bool, out: Path | None, stem: str,
             min_steps: int | None = None) -> list[dict]:
    rows = []
    for method, (paper_key, run) in protocols(quick, min_steps).items():
        result = run(*data)
        if out is not None:
            result.save(out, f"{stem}_{result.protocol}")
        rows.append(row(features, method, paper_key, result))
        print(f"# {features} / {method}: top1 {result.top1:.4f} ({result.seconds:.1f} s)", file=sys.stderr)
    reference = rows[0]["top1"]
    for r in rows:
        if r["method"] in LINEAR_PROBES:
            r["gap_to_sklearn"] = round(r["top1"] - reference, 4)
    return rows


def efficiency(features: str, data: tuple, quick: bool, shots, seeds: int, out: Path | None, stem: str,
               min_steps: int | None = None) -> dict:
    """Label-efficiency table on one feature set: the DINO-protocol linear probe and k-NN from k labels per class
    (subsets drawn from train only, per seed), scored on the whole test split; mean ± std over seeds."""
    probe = {"min_steps": 20, "epochs": 5, "base_lrs": (0.1, 1.0), "weight_decays": (0.0, 1e-3),
             "max_grid_extensions": 0} if quick else ({} if min_steps is None else {"min_steps": min_steps})
    result = label_efficiency(*data, shots=shots, seeds=seeds, methods=("linear", "knn"), protocol="dino",
                              classes=list(FASHION_MNIST_CLASSES), probe_kwargs=probe,
                              log=lambda m: print(f"# {features} / {m}", file=sys.stderr))
    if out is not None:
        result.save(out, f"{stem}_label_efficiency")
    return {
        "features": features,
        "shots": result.shots,
        "seeds": result.seeds,
        "rows": [{k: r[k] for k in ("method", "label", "shots", "num_train", "top1_mean", "top1_std", "top1")}
                 for r in result.rows],
        "settings": result.settings,
        "seconds": result.seconds,
        "table": result.table(),
    }


def finetune_row(checkpoint: str | None, recipe: str | None, *, quick: bool) -> dict:
    """HOOK: the fine-tuning row. downstream/finetune.py (another issue-4 piece) fills it: fine-tune
    `checkpoint` with `recipe` on the train split and report test top-1 here. Until then, or without
    `--finetune-recipe`, the row says why it was not run."""
    features = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
    if recipe is None:
        reason = "not run: no --finetune-recipe given"
    else:
        reason = "not run: fine-tuning is not wired into this bench yet (downstream/finetune.py)"
    return row(features, "fine-tune (supervised, all layers)", "finetune", None, reason=reason)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="600 train / 300 test, short probes (a smoke check)")
    ap.add_argument("--data", type=Path, default=FMNIST_DIR, help="folder with the four IDX files")
    ap.add_argument("--checkpoint", help="run folder, checkpoint or exported backbone to evaluate")
    ap.add_argument("--pooling", default="cls", help="cls, mean or lastN (e.g. last4)")
    ap.add_argument("--train-shards", help="Fashion-MNIST train shard set (default: written from the IDX files)")
    ap.add_argument("--test-shards", help="Fashion-MNIST test shard set (default: written from the IDX files)")
    ap.add_argument("--cache-dir", help="feature cache (default: none, features are embedded each run)")
    ap.add_argument("--batch-size", type=int, default=256, help="embedding batch size")
    ap.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel rows")
    ap.add_argument("--finetune-recipe", help="fine-tuning recipe for the fine-tune row")
    ap.add_argument("--out", type=Path, help="also write each result's JSON and confusion-matrix PNG here")
    ap.add_argument("--train-limit", type=int, help="use the first N train images (a reduced full run)")
    ap.add_argument("--test-limit", type=int, help="use the first N test images")
    ap.add_argument("--min-steps", type=int, help="the probes' floor on optimizer steps (default: theirs)")
    ap.add_argument("--shots", default=None, help="labels per class for the label-efficiency table "
                                                  "(default 1,5,10,25,100; quick 1,10)")
    ap.add_argument("--seeds", type=int, default=None, help="subsets per number of labels (default 5; quick 2)")
    ap.add_argument("--no-label-efficiency", action="store_true", help="skip the label-efficiency tables")
    args = ap.parse_args(argv)
    if bool(args.train_shards) != bool(args.test_shards):
        ap.error("give both --train-shards and --test-shards, or neither")
    return args


def checkpoint_features(args: argparse.Namespace, n_train: int | None, n_test: int | None, info: dict):
    """(train, test) frozen features of `args.checkpoint` on the shard sets, written from the IDX files when none
    are given; records the write and embedding seconds and the feature sets in `info`."""
    with tempfile.TemporaryDirectory(prefix="fmnist-shards-") as tmp:
        if args.train_shards:
            train_shards, test_shards = args.train_shards, args.test_shards
        else:
            # Kept beside the feature cache when there is one, so a second run neither writes nor embeds.
            where = Path(args.cache_dir) / f"fmnist-shards-{n_train or 'all'}-{n_test or 'all'}" \
                if args.cache_dir else Path(tmp)
            train_shards, test_shards = where / "train", where / "test"
            if not all((p / MANIFEST_NAME).is_file() for p in (train_shards, test_shards)):
                t = time.perf_counter()
                write_idx_shards(args.data, where, n_train, n_test)
                info["shard_write_seconds"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        from pretrain.restore import load_backbone_from

        backbone = load_backbone_from(args.checkpoint)
        train = load_labelled_features(backbone, train_shards, pooling=args.pooling, cache_dir=args.cache_dir,
                                       batch_size=args.batch_size)
        test = load_labelled_features(backbone, test_shards, pooling=args.pooling, cache_dir=args.cache_dir,
                                      batch_size=args.batch_size)
    info["embed_seconds"] = round(time.perf_counter() - t, 2)
    info["features"] = {"train": train.to_dict(), "test": test.to_dict()}
    return train, test


def checkpoint_rows(args: argparse.Namespace, pixels: tuple, rows: list[dict], tables: list[dict], info: dict,
                    n_train: int | None, n_test: int | None, shots, seeds: int) -> list[dict]:
    """The checkpoint's rows (each with its ratio to raw pixels by the same method); its label-efficiency table
    is appended to `tables`."""
    train, test = checkpoint_features(args, n_train, n_test, info)
    if (len(train), len(test)) != (len(pixels[1]), len(pixels[3])):
        print(f"# note: shards hold {len(train)}/{len(test)} samples, pixels {len(pixels[1])}/{len(pixels[3])}",
              file=sys.stderr)
    name = f"checkpoint {args.checkpoint} ({args.pooling})"
    feats = (train.feats, train.labels, test.feats, test.labels)
    ckpt_rows = evaluate(name, feats, args.quick, args.out, f"checkpoint_{args.pooling}", args.min_steps)
    if not args.no_label_efficiency:
        tables.append(efficiency(name, feats, args.quick, shots, seeds, args.out, f"checkpoint_{args.pooling}",
                                 args.min_steps))
    baseline = {r["method"]: r["top1"] for r in rows if r["features"] == "raw pixels"}
    for r in ckpt_rows:
        if baseline.get(r["method"]):
            r["ratio_to_raw_pixels"] = round(r["top1"] / baseline[r["method"]], 4)
    return ckpt_rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    n_train, n_test = QUICK_SIZES if args.quick else (args.train_limit, args.test_limit)
    shots = [int(k) for k in args.shots.split(",")] if args.shots else ([1, 10] if args.quick else [1, 5, 10, 25, 100])
    seeds = args.seeds or (2 if args.quick else 5)
    tables: list[dict] = []

    rows: list[dict] = []
    pixels = load_pixels(args.data, n_train, n_test)
    if not args.no_baselines:
        rows += evaluate("raw pixels", pixels, args.quick, args.out, "pixels", args.min_steps)
        if not args.no_label_efficiency:
            tables.append(efficiency("raw pixels", pixels, args.quick, shots, seeds, args.out, "pixels",
                                     args.min_steps))
    info = {"train": len(pixels[1]), "test": len(pixels[3]), "dir": str(args.data)}
    if args.checkpoint:
        rows += checkpoint_rows(args, pixels, rows, tables, info, n_train, n_test, shots, seeds)
    rows.append(finetune_row(args.checkpoint, args.finetune_recipe, quick=args.quick))

    report = {
        "bench": "fmnist_eval",
        "quick": args.quick,
        "data": info,
        "paper": PAPER,
        "rows": rows,
        "label_efficiency": tables,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
