"""DINO multi-crop views: per-sample PIL/torchvision (`pretrain.multicrop`, what DataLoader workers do today) against
batched tensors (`pretrain.augment`, what the training device can do), side by side in one run; prints JSON.

Two settings, both DINO's augmentation (crops, flips, colour jitter, blur, solarize, normalise):
  * `fmnist`: 1-channel 28x28 images, 2 global 28x28 + 4 local 14x14 views (recipes/dino_vit_tiny_fmnist.yaml);
  * `rgb64`:  3-channel 64x64 images (Fashion-MNIST tinted per image), 2 x 64 + 6 x 32 views (hue, saturation and
              grayscale active too).
Images are decoded once beforehand (PIL images for the per-sample path, one uint8 tensor for the batched path):
decoding is the same work for both and not what is compared. The two paths run interleaved in rounds of one
batch each; images/s = batch / median round time; `ratio` = batched / per-sample. One process, the threads
OMP_NUM_THREADS gives (set it). CPU only here; on a GPU the batched path runs on the device (`--device cuda`).

    python bench/augment.py [--quick] [--batch 128] [--rounds 12] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pretrain.augment import BatchedMultiCrop, sample_seeds  # noqa: E402
from pretrain.multicrop import MultiCropTransform  # noqa: E402

FMNIST_DIR = Path(os.environ.get("VITSSL_FMNIST_DIR", ROOT.parent / "shared" / "datasets" / "fashion-mnist"))


def source_images(n: int) -> tuple[np.ndarray, str]:
    """n grayscale 28x28 uint8 images: Fashion-MNIST when it is there, else the digits enlarged to 28x28."""
    if FMNIST_DIR.is_dir():
        from shards.sources import find_mnist_files, read_idx

        images_path, _ = find_mnist_files(FMNIST_DIR)["train"]
        return np.asarray(read_idx(images_path)[:n]), "fashion-mnist"
    from sklearn.datasets import load_digits

    digits = (load_digits().images * 255 / 16).astype(np.uint8)
    reps = -(-n // len(digits))
    big = [np.asarray(Image.fromarray(d).resize((28, 28), Image.BICUBIC)) for d in digits]
    return np.stack((big * reps)[:n]), "digits (Fashion-MNIST absent)"


def settings(gray: np.ndarray) -> dict:
    rng = np.random.default_rng(0)
    tint = rng.uniform(0.3, 1.0, size=(len(gray), 1, 1, 3))
    rgb = np.stack([np.asarray(Image.fromarray(g).resize((64, 64), Image.BICUBIC)) for g in gray])
    rgb = (rgb[..., None] * tint).astype(np.uint8)
    return {
        "fmnist": dict(arrays=gray[:, None], pil=[Image.fromarray(g) for g in gray],
                       kw=dict(in_chans=1, mean=[0.286], std=[0.353], global_size=28, local_number=4, local_size=14)),
        "rgb64": dict(arrays=rgb.transpose(0, 3, 1, 2), pil=[Image.fromarray(c) for c in rgb],
                      kw=dict(in_chans=3, mean=[0.5] * 3, std=[0.25] * 3, global_size=64, local_number=6,
                              local_size=32)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 16, 2 rounds: a smoke check, same JSON shape")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    batch, rounds = (16, 2) if a.quick else (a.batch, a.rounds)
    device = torch.device(a.device)
    started = time.perf_counter()
    gray, data = source_images(batch)
    results = {}
    for name, s in settings(gray).items():
        per_sample = MultiCropTransform(**s["kw"])
        batched = BatchedMultiCrop(**s["kw"])
        x = torch.from_numpy(np.array(s["arrays"])).to(device)  # a copy: the IDX array is read-only
        times: dict[str, list[float]] = {"per_sample": [], "batched": []}
        for r in range(rounds + 1):  # round 0 warms up
            t0 = time.perf_counter()
            views = [per_sample(img) for img in s["pil"]]
            _ = [torch.stack(v) for v in zip(*views)]  # the collate a DataLoader does
            t1 = time.perf_counter()
            out = batched(x, sample_seeds(0, r, torch.arange(batch)))
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if r:
                times["per_sample"].append(t1 - t0)
                times["batched"].append(t2 - t1)
        rate = {k: batch / statistics.median(v) for k, v in times.items()}
        sizes = ["x".join(map(str, v.shape[1:])) for v in out]
        results[name] = {
            "views": " + ".join(f"{sizes.count(sz)} of {sz}" for sz in dict.fromkeys(sizes)),
            "per_sample_images_per_s": round(rate["per_sample"], 1),
            "batched_images_per_s": round(rate["batched"], 1),
            "ratio": round(rate["batched"] / rate["per_sample"], 2),
        }
    print(json.dumps({
        "bench": "augment", "quick": a.quick, "data": data, "batch": batch, "rounds": rounds, "device": str(device),
        "threads": torch.get_num_threads(), "results": results, "seconds": round(time.perf_counter() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
