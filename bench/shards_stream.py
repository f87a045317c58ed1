"""Streaming-reader benchmark: ShardStream vs torchvision ImageFolder, side by side; prints one JSON object.

Fashion-MNIST training images (VITSSL_FMNIST_DIR) are written once as a shard set (shards.writer) and as
an ImageFolder tree holding the very same PNG bytes. Both are read through a DataLoader with the same work
per image (PNG decode keeping mode "L", then `shards.stream.to_float_tensor`: float CxHxW in [0, 1]),
batch 256, shuffled, for 0, 1 and 2 workers; images/s cover one whole epoch including worker start-up, best of
--repeats alternating epochs.
Two side measurements justify hand-written pieces: the tar parser in shards.stream vs webdataset's
tarfile-based one (samples/s, one process, no decode), and `to_float_tensor` vs transforms.v2
`pil_to_tensor` + `to_dtype` (microseconds per image; both give identical tensors).
`--quick` uses 600 images in 3 shards, batches of 100 and one epoch each (a smoke check); the default 20,000.

    python bench/shards_stream.py [--quick] [--images N] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import functional as F
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shards.sources import find_mnist_files, idx_source  # noqa: E402
from shards.stream import ShardStream, to_float_tensor  # noqa: E402
from shards.tar import iter_tar_samples
from shards.writer import write_shard_set  # noqa: E402

FMNIST_DIR = os.environ.get(
    "VITSSL_FMNIST_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashion-mnist"))
WORKERS = (0, 1, 2)
TARGET_PER_WORKER = 3000.0


def open_keeping_mode(path: str) -> Image.Image:
    """ImageFolder's loader without its RGB conversion, so both sides decode the same way."""
    image = Image.open(path)
    image.load()
    return image


def write_data(root: Path, n: int, per_shard: int = 1000) -> tuple[Path, Path, int]:
    images, labels = find_mnist_files(FMNIST_DIR)["train"]
    source = idx_source(images, labels)
    shards = root / "shards"
    write_shard_set(
        itertools.islice(iter(source), n),
        shards,
        classes=source.classes,
        source=source.description,
        samples_per_shard=per_shard,
    )
    folder = root / "imagefolder"
    for tar in sorted(shards.glob("*.tar")):  # the very bytes the shards hold, one PNG file each
        with open(tar, "rb") as f:
            for key, files in iter_tar_samples(f):
                label = files["cls"].decode()
                (folder / label).mkdir(parents=True, exist_ok=True)
                (folder / label / f"{key}.png").write_bytes(files["png"])
    return shards, folder, sum(1 for _ in folder.rglob("*.png"))


def images_per_second(loader: DataLoader, expected: int) -> float:
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += len(batch["image"] if isinstance(batch, dict) else batch[0])
    elapsed = time.perf_counter() - start
    if seen != expected:
        raise RuntimeError(f"read {seen} images, expected {expected}")
    return seen / elapsed


def parse_rates(shards: Path, n: int) -> dict[str, float]:
    """Samples/s of grouping the tars into samples, without decoding: ours vs webdataset's tarfile reader."""
    tars = sorted(str(p) for p in shards.glob("*.tar"))

    def ours() -> int:
        count = 0
        for t in tars:
            with open(t, "rb") as f:
                count += sum(1 for _ in iter_tar_samples(f))
        return count

    def webdataset_tarfile() -> int:
        streams = ({"url": t, "stream": gopen(t)} for t in tars)
        return sum(1 for _ in group_by_keys(tar_file_expander(streams)))

    rates = {}
    for name, fn in (("ours", ours), ("webdataset_tarfile", webdataset_tarfile)):
        start = time.perf_counter()
        if fn() != n:
            raise RuntimeError(f"{name} parser miscounted")
        rates[name] = round(n / (time.perf_counter() - start), 1)
    rates["ratio_ours_over_webdataset"] = round(rates["ours"] / rates["webdataset_tarfile"], 2)
    return rates


def conversion_us(folder: Path, n: int = 2000) -> dict[str, float]:
    images = [open_keeping_mode(str(p)) for p in itertools.islice(sorted(folder.rglob("*.png")), n)]
    out = {}
    for name, fn in (
        ("to_float_tensor", to_float_tensor),
        ("v2_pil_to_tensor_to_dtype", lambda im: F.to_dtype(F.pil_to_tensor(im), torch.float32, scale=True)),
    ):
        start = time.perf_counter()
        for image in images:
            fn(image)
        out[name] = round((time.perf_counter() - start) / len(images) * 1e6, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 images, batch 100, 1 epoch each (a smoke check)")
    parser.add_argument(
        "--images", type=int, default=0, help="images to use (default 20,000; 600 with --quick)"
    )
    parser.add_argument("--batch-size", type=int, default=0, help="default 256 (100 with --quick)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="epochs per alternative; the best counts (default 2; 1 with --quick)")
    args = parser.parse_args()
    n = args.images or (600 if args.quick else 20000)
    args.batch_size = args.batch_size or (100 if args.quick else 256)
    args.repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        start = time.perf_counter()
        # --quick: 200 per shard, so that 2 workers still split several shards
        shards, folder, n = write_data(Path(tmp), n, 200 if args.quick else 1000)
        write_seconds = time.perf_counter() - start
        results = {}
        for workers in WORKERS:
            stream = ShardStream(
                str(shards), batch_size=args.batch_size, num_workers=workers, shuffle_buffer=1000
            )
            dataset = ImageFolder(str(folder), loader=open_keeping_mode, transform=to_float_tensor)
            generator = torch.Generator().manual_seed(0)
            folder_loader = DataLoader(
                dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers, generator=generator
            )
            # Alternating epochs, best of each: a shared machine's drift then favours neither side.
            stream_rate = folder_rate = 0.0
            for epoch in range(args.repeats):
                stream.set_epoch(epoch)
                stream_rate = max(stream_rate, images_per_second(stream.loader(), n))
                folder_rate = max(folder_rate, images_per_second(folder_loader, n))
            per = max(1, workers)
            results[str(workers)] = {
                "stream_images_per_s": round(stream_rate, 1),
                "imagefolder_images_per_s": round(folder_rate, 1),
                "ratio_stream_over_imagefolder": round(stream_rate / folder_rate, 2),
                "stream_images_per_s_per_worker": round(stream_rate / per, 1),
                "imagefolder_images_per_s_per_worker": round(folder_rate / per, 1),
            }
        tar_parse = parse_rates(shards, n)
        conversion = conversion_us(folder)

    per_worker = [r["stream_images_per_s_per_worker"] for r in results.values()]
    print(
        json.dumps(
            {
                "benchmark": "shards_stream",
                "quick": args.quick,
                "images": n,
                "image": "Fashion-MNIST 28x28 PNG, mode L",
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "write_seconds": round(write_seconds, 2),
                "workers": results,
                "tar_parse_samples_per_s": tar_parse,
                "to_tensor_us_per_image": conversion,
                "target_per_worker_images_per_s": TARGET_PER_WORKER,
                "meets_target": min(per_worker) >= TARGET_PER_WORKER
                and all(r["ratio_stream_over_imagefolder"] >= 1.0 for r in results.values()),
                "cpu_count": os.cpu_count(),
                "load_average": list(os.getloadavg()),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
