"""One-shot GPU check (`make gpu-check`): four parts, each with its own time budget, in one JSON object.

  1. `throughput`: MAE ViT-B/16 and DINO ViT-S/16 training images/s and MFU: `bench/gpu_throughput.py`'s
     `measure` (its own JSON under `gpu_throughput`, the headline numbers beside).
  2. `precision`: every objective (MAE, DINO, CLIP, supervised; the Fashion-MNIST recipes under recipes/, built
     with `load_recipe` + `build_objective`) trains PARITY_STEPS steps (--quick: PARITY_STEPS_QUICK) in bf16 autocast and in strict fp32 (TF32
     off) from the same initial weights, the same batches (the objective's own train_transform on scikit-learn's
     digits, made once) and the same random streams (masks, drop path). The step is the trainer's: forward
     under autocast, backward, grad clip (recipe), `before_optimizer_step`, AdamW as the trainer builds it
     (`gpu_throughput.make_optimizer`: timm `create_optimizer_v2`, fused on CUDA, layer decay where the recipe
     sets it), `on_step_end`, at the recipe's peak lr (base_lr x batch / 256, constant: no warmup, harsher than a
     run's first steps). Passes when every loss is finite and the final losses differ by at most PARITY_TOL
     (relative to fp32).
  3. `augment`: images/s of `pretrain.augment`'s batched DINO multi-crop views on the device, when that module
     exists (else `{"skipped": ...}`).
  4. `fmnist_dino`: `recipes/dino_vit_tiny_fmnist.yaml` for up to FMNIST_MINUTES minutes in bf16 (`run.precision=bf16
     run.max_minutes=3`) on shards written here from $VITSSL_FMNIST_DIR (default ../shared/datasets/fashion-mnist
     beside the project); without those files, on the built-in digits (said in the JSON). Then the run's online
     k-NN (train_summary.json `online_knn`) and `downstream.probe`'s k-NN top-1 of the val split against train.

A part that fails or overruns its budget (SIGALRM) reports `status` "failed"/"timeout" with the error, and the
others still run. Budgets sum to under 8 minutes on a GPU. With `--quick`, or without a CUDA device, the same code
runs with tiny sizes on the CPU (< 30 s, same JSON shape). Everything written goes under `--out DIR` (kept) or a
temporary folder (removed); files are written under temporary names and renamed when complete.

    python bench/gpu_check.py [--quick] [--out DIR]

Prints one JSON object on stdout (logs go to stderr); with --out also writes DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

T0 = time.perf_counter()  # before the heavy imports (torch, timm): total_s counts them
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
sys.path.append(str(ROOT / "bench"))  # gpu_throughput, last: shadows nothing

import gpu_throughput as gt  # noqa: E402
import torch  # noqa: E402

from pretrain.objectives import build_objective  # noqa: E402
from pretrain.recipe import load_recipe  # noqa: E402
from shards.atomic import write_text_atomic  # noqa: E402

FMNIST_DIR = Path(os.environ.get("VITSSL_FMNIST_DIR", ROOT.parent / "shared" / "datasets" / "fashion-mnist"))
# Seconds per part on a GPU (sum 450 s < 8 minutes, leaving ~30 s for imports and CUDA start-up); --quick: CPU.
BUDGET = {"throughput": 100, "precision": 45, "augment": 25, "fmnist_dino": 280}
# Quick (the CPU smoke in make test): generous upper bounds, since the suite runs beside other tests; each part
# ends when done. fmnist_dino trains for what its budget leaves, so its budget is its length.
BUDGET_QUICK = {"throughput": 60, "precision": 60, "augment": 40, "fmnist_dino": 30}
FMNIST_MINUTES = 3.0
PARITY_STEPS = 20
PARITY_STEPS_QUICK = 6  # --quick (the CPU smoke): the same comparison over fewer updates
PARITY_TOL = 0.05  # |final loss bf16 - fp32| / |fp32|
PARITY_RECIPES = {
    "mae": ("recipes/mae_vit_tiny_fmnist.yaml", []),
    "dino": ("recipes/dino_vit_tiny_fmnist.yaml", []),
    "clip": ("recipes/clip_vit_tiny_fmnist.yaml",
             ["objective.clip.class_names=[zero,one,two,three,four,five,six,seven,eight,nine]"]),
    "supervised": ("recipes/finetune_vit_tiny_fmnist.yaml",
                   ["objective.supervised.init_from=''", "objective.supervised.num_classes=10"]),
}
TINY_MODEL = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2"]
TINY = {
    "mae": ["objective.mae.decoder_embed_dim=32", "objective.mae.decoder_depth=1", "objective.mae.decoder_num_heads=2"],
    "dino": ["objective.dino.out_dim=256", "objective.dino.hidden_dim=64", "objective.dino.bottleneck_dim=32"],
    "clip": ["objective.clip.embed_dim=32", "objective.clip.text_width=32", "objective.clip.text_layers=1"],
    "supervised": [],
}
AUGMENT_RECIPES = {"dino_vit_small_in1k": "recipes/dino_vit_small_in1k.yaml",
                   "dino_vit_tiny_fmnist": "recipes/dino_vit_tiny_fmnist.yaml"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise PartTimeout in the main thread once `seconds` have passed (checked between Python bytecodes, so a
    long kernel finishes first)."""
    def on_alarm(signum, frame):
        raise PartTimeout(f"over its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_part(name: str, budget: float, fn: Callable[[float], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    log(f"--- {name} (budget {budget:.0f} s)")
    t0 = time.perf_counter()
    try:
        with deadline(budget), contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON alone
            out = fn(budget)
        out = {"status": "skipped" if "skipped" in out else "ok", **out}
    except PartTimeout as e:
        out = {"status": "timeout", "error": str(e)}
    except Exception as e:  # noqa: BLE001 -- one broken part must not hide the others
        out = {"status": "failed", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc().splitlines()[-8:]}
    if out["status"] in ("failed", "timeout"):
        log(f"{name}: {out['status']}: {out['error']}")
    out["seconds"], out["budget_s"] = round(time.perf_counter() - t0, 2), budget
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def sync(device: torch.device) -> None:
    gt.sync(device)


# ------------------------------------------------------------------------------------------------ 1. throughput


def part_throughput(quick: bool, device: torch.device) -> dict[str, Any]:
    args = gt.parse_args(["--quick"] if quick else ["--device", str(device)])
    res = gt.measure(args)
    keys = ("batch_size", "images_per_s", "images_per_s_best_step", "step_ms_median", "achieved_tflops", "mfu",
            "mfu_vs_datasheet", "peak_mem_gib", "counted_over_analytic")
    out: dict[str, Any] = {v: {k: res[v].get(k) for k in keys if k in res[v]} for v in ("mae", "dino")}
    out["mae"]["model"], out["dino"]["model"] = res["mae"]["config"]["model"], res["dino"]["config"]["model"]
    out["peak_matmul_flops_per_s"] = res["peak_matmul"]["flops_per_s_used"]
    out["mfu_target_mae"], out["meets_target"] = res["mfu_target_mae"], res["meets_target"]
    out["gpu_throughput"] = res  # its whole JSON, as `python bench/gpu_throughput.py` prints it
    return out


# ------------------------------------------------------------------------------------------------ 2. precision


def parity_recipe(kind: str, quick: bool):
    path, extra = PARITY_RECIPES[kind]
    overrides = list(extra)
    if quick:
        overrides += TINY_MODEL + TINY[kind] + ["data.batch_size=8"]
    return path, load_recipe(ROOT / path, overrides)


def digits_batches(obj, batch_size: int, n_batches: int, source=None) -> list[dict[str, Any]]:
    """`n_batches` collated batches of the objective's own training views of scikit-learn's digits (seeded);
    `source`: a `digits_source()` already loaded (--quick loads it once for the four objectives)."""
    from shards.sources import digits_source

    samples = list(itertools.islice(iter(source if source is not None else digits_source()), batch_size * n_batches))
    while len(samples) < batch_size * n_batches:  # 1,797 digits: cycle for large batches
        samples += samples[: batch_size * n_batches - len(samples)]
    torch.manual_seed(0)
    transform = obj.train_transform()
    batches = []
    for b in range(n_batches):
        chunk = samples[b * batch_size:(b + 1) * batch_size]
        views = [transform(s.image) for s in chunk]
        image = ([torch.stack([v[i] for v in views]) for i in range(len(views[0]))] if isinstance(views[0], list)
                 else torch.stack(views))
        batches.append({"image": image, "label": torch.tensor([s.label for s in chunk]),
                        "index": torch.arange(b * batch_size, (b + 1) * batch_size)})
    return batches


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True)
        return [move(v) for v in x] if isinstance(x, list) else x

    return {k: move(v) for k, v in batch.items()}


def train_losses(obj0, recipe, batches: list[dict[str, Any]], device: torch.device, bf16: bool,
                 steps: int) -> list[float]:
    """Losses of `steps` trainer-style updates of a copy of `obj0` (same seed for masks / drop path)."""
    obj = copy.deepcopy(obj0).to(device).train()
    batch_size = len(batches[0]["label"])
    opt = gt.make_optimizer(obj, recipe, device, batch_size)
    torch.manual_seed(1)
    clip = recipe.optim.clip_grad
    obj.on_epoch_start(0, steps)
    losses = []
    for step in range(steps):
        batch = to_device(batches[step % len(batches)], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = obj(batch)
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):  # the trainer skips the update
            opt.zero_grad(set_to_none=True)
            continue
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(obj.parameters(), clip)
        obj.before_optimizer_step(step, steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.on_step_end(step + 1, steps)
    sync(device)
    return losses


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 means fp32: no TF32 in matmuls or convolutions (the patch embedding) while the block runs."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def num(x: float, digits: int) -> float | None:
    """Rounded, or None for NaN/inf (which strict JSON cannot hold)."""
    return round(x, digits) if math.isfinite(x) else None


def rel(a: float, b: float) -> float | None:
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    return abs(a - b) / max(abs(b), 1e-12)


def part_precision(quick: bool, device: torch.device) -> dict[str, Any]:
    steps = PARITY_STEPS_QUICK if quick else PARITY_STEPS
    digits = None
    if quick:
        from shards.sources import digits_source

        digits = digits_source()
    out: dict[str, Any] = {
        "steps": steps, "tolerance_rel_final_loss": PARITY_TOL,
        "bf16": f"torch.autocast({device.type!r}, bfloat16) (what Accelerate's run.precision=bf16 enters)",
        "fp32": "no autocast, TF32 off (matmul and cuDNN)",
        "inputs": "the objective's train_transform on scikit-learn digits, made once, the same for both",
        "lr": "recipe peak (base_lr x batch / 256), constant",
    }
    ok = True
    for kind in PARITY_RECIPES:
        t0 = time.perf_counter()
        try:
            path, recipe = parity_recipe(kind, quick)
            torch.manual_seed(0)
            obj0 = build_objective(recipe)
            batches = digits_batches(obj0, recipe.data.batch_size, 2 if quick else 4, digits)
            bf = train_losses(obj0, recipe, batches, device, True, steps)
            with strict_fp32():
                fp = train_losses(obj0, recipe, batches, device, False, steps)
            finite = all(math.isfinite(x) for x in bf + fp)
            r_final, r_first = rel(bf[-1], fp[-1]), rel(bf[0], fp[0])
            passed = finite and r_final is not None and r_final <= PARITY_TOL
            entry: dict[str, Any] = {
                "recipe": path, "batch_size": recipe.data.batch_size, "all_finite": finite,
                "final_loss_bf16": num(bf[-1], 6), "final_loss_fp32": num(fp[-1], 6),
                "rel_diff_final": None if r_final is None else round(r_final, 6),
                "rel_diff_first_step": None if r_first is None else round(r_first, 6),
                "pass": passed,
                "loss_bf16": [num(x, 5) for x in bf], "loss_fp32": [num(x, 5) for x in fp],
            }
        except PartTimeout:
            raise
        except Exception as e:  # noqa: BLE001 -- one objective's failure is reported, the others still run
            entry = {"pass": False, "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc().splitlines()[-6:]}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"precision {kind}: pass={entry['pass']} rel_diff_final={entry.get('rel_diff_final')}")
        ok = ok and entry["pass"]
        out[kind] = entry
    out["all_pass"] = ok
    return out


# ------------------------------------------------------------------------------------------------ 3. augment


def part_augment(quick: bool, device: torch.device) -> dict[str, Any]:
    try:
        import pretrain.augment as augment
    except ImportError:
        return {"skipped": "pretrain.augment not built yet"}
    make = getattr(augment, "BatchedMultiCrop", None)
    if not callable(make):
        return {"skipped": "pretrain.augment has no BatchedMultiCrop (the DINO multi-crop views) yet"}
    from pretrain.transforms import normalize_stats

    seeds_for = getattr(augment, "sample_seeds", None)
    batch, reps, warmup = (4, 1, 1) if quick else (128, 10, 2)
    out: dict[str, Any] = {"callable": "pretrain.augment.BatchedMultiCrop", "batch_size": batch, "timed_calls": reps,
                           "input": "random uint8 images on the device; images/s = batch x calls / seconds"}
    for name, path in AUGMENT_RECIPES.items():
        r = load_recipe(ROOT / path)
        c, ch = r.objective.dino, r.model.in_chans
        mean, std = (list(c.mean), list(c.std)) if c.mean else [list(v) for v in normalize_stats(ch)]
        if len(mean) == 1:
            mean, std = mean * ch, std * ch
        aug = make(in_chans=ch, mean=mean, std=std, global_size=c.global_crop_size or r.model.img_size,  # 0: img_size
                   global_scale=tuple(c.global_crops_scale), local_number=c.local_crops_number,
                   local_size=c.local_crop_size, local_scale=tuple(c.local_crops_scale))
        side = r.model.img_size if r.model.img_size <= 32 else (64 if quick else 256)  # ImageNet: a decoded 256 side
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch, ch, side, side), generator=g, dtype=torch.uint8).to(device)
        index = torch.arange(batch)
        seeds = seeds_for(0, 0, index) if callable(seeds_for) else index
        for _ in range(warmup):
            aug(images, seeds)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            views = aug(images, seeds)
        sync(device)
        dt = time.perf_counter() - t0
        sizes = [f"{v.shape[-2]}x{v.shape[-1]}" for v in views]
        out[name] = {"source_image": f"{ch}x{side}x{side} uint8",
                     "views": ", ".join(f"{n} x {s}" for s, n in Counter(sizes).items()),
                     "images_per_s": round(batch * reps / dt, 1), "ms_per_batch": round(1000 * dt / reps, 2)}
    return out


# ------------------------------------------------------------------------------------------------ 4. fmnist_dino


def write_shards(data: Path, quick: bool) -> dict[str, Any]:
    """data/train + data/val from Fashion-MNIST's IDX files (quick: the first 400 / 200), else the digits."""
    from shards.sources import digits_source, find_mnist_files, mnist_splits
    from shards.writer import write_shard_set, write_split_shard_sets

    try:
        find_mnist_files(FMNIST_DIR)
    except FileNotFoundError as e:
        src = digits_source()
        write_split_shard_sets(src, data, val_fraction=0.2, seed=0, classes=src.classes, source=src.description)
        return {"source": "digits (scikit-learn 8x8, shards.sources.digits_source; val 20% by key hash)",
                "fashion_mnist": f"absent: {e}", "fmnist_dir": str(FMNIST_DIR)}
    limits = {"train": 400, "val": 200} if quick else {}
    for split, src in mnist_splits(FMNIST_DIR, _fmnist_classes()).items():
        samples = itertools.islice(iter(src), limits[split]) if split in limits else src
        write_shard_set(samples, data / split, classes=src.classes, source=src.description, split=split)
    return {"source": "fashion-mnist" + (" (quick: first 400 train / 200 test)" if quick else " (60,000 / 10,000)"),
            "fmnist_dir": str(FMNIST_DIR)}


def _fmnist_classes() -> list[str]:
    from shards.sources import resolve_classes

    return resolve_classes("fashion-mnist")


def part_fmnist_dino(quick: bool, device: torch.device, out_dir: Path, budget: float) -> dict[str, Any]:
    from pretrain.trainer import train

    t0 = time.perf_counter()
    data = out_dir / "data"
    out: dict[str, Any] = {"recipe": "recipes/dino_vit_tiny_fmnist.yaml", "data": write_shards(data, quick)}
    out["shards_seconds"] = round(time.perf_counter() - t0, 2)
    # what is left of the budget after the shards, less ~45 s (quick: 10) for start-up, the end evaluation, the k-NN
    reserve = 10 if quick else 45
    minutes = min(FMNIST_MINUTES, max(0.1, (budget - (time.perf_counter() - t0) - reserve) / 60))
    workers = 0 if quick else min(8, max(1, (os.cpu_count() or 2) - 1))
    overrides = [f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"run.out_dir={out_dir / 'run'}",
                 "run.precision=bf16", f"run.max_minutes={minutes:.3f}", f"data.num_workers={workers}",
                 "run.progress=false", "run.trackers=[jsonl]", f"run.cpu={str(device.type != 'cuda').lower()}",
                 # the recipe's 5-minute online k-NN would never run in 3 minutes (nor, then, at the end)
                 "eval.every_minutes=1"]
    if quick:
        overrides += TINY_MODEL + TINY["dino"] + ["data.batch_size=32", "run.max_steps=4", "data.shuffle_buffer=64",
                                                  "eval.every_steps=2", "eval.holdout=200", "eval.bank_samples=500"]
    out["overrides"], out["minutes"] = overrides[3:], round(minutes, 3)
    recipe = load_recipe(ROOT / out["recipe"], overrides)
    t1 = time.perf_counter()
    result = train(recipe)
    out["train"] = {"seconds": round(time.perf_counter() - t1, 2), "steps": result.steps,
                    "epochs_done": result.epochs_done, "samples_seen": result.samples_seen,
                    "images_per_s": round(result.samples_seen / max(result.wall_seconds, 1e-9), 1),
                    "final_loss": result.final_loss if math.isfinite(result.final_loss) else None,
                    "nonfinite_skipped": result.nonfinite_skipped, "stopped_early": result.stopped_early,
                    "collapse_alarms": result.collapse_alarms}
    summary = out_dir / "run" / "train_summary.json"
    out["online_knn"] = json.loads(summary.read_text()).get("online_knn") if summary.is_file() else result.online_knn
    try:
        from downstream.probe import probe_checkpoint
        from pretrain.restore import load_backbone_from

        backbone = load_backbone_from(out_dir / "run").to(device)
        knn = probe_checkpoint(backbone, data / "train", data / "val", protocol="knn", batch_size=512,
                               num_workers=workers, out_dir=out_dir / "knn")
        out["knn_val"] = {"top1": round(knn.top1, 4), "num_train": knn.num_train, "num_test": knn.num_test,
                          "what": "downstream.probe k-NN (k=20, T=0.07, CLS) of data/val against data/train"}
    except PartTimeout:
        raise
    except Exception as e:  # noqa: BLE001 -- the run's online k-NN above still stands
        out["knn_val"] = {"error": f"{type(e).__name__}: {e}"}
    return out


# ------------------------------------------------------------------------------------------------ main


def versions(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {"device": gt.device_name(device), "device_type": device.type, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "cuda_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (< 30 s), same JSON shape")
    ap.add_argument("--out", type=Path, default=None, help="keep everything here (default: a temporary folder)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = T0 if argv is None else time.perf_counter()
    cuda = torch.cuda.is_available() and not args.quick
    quick = not cuda  # no CUDA device: the quick sizes on the CPU
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    budget = BUDGET_QUICK if quick else BUDGET
    result: dict[str, Any] = {"benchmark": "gpu_check", "quick": quick, **versions(device)}
    if quick and not args.quick:
        result["note"] = "no CUDA device: ran the --quick sizes on the CPU (a smoke test, not GPU numbers)"
    with contextlib.ExitStack() as stack:
        if args.out is None:
            out_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-")))
        else:
            out_dir = args.out
            out_dir.mkdir(parents=True, exist_ok=True)
            for stale in ("data", "run", "knn"):  # a rerun starts from scratch, not from the last run's checkpoint
                shutil.rmtree(out_dir / stale, ignore_errors=True)
        parts = {
            "throughput": lambda b: part_throughput(quick, device),
            "precision": lambda b: part_precision(quick, device),
            "augment": lambda b: part_augment(quick, device),
            "fmnist_dino": lambda b: part_fmnist_dino(quick, device, out_dir, b),
        }
        for name, fn in parts.items():
            result[name] = run_part(name, budget[name], fn, device)
        result["ok"] = (all(result[p]["status"] in ("ok", "skipped") for p in parts)
                        and bool(result["precision"].get("all_pass")))
        result["total_s"] = round(time.perf_counter() - t_start, 2)
        text = json.dumps(result, indent=2, default=str)
        if args.out is not None:
            write_text_atomic(out_dir / "gpu_check.json", text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
