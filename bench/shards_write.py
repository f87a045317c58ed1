"""Shard-writer benchmark: images/s of `write_shard_set` from a folder of JPEG files at workers=1 and 2,
side by side in one run; prints one JSON object.

The bench makes its own image folder in a temporary directory (no downloads): scikit-learn's bundled digits
(`shards.sources.digits_source`, cycled when more images are asked for), each colourised at S x S
(`shards.colourise.colourise_image`, seeded by its index: textured background, tinted digit), cropped to
S x 3S/4 (landscape, like a photo), given mild sensor-like noise and saved as JPEG quality 90 under
ROOT/<label>/. That folder is written as a shard set through `shards.sources.image_folder_source` with
`resize=Resize(64)` (store at training size: every image is opened, decoded, centre-cropped and scaled to
64 x 64, PNG-encoded and measured) at workers=1 (in process) and workers=2 (a forkserver pool of two; its
start-up counts, as it does for `python -m shards write --workers 2`), alternating `--repeats` times;
images/s = images / wall seconds of the whole `write_shard_set` call (manifest and sha256 included), best of
the repeats. `ratio_workers2_over_workers1` is the speed-up; `identical_shards` says both outputs' shard
sha256 lists are equal (parallel == serial byte for byte; the bench fails when they are not).
Set OMP_NUM_THREADS (1 on a shared box).
`--quick` uses 120 images of 128x96 and one repeat (a smoke check); the default 2,000 images of 256x192, 2 repeats.

    python bench/shards_write.py [--quick] [--images N] [--size S] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shards.colourise import colourise_image  # noqa: E402
from shards.resize import Resize  # noqa: E402
from shards.sources import digits_source, image_folder_source  # noqa: E402

# `shards.writer` (webdataset, hence torch) is imported in write_once(), not here: the pool's forkserver
# workers run this file's top-level imports again (as `__mp_main__`), and a torch import there would cost
# each write seconds that `python -m shards write` does not pay (its workers import only `shards.record`).

WORKERS = (1, 2)
STORE_SIZE = 64
JPEG_QUALITY = 90
NOISE_STD = 6.0  # grey levels of Gaussian noise: JPEGs of realistic size, not the flat areas of a drawing


def log(message: str) -> None:
    print(f"[shards_write] {message}", file=sys.stderr, flush=True)


def make_folder(root: Path, n: int, size: int) -> tuple[int, int]:
    """n JPEG files of size x (3 size / 4) under root/<digit>/; returns (images, total bytes)."""
    digits = list(digits_source())
    height = size * 3 // 4
    top = (size - height) // 2
    total = 0
    for i in range(n):
        sample = digits[i % len(digits)]
        rng = np.random.default_rng(i)
        image, _ = colourise_image(sample.image, size, rng)
        pixels = np.asarray(image.crop((0, top, size, top + height)), np.float32)
        pixels += rng.normal(0.0, NOISE_STD, pixels.shape).astype(np.float32)
        folder = root / str(sample.label)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(np.rint(pixels).clip(0, 255).astype(np.uint8)).save(
            path, format="JPEG", quality=JPEG_QUALITY
        )
        total += path.stat().st_size
    return n, total


def write_once(folder: Path, out: Path, workers: int) -> tuple[float, list[str], int]:
    """Seconds of one `write_shard_set` call, the shards' sha256 list and the samples written."""
    from shards.writer import write_shard_set

    source = image_folder_source(folder)
    start = time.perf_counter()
    manifest = write_shard_set(
        source,
        out,
        classes=source.classes,
        source=source.description,
        samples_per_shard=1000,
        encoding="png",
        resize=Resize(STORE_SIZE),
        workers=workers,
    )
    seconds = time.perf_counter() - start
    return seconds, [s.sha256 for s in manifest.shards], manifest.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="120 images of 128x96, 1 repeat (a smoke check); same JSON shape")
    parser.add_argument(
        "--images", type=int, default=0, help="images in the folder (default 2,000; 120 with --quick)"
    )
    parser.add_argument(
        "--size", type=int, default=0, help="source image width S; height 3S/4 (default 256; 128 with --quick)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="writes per worker count, alternating; the best counts (default 2; 1 with --quick)",
    )
    args = parser.parse_args()
    n = args.images or (120 if args.quick else 2000)
    args.size = args.size or (128 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 2)
    load_start = [round(x, 2) for x in os.getloadavg()]

    with tempfile.TemporaryDirectory(prefix="bench_write_") as tmp:
        folder = Path(tmp) / "jpegs"
        start = time.perf_counter()
        n, jpeg_bytes = make_folder(folder, n, args.size)
        make_seconds = time.perf_counter() - start
        log(f"made {n} JPEGs ({jpeg_bytes / n / 1000:.1f} kB each) in {make_seconds:.1f} s")
        seconds: dict[int, list[float]] = {w: [] for w in WORKERS}
        hashes: dict[int, list[list[str]]] = {w: [] for w in WORKERS}
        for rep in range(repeats):
            # Alternating writes, best of each: a shared machine's drift then favours neither side.
            for workers in WORKERS:
                out = Path(tmp) / f"shards_w{workers}_r{rep}"
                s, sha, total = write_once(folder, out, workers)
                if total != n:
                    raise RuntimeError(f"workers={workers} wrote {total} samples, expected {n}")
                seconds[workers].append(s)
                hashes[workers].append(sha)
                log(f"repeat {rep + 1}/{repeats} workers={workers}: {n / s:.1f} images/s")
        shard_bytes = sum(p.stat().st_size for p in (Path(tmp) / "shards_w1_r0").glob("*.tar"))
    reference = hashes[WORKERS[0]][0]
    identical = all(sha == reference for runs in hashes.values() for sha in runs)

    rates = {w: n / min(s) for w, s in seconds.items()}
    result = {
        "benchmark": "shards_write",
        "quick": args.quick,
        "images": n,
        "image": f"colourised sklearn digits, RGB {args.size}x{args.size * 3 // 4} "
        f"JPEG quality {JPEG_QUALITY}, noise std {NOISE_STD:g}",
        "jpeg_kb_per_image": round(jpeg_bytes / n / 1000, 1),
        "stored": f"PNG {STORE_SIZE}x{STORE_SIZE} (Resize({STORE_SIZE}), fit crop), 1,000 samples per shard",
        "shard_kb_per_image": round(shard_bytes / n / 1000, 1),
        "repeats": repeats,
        "make_folder_s": round(make_seconds, 2),
        "workers": {
            str(w): {
                "images_per_s": round(rates[w], 1),
                "runs_images_per_s": [round(n / s, 1) for s in seconds[w]],
                "best_s": round(min(seconds[w]), 3),
            }
            for w in WORKERS
        },
        "ratio_workers2_over_workers1": round(rates[2] / rates[1], 2),
        "identical_shards": identical,
        "shards": len(reference),
        "device_type": "cpu",
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "total_s": round(time.perf_counter() - T0, 2),
    }
    print(json.dumps(result, indent=2))
    if not identical:
        raise SystemExit("shards written with workers=2 differ from those written with workers=1")


if __name__ == "__main__":
    main()
