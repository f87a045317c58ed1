"""MAE training-step throughput: encoder on the visible 25% vs every token (mask tokens too) through the encoder.

Same backbone (ViT-Tiny dimensions: 192-d, 12 blocks, 3 heads; 28x28 gray images, patch 4 -> 49 patches) and the
same light decoder for both; one step = forward + backward + AdamW step. Throughput is measured in this process,
the two variants interleaved round by round (a busy machine slows both alike); images/s is the batch size over
the median step time of all timed steps (the best step is reported too: on a shared machine it is the least
disturbed one).

Peak memory: on CUDA `torch.cuda.max_memory_allocated` in this process; on CPU each variant runs in a fresh
subprocess and reports its peak resident set (VmHWM in /proc/self/status; not ru_maxrss, which a spawned child
inherits from its parent) minus the resident set just before its first training step, i.e. what the steps
themselves (activations, grads, AdamW state) added.

    python bench/mae_step.py [--quick] [--batch-size 64] [--decoder-embed-dim 128 ...]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

from pretrain.backbone import create_backbone  # noqa: E402
from pretrain.objectives.mae import MAE, num_kept  # noqa: E402
from pretrain.recipe import MAEConfig, ModelConfig  # noqa: E402

VARIANTS = {"baseline_all_tokens": True, "mae_visible_only": False}  # name -> mask_tokens_in_encoder
TARGET_SPEEDUP = 2.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batch, 2 blocks, few steps, memory workers side by side (a smoke check), same JSON shape")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64 (quick: 16)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 5, quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--decoder-embed-dim", type=int, default=128)
    ap.add_argument("--decoder-depth", type=int, default=2)
    ap.add_argument("--depth", type=int, default=None, help="encoder blocks (default 12, ViT-Tiny; quick 2)")
    ap.add_argument("--decoder-num-heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch_size = args.batch_size or (16 if args.quick else 64)
    args.steps = args.steps or (2 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.depth = args.depth or (2 if args.quick else 12)
    return args


def build(args: argparse.Namespace, mask_tokens_in_encoder: bool) -> tuple[MAE, torch.optim.Optimizer]:
    torch.manual_seed(0)  # both variants start from the same backbone weights
    backbone = create_backbone(
        ModelConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=args.depth, num_heads=3, pos_embed="sincos")
    )
    cfg = MAEConfig(
        mask_ratio=args.mask_ratio,
        decoder_embed_dim=args.decoder_embed_dim,
        decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads,
        norm_pix_loss=True,
        mask_tokens_in_encoder=mask_tokens_in_encoder,
    )
    mae = MAE(backbone, cfg).to(args.device).train()
    opt = create_optimizer_v2(mae, "adamw", lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95))
    return mae, opt


def train_steps(mae: MAE, opt: torch.optim.Optimizer, images: torch.Tensor, n: int) -> list[float]:
    """Run `n` optimizer steps; return each step's wall seconds."""
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        loss, _ = mae({"image": images})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set ("VmRSS") or its peak so far ("VmHWM"), MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(args: argparse.Namespace) -> None:
    """(subprocess) Peak RSS added by training steps of one variant, printed as JSON."""
    torch.set_num_threads(args.threads)
    mae, opt = build(args, VARIANTS[args.memory_worker])
    images = torch.randn(args.batch_size, 1, 28, 28)
    before = rss_mib()
    train_steps(mae, opt, images, 2)
    print(json.dumps({"peak_mib": round(rss_mib("VmHWM") - before, 1)}))


def memory_worker_cmd(args: argparse.Namespace, variant: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--memory-worker", variant,
           "--batch-size", str(args.batch_size), "--mask-ratio", str(args.mask_ratio),
           "--decoder-embed-dim", str(args.decoder_embed_dim), "--decoder-depth", str(args.decoder_depth), "--depth", str(args.depth),
           "--decoder-num-heads", str(args.decoder_num_heads), "--threads", str(args.threads), "--device", "cpu"]


def peak_from(stdout: str) -> float:
    return json.loads(stdout.strip().splitlines()[-1])["peak_mib"]


def cpu_peak_mib(args: argparse.Namespace, variant: str) -> float:
    out = subprocess.run(memory_worker_cmd(args, variant), capture_output=True, text=True, check=True)
    return peak_from(out.stdout)


def start_memory_workers(args: argparse.Namespace) -> dict[str, subprocess.Popen]:
    """--quick on CPU: both memory workers started at once, beside the timing (their torch imports are most of a
    quick run's wall time); each is still its own fresh process, so its peak RSS is its own."""
    return {name: subprocess.Popen(memory_worker_cmd(args, name), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for name in VARIANTS}


def collect_memory_workers(procs: dict[str, subprocess.Popen]) -> dict[str, float]:
    peaks = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, stdout, stderr)
        peaks[name] = peak_from(stdout)
    return peaks


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return {}
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    early = start_memory_workers(args) if args.quick and device.type != "cuda" else None
    images = torch.randn(args.batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)
    models = {name: build(args, flag) for name, flag in VARIANTS.items()}
    for mae, opt in models.values():
        train_steps(mae, opt, images, args.warmup)
    step_s: dict[str, list[float]] = {name: [] for name in VARIANTS}
    peak: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (mae, opt) in models.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step_s[name] += train_steps(mae, opt, images, args.steps)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    if device.type != "cuda":
        del models  # the memory workers run one at a time; free this process's share first
        peak = collect_memory_workers(early) if early else {name: cpu_peak_mib(args, name) for name in VARIANTS}

    n = 49
    kept = num_kept(n, args.mask_ratio)
    result: dict = {
        "benchmark": "mae_step",
        "quick": args.quick,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "config": {
            "backbone": f"vit_tiny dims: embed 192, depth {args.depth}, heads 3; img 28x28x1, patch 4 (49 patches)",
            "decoder": {"embed_dim": args.decoder_embed_dim, "depth": args.decoder_depth,
                        "num_heads": args.decoder_num_heads},
            "mask_ratio": args.mask_ratio,
            "batch_size": args.batch_size,
            "timed_steps_per_round": args.steps,
            "rounds": args.rounds,
            "step": "forward + backward + AdamW step, random images",
        },
        "memory_method": (
            "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "CPU: fresh subprocess per variant, peak RSS (VmHWM) minus RSS before the first of 2 steps"
            + (" (--quick: both subprocesses run at once, beside the timing)" if early else "")
        ),
    }
    for name, flag in VARIANTS.items():
        median, best = statistics.median(step_s[name]), min(step_s[name])
        result[name] = {
            "encoder_tokens": 1 + (n if flag else kept),
            "images_per_s": round(args.batch_size / median, 2),
            "images_per_s_best_step": round(args.batch_size / best, 2),
            "step_ms_median": round(1000 * median, 1),
            "timed_steps": len(step_s[name]),
            "peak_mem_mib": round(peak[name], 1),
        }
    a, b = result["baseline_all_tokens"], result["mae_visible_only"]
    result["speedup_mae_over_baseline"] = round(b["images_per_s"] / a["images_per_s"], 3)
    result["speedup_best_steps"] = round(b["images_per_s_best_step"] / a["images_per_s_best_step"], 3)
    result["memory_ratio_baseline_over_mae"] = round(a["peak_mem_mib"] / max(b["peak_mem_mib"], 1e-9), 3)
    result["target_speedup"] = TARGET_SPEEDUP
    result["target_met"] = result["speedup_mae_over_baseline"] >= TARGET_SPEEDUP
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
