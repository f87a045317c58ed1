"""Fashion-MNIST evaluation: raw-pixel baselines and a checkpoint's frozen features, side by side; one JSON table.

First the raw-pixel baselines of the Fashion-MNIST paper (Xiao et al. 2017: logistic regression 0.842, k-NN
0.854 for its best setting), recomputed with this project's own linear probes and k-NN on pixels / 255; then,
given `--checkpoint` (a run folder, a checkpoint or an exported backbone), the same evaluations on its frozen
features. Every row carries its ratio to the paper's number and, for a checkpoint, to raw pixels by the same
method. Fine-tuning has its row (`finetune_row`), filled when `--finetune-recipe` is given.

    python bench/fmnist_eval.py [--quick] [--checkpoint runs/mae-fmnist] [--pooling cls]
                                [--train-shards DIR --test-shards DIR] [--cache-dir DIR] [--out DIR]

The data is read from VITSSL_FMNIST_DIR (default ../shared/datasets/fashion-mnist beside the project). For a
checkpoint without `--train-shards/--test-shards` the IDX files are written as shards to a temporary folder.
`--quick`: the first 5,000 train / 1,000 test images and shorter probes, same JSON shape (< 30 s with a tiny
backbone). Run with OMP_NUM_THREADS set to the cores you mean to use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from downstream.features import load_labelled_features  # noqa: E402
from downstream.probe import ProbeResult, knn_classify, linear_probe_dino, linear_probe_mae  # noqa: E402
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
QUICK_SIZES = (5000, 1000)


def protocols(quick: bool) -> dict:
    """The evaluations every feature set gets: name -> (paper key, function of (train_x, train_y, test_x, test_y))."""
    # Quick: fewer epochs, and MAE's batch cut so that 5,000 rows still give it a few hundred steps, at the
    # full run's absolute lr (LARS moves weights by ~lr * 1e-3 of their norm per step; a scaled-down lr stalls).
    dino_epochs, mae_epochs, mae_batch = (20, 30, 512) if quick else (100, 90, 4096)
    mae_base_lr = 0.1 * 4096 / mae_batch
    classes = list(FASHION_MNIST_CLASSES)
    return {
        "linear probe (DINO protocol: lr swept on held-out train)": (
            "linear", lambda *d: linear_probe_dino(*d, classes=classes, epochs=dino_epochs)),
        "linear probe (MAE protocol: BatchNorm + LARS)": (
            "linear", lambda *d: linear_probe_mae(*d, classes=classes, epochs=mae_epochs, batch_size=mae_batch,
                                                  base_lr=mae_base_lr, warmup_epochs=mae_epochs / 9)),
        "k-NN (DINO protocol: k=20, T=0.07, cosine)": ("knn", lambda *d: knn_classify(*d, classes=classes)),
    }  # fmt: skip


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


def evaluate(features: str, data: tuple, quick: bool, out: Path | None, stem: str) -> list[dict]:
    rows = []
    for method, (paper_key, run) in protocols(quick).items():
        result = run(*data)
        if out is not None:
            result.save(out, f"{stem}_{result.protocol}")
        rows.append(row(features, method, paper_key, result))
        print(f"# {features} / {method}: top1 {result.top1:.4f} ({result.seconds:.1f} s)", file=sys.stderr)
    return rows


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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5,000 train / 1,000 test, shorter probes (< 30 s)")
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
    args = ap.parse_args(argv)
    if bool(args.train_shards) != bool(args.test_shards):
        ap.error("give both --train-shards and --test-shards, or neither")
    started = time.perf_counter()
    n_train, n_test = QUICK_SIZES if args.quick else (None, None)

    rows: list[dict] = []
    pixels = load_pixels(args.data, n_train, n_test)
    if not args.no_baselines:
        rows += evaluate("raw pixels", pixels, args.quick, args.out, "pixels")
    info = {"train": len(pixels[1]), "test": len(pixels[3]), "dir": str(args.data)}

    if args.checkpoint:
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
        if (len(train), len(test)) != (len(pixels[1]), len(pixels[3])):
            print(f"# note: shards hold {len(train)}/{len(test)} samples, pixels {len(pixels[1])}/{len(pixels[3])}",
                  file=sys.stderr)
        name = f"checkpoint {args.checkpoint} ({args.pooling})"
        ckpt_rows = evaluate(name, (train.feats, train.labels, test.feats, test.labels), args.quick, args.out,
                             f"checkpoint_{args.pooling}")
        baseline = {r["method"]: r["top1"] for r in rows if r["features"] == "raw pixels"}
        for r in ckpt_rows:
            if baseline.get(r["method"]):
                r["ratio_to_raw_pixels"] = round(r["top1"] / baseline[r["method"]], 4)
        rows += ckpt_rows
    rows.append(finetune_row(args.checkpoint, args.finetune_recipe, quick=args.quick))

    report = {
        "bench": "fmnist_eval",
        "quick": args.quick,
        "data": info,
        "paper": PAPER,
        "rows": rows,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
