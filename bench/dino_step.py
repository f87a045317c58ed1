"""DINO training-step throughput for the Fashion-MNIST recipe: multi-crop (2 global + N local crops) vs the same
backbone and head with the 2 global crops only.

Both variants are built from `recipes/dino_vit_tiny_fmnist.yaml` (the global-only one with
`objective.dino.local_crops_number=0`). One step = student forward on every view + teacher forward on the global
views + backward + AdamW step + teacher EMA, on fixed random views. The variants are interleaved round by round
(a busy machine slows both alike); images/s is the batch size over the median step time (the best step is
reported too: on a shared machine it is the least disturbed one). The per-sample view transform runs in the
DataLoader workers, so its rate (samples/s on one core, 28x28 gray PIL images) is reported beside: a run is
limited by the slower of the two.

    python bench/dino_step.py [--quick] [--batch-size 128] [--threads 1]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

from pretrain.objectives import build_objective  # noqa: E402
from pretrain.objectives.dino import DINO  # noqa: E402
from pretrain.recipe import load_recipe  # noqa: E402

RECIPE = ROOT / "recipes" / "dino_vit_tiny_fmnist.yaml"
VARIANTS = {"multicrop": [], "global_only": ["objective.dino.local_crops_number=0"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 16, 2 blocks, few steps (a smoke check), same JSON shape")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (quick: 16)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 5, quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--transform-samples", type=int, default=None, help="default 300 (quick 30)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.transform_samples = args.transform_samples or (30 if args.quick else 300)
    return args


def build(overrides: list[str], args: argparse.Namespace):
    torch.manual_seed(0)  # both variants start from the same weights
    # augment=pil: the per-sample view transform is what transform_rate measures (the recipe makes batched views)
    quick = ["model.depth=2"] if args.quick else []  # --quick: 2 of the recipe's 4 blocks, the same code path
    recipe = load_recipe(RECIPE, ["objective.dino.augment=pil", *quick, *overrides])
    dino: DINO = build_objective(recipe).to(args.device).train()
    optim = recipe.optim
    opt = create_optimizer_v2(dino, optim.name, lr=1e-4, weight_decay=optim.weight_decay,
                              betas=tuple(optim.betas))
    b = args.batch_size or (16 if args.quick else recipe.data.batch_size)
    c, g, dino_cfg = dino.in_chans, dino.global_size, dino.cfg
    views = [torch.randn(b, c, g, g, device=args.device) for _ in range(2)]
    views += [torch.randn(b, c, dino_cfg.local_crop_size, dino_cfg.local_crop_size, device=args.device)
              for _ in range(dino_cfg.local_crops_number)]
    return dino, opt, {"image": views}, b


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(dino: DINO, opt, batch, i: int) -> float:
    loss, _ = dino(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    dino.on_step_end(i + 1, 1000)
    return float(loss.detach())


def transform_rate(dino: DINO, n: int) -> float:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L") for _ in range(16)]
    transform = dino.train_transform()
    for im in images[:4]:
        transform(im)
    t0 = time.perf_counter()
    for i in range(n):
        transform(images[i % len(images)])
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    built = {name: build(ov, args) for name, ov in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    losses: dict[str, float] = {}
    for dino, opt, batch, _ in built.values():
        step(dino, opt, batch, 0)  # warm-up, untimed
    for _ in range(args.rounds):
        for name, (dino, opt, batch, _) in built.items():
            for i in range(args.steps):
                sync(args.device)
                t0 = time.perf_counter()
                losses[name] = step(dino, opt, batch, i + 1)
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
    result: dict = {"bench": "dino_step", "recipe": str(RECIPE.relative_to(ROOT)), "device": args.device,
                    "threads": args.threads, "quick": args.quick}
    for name, (dino, _, batch, b) in built.items():
        views = batch["image"]
        result[name] = {
            "views": [f"{v.shape[-2]}x{v.shape[-1]}" for v in views],
            "student_tokens_per_image": sum((v.shape[-2] // dino.patch_size) * (v.shape[-1] // dino.patch_size) + 1
                                            for v in views),
            "batch_size": b,
            "images_per_s": b / statistics.median(times[name]),
            "images_per_s_best": b / min(times[name]),
            "transform_samples_per_s_one_core": transform_rate(dino, args.transform_samples),
            "loss": losses[name],
        }
    m, g = result["multicrop"], result["global_only"]
    result["multicrop_over_global_only"] = {
        "images_per_s": m["images_per_s"] / g["images_per_s"],
        "transform_samples_per_s": m["transform_samples_per_s_one_core"] / g["transform_samples_per_s_one_core"],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
