"""`make demo`: the whole main job on the built-in data, in a few minutes on 2 CPU cores.

shards (scikit-learn's 1,797 real handwritten digits, train/val split) -> MAE pretraining (quickstart recipe)
-> linear probe and k-NN on frozen features -> fine-tuning from the MAE weights and, as the baseline without
pretraining, the same fine-tuning from random weights -> FAISS index of the train split -> a query by image file
and one by key -> a summary table whose headline is what pretraining bought, and the paths of every PNG written.

Running it again reuses what is already there: the shards are kept, and the run resumes from its last
checkpoint (a finished run is not trained again). `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from shards.ownership import OutputExistsError, claim_output, mark_output, marked_kind

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart_mae_digits.yaml"
FINETUNE_RECIPE = ROOT / "recipes" / "quickstart_finetune_digits.yaml"
# MAE trains no loss on its CLS token; the mean of the patch tokens is the better frozen feature after a short
# run (k-NN on the demo's digits: 0.79 mean vs 0.75 CLS).
POOLING = "mean"


def _step(title: str) -> float:
    print(f"\n== {title} ==", flush=True)
    return time.monotonic()


def write_demo_shards(out: Path) -> dict:
    """The digits as out/train and out/val shard sets (kept when already complete)."""
    from shards.info import info
    from shards.manifest import MANIFEST_NAME
    from shards.sources import digits_source
    from shards.writer import write_split_shard_sets

    if not all((out / split / MANIFEST_NAME).is_file() for split in ("train", "val")):
        source = digits_source()
        write_split_shard_sets(source, out, val_fraction=0.2, seed=0, classes=source.classes,
                               source=source.description, samples_per_shard=400)
    summaries = {}
    for split in ("train", "val"):
        summary = info(out / split, grid_png=out / f"{split}_grid.png", per_class=8)
        print(summary.format())
        summaries[split] = summary
    return summaries


def pixels(source: Path):
    """Raw pixels in [0, 1], flattened, and labels: the no-model baseline."""
    import torch

    from shards.stream import ShardStream

    batches = list(ShardStream(str(source), batch_size=512, shuffle=False).loader())
    return (torch.cat([b["image"].flatten(1) for b in batches]), torch.cat([b["label"] for b in batches]))


def _claim_folder(out: Path, fresh: bool) -> bool:
    """Make `out` the demo's folder; False (after one line on stderr) when it holds what the demo did not write.
    The demo adds to (or, with --fresh, deletes) only a folder it wrote itself."""
    try:
        if claim_output(out, "demo", resume=True) == "resume" and fresh:
            shutil.rmtree(out)
    except OutputExistsError as e:
        print(f"error: --out: {e}", file=sys.stderr)
        return False
    out.mkdir(parents=True, exist_ok=True)
    if marked_kind(out) is None:
        mark_output(out, "demo")
    return True


def _pretrain(out: Path, epochs: int | None, pictures: dict[str, str]):
    _step("2. pretrain: MAE, recipes/quickstart_mae_digits.yaml")
    from pretrain.recipe import load_recipe
    from pretrain.trainer import train

    overrides = [f"data.train={out / 'shards' / 'train'}", f"data.val={out / 'shards' / 'val'}",
                 f"run.out_dir={out / 'runs' / 'mae'}"]
    if epochs:
        overrides.append(f"run.epochs={epochs}")
    result = train(load_recipe(RECIPE, overrides))
    for p in result.pictures:
        pictures[Path(p).stem.replace("_", " ")] = str(p)
    return result


def _evaluate(out: Path, run_dir: Path, pictures: dict[str, str]) -> dict[str, dict]:
    _step("3. evaluate: linear probe and k-NN on frozen features")
    from downstream.probe import knn_classify, probe_checkpoint

    evaluation: dict[str, dict] = {}
    for name, protocol in (("linear probe", "dino"), ("k-NN", "knn")):
        r = probe_checkpoint(run_dir, out / "shards" / "train", out / "shards" / "val", protocol=protocol,
                             cache_dir=out / "features", out_dir=out / "eval", pooling=POOLING)
        evaluation[name] = {"top1": r.top1, "top5": r.top5, "selection": r.selection}
        pictures[f"{name} confusion matrix"] = str(out / "eval" / f"{protocol}_confusion.png")
        print(f"{name:<14} top-1 {r.top1:.3f}  ({r.selection})")
    # The baseline beside the number: k-NN on the raw pixels of the same images.
    raw = [pixels(out / "shards" / split) for split in ("train", "val")]
    r = knn_classify(raw[0][0], raw[0][1], raw[1][0], raw[1][1])
    evaluation["k-NN raw pixels"] = {"top1": r.top1, "top5": r.top5, "selection": r.selection}
    print(f"{'k-NN raw pixels':<14} top-1 {r.top1:.3f}  (baseline: no model)")
    return evaluation


def _finetune_both(out: Path, run_dir: Path, epochs: int | None) -> dict[str, dict]:
    _step("4. fine-tune: from the MAE weights, and the same recipe from random weights (the baseline)")
    from downstream.finetune import finetune

    ft_overrides = [f"run.epochs={epochs}"] if epochs else []
    finetuned = {}
    for name, init in (("from MAE", []), ("from random weights", ["objective.supervised.init_from=''"])):
        r = finetune(run_dir, str(out / "shards" / "train"), str(out / "shards" / "val"),
                     out_dir=out / "runs" / ("finetune_mae" if not init else "finetune_random"),
                     recipe=FINETUNE_RECIPE, overrides=[*init, *ft_overrides])
        finetuned[name] = {"top1": r.top1, "top5": r.top5, "steps": r.settings["steps"]}
        print(f"fine-tuned {name:<20} top-1 {r.top1:.3f}  ({r.settings['steps']} updates)")
    return finetuned


def _index_and_query(out: Path, run_dir: Path, pictures: dict[str, str]):
    _step("5. index: FAISS over the train split, then query it")
    from downstream.search import build_index, query_index
    from shards.tar import iter_tar_samples, list_shards, open_shard

    index_dir = out / "index"
    build_index(run_dir, str(out / "shards" / "train"), index_dir, cache_dir=out / "features", pooling=POOLING)
    first_val = list_shards(str(out / "shards" / "val"))[0][0]
    with open_shard(first_val) as f:
        val_key, files = next(iter_tar_samples(f))
    query_png = out / f"query_{val_key}.png"
    query_png.write_bytes(files["png"])
    train_key = next(iter_tar_samples(open_shard(list_shards(str(out / "shards" / "train"))[0][0])))[0]
    sheet = out / "query_contact_sheet.png"
    answer = query_index(index_dir, images=[query_png], keys=[train_key], k=8, sheet=sheet)
    print(answer.table())
    pictures["query contact sheet"] = str(sheet)
    return index_dir, answer


def _print_summary(summary: dict, result, timings: dict[str, float], total: float, out: Path, index_dir: Path) -> None:
    headline, evaluation, finetuned = summary["headline"], summary["evaluation"], summary["finetune"]
    pre, base = finetuned["from MAE"], finetuned["from random weights"]
    print("\n== summary ==")
    verdict = "pretraining pays" if headline["pretraining_wins"] else "pretraining did NOT pay"
    print(f"  {verdict:<30} fine-tuned from MAE {pre['top1']:.3f} vs {base['top1']:.3f} from random weights "
          f"({headline['gain']:+.3f}; same recipe, {pre['steps']} updates each, {summary['shards']['val']} val digits)")
    print(f"  {'shards':<30} train {summary['shards']['train']}, val {summary['shards']['val']}")
    print(f"  {'pretrain (MAE)':<30} {result.steps} steps, final loss {result.final_loss:.4f}")
    for name, row in evaluation.items():
        top5 = f", top-5 {row['top5']:.3f}" if row.get("top5") is not None else ""
        print(f"  {name:<30} top-1 {row['top1']:.3f}{top5} on {summary['shards']['val']} val digits")
    for name, row in finetuned.items():
        print(f"  {'fine-tuned ' + name:<30} top-1 {row['top1']:.3f}, top-5 {row['top5']:.3f} ({row['steps']} updates)")
    for q, labels in summary["query"].items():
        print(f"  {'query ' + Path(q).name:<30} top-8 labels: {', '.join(str(x) for x in labels)}")
    print(f"  {'time':<30} {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    print("\nPictures:")
    for name, path in summary["pictures"].items():
        print(f"  {name:<28} {path}")
    print(f"  summary JSON                 {out / 'summary.json'}")
    print(f"\nSearch the index in a browser (http://127.0.0.1:8000/):\n  {_serve_command(index_dir)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m downstream.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="folder for everything the demo writes")
    parser.add_argument("--fresh", action="store_true", help="delete the demo folder first (only a folder an "
                        "earlier demo wrote)")
    parser.add_argument("--epochs", type=int, default=None, help="override the quickstart recipe's epochs")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="override the quickstart fine-tuning recipe's epochs (both fine-tunings)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not _claim_folder(out, args.fresh):
        return 2
    t_all = time.monotonic()
    timings: dict[str, float] = {}
    pictures: dict[str, str] = {}

    t = _step("1. shards: the built-in digits")
    summaries = write_demo_shards(out / "shards")
    pictures["sample grid"] = str(out / "shards" / "train_grid.png")
    timings["shards"] = time.monotonic() - t
    t = time.monotonic()
    result = _pretrain(out, args.epochs, pictures)
    run_dir = out / "runs" / "mae"
    timings["pretrain"] = time.monotonic() - t
    t = time.monotonic()
    evaluation = _evaluate(out, run_dir, pictures)
    timings["evaluate"] = time.monotonic() - t
    t = time.monotonic()
    finetuned = _finetune_both(out, run_dir, args.finetune_epochs)
    timings["fine-tune"] = time.monotonic() - t
    t = time.monotonic()
    index_dir, answer = _index_and_query(out, run_dir, pictures)
    timings["index+query"] = time.monotonic() - t

    total = time.monotonic() - t_all
    pre, base = finetuned["from MAE"], finetuned["from random weights"]
    headline = {"metric": "fine-tuned top-1 on val", "pretrained": pre["top1"], "baseline": base["top1"],
                "baseline_is": "the same fine-tuning recipe from random weights, same number of updates",
                "updates": pre["steps"], "gain": pre["top1"] - base["top1"],
                "pretraining_wins": pre["top1"] > base["top1"]}
    summary = {
        "headline": headline,
        "shards": {split: s.total for split, s in summaries.items()},
        "pretrain": {"steps": result.steps, "epochs": result.epochs_done, "final_loss": result.final_loss,
                     "run": str(run_dir)},
        "evaluation": {name: {k: v for k, v in row.items() if k in ("top1", "top5")}
                       for name, row in evaluation.items()},
        "finetune": finetuned,
        "query": {q: [h["label_name"] for h in hits] for q, hits in zip(answer.queries, answer.hits)},
        "seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(total, 1)},
        "pictures": pictures,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, result, timings, total, out, index_dir)
    return 0


def _serve_command(index_dir: Path) -> str:
    """The command that serves the demo's index, as run from here: this interpreter (relative when it lives
    below the working folder, like make's .venv) and the index path as the demo was given it."""
    python = os.path.abspath(sys.executable)  # not resolved: a venv's python is a link out of the venv
    if Path(python).is_relative_to(Path.cwd()):
        python = os.path.relpath(python)
    return shlex.join([python, "-m", "downstream", "serve", str(index_dir)])


if __name__ == "__main__":
    sys.exit(main())
