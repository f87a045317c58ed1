"""Retrieval index benchmark: exact (Flat) vs IVF vs HNSW, side by side; prints one JSON object.

Two datasets:
  fmnist   the 70,000 Fashion-MNIST images (VITSSL_FMNIST_DIR) as raw pixels, PCA to 128-d;
           queries are indexed images searched without themselves
  clustered 1,000,000 384-d vectors near a few thousand centres on a random low-dimensional subspace
           (generator parameters are in the output); queries are fresh draws from the generator

For each index: build seconds (IVF/HNSW include tuning nprobe/efSearch to recall@10 >= 0.95 on members),
queries/s, recall@10 against exact search, and throughput as a multiple of exact search.
`--quick` runs the same with 2,000 images and 4,000 vectors, 100 queries, one timing each (a smoke check).

    python bench/retrieval.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from downstream.metrics import approximate_recall, mean_average_precision, recall_at_k  # noqa: E402
from downstream.retrieval import RetrievalIndex, default_factory  # noqa: E402

FMNIST_DIR = os.environ.get(
    "VITSSL_FMNIST_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashion-mnist"))
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
K = 10
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 10.0


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format) as a numpy array; gzip or plain."""
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fmnist(folder: str) -> tuple[np.ndarray, np.ndarray]:
    root = Path(folder)
    images, labels = [], []
    for split in ("train", "t10k"):
        images.append(read_idx(root / f"{split}-images-idx3-ubyte.gz"))
        labels.append(read_idx(root / f"{split}-labels-idx1-ubyte.gz"))
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def pixel_pca_embeddings(images: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Raw pixels reduced to `dim` by PCA (trained on up to 20,000 images).

    HOOK: a `--checkpoint` option will replace this with the trained backbone's features
    (downstream.features) for the same images; everything after takes any (N, D) float32 array.
    """
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    pca = faiss.PCAMatrix(x.shape[1], dim)
    sample = np.random.default_rng(seed).choice(len(x), min(len(x), 20_000), replace=False)
    pca.train(x[sample])
    return pca.apply(x)


def clustered_vectors(n: int, queries: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Points near `centres` centres on a random `intrinsic`-d subspace of R^dim, plus isotropic noise."""
    rng = np.random.default_rng(params["seed"])
    dim, r = params["dim"], params["intrinsic_dim"]
    basis = np.linalg.qr(rng.standard_normal((dim, r)))[0].T.astype(np.float32)  # (r, dim), orthonormal rows
    centres = rng.standard_normal((params["centres"], r)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), dtype=np.float32)
        for lo in range(0, m, 100_000):  # bounded temporaries
            hi = min(lo + 100_000, m)
            z = centres[rng.integers(0, len(centres), hi - lo)]
            z += params["within_centre_std"] * rng.standard_normal(z.shape, dtype=np.float32)
            out[lo:hi] = z @ basis + params["noise_std"] * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        return out

    return draw(n), draw(queries)


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def run_dataset(x: np.ndarray, labels: np.ndarray | None, queries: np.ndarray, exclude: np.ndarray | None,
                factories: dict[str, str], repeats: int) -> dict:
    """Build each index over `x`, search `queries` (top-10), compare with the exact index."""
    rows = [{"key": f"{i:08d}", **({"label": int(labels[i])} if labels is not None else {})} for i in range(len(x))]
    out: dict = {"n": int(len(x)), "dim": int(x.shape[1]), "queries": int(len(queries)), "k": K}
    exact_ids = None
    exact_qps = None
    for name, factory in factories.items():
        t = time.perf_counter()
        idx = RetrievalIndex.build(x, rows, info={"fingerprint": "bench"}, factory=factory)
        build_s = time.perf_counter() - t
        secs, (_, ids) = best_time(lambda idx=idx: idx.search(queries, K, exclude_ids=exclude), repeats)
        entry = {"factory": idx.info["factory"], "build_s": round(build_s, 2), "qps": round(len(queries) / secs, 1)}
        if name == "exact":
            exact_ids, exact_qps = ids, len(queries) / secs
        else:
            entry["search_params"] = idx.info["search_params"]
            entry["tuning"] = idx.info["tuning"]["table"]
            entry["recall_at_10_vs_exact"] = round(approximate_recall(ids, exact_ids, K), 4)
            entry["qps_vs_exact"] = round(entry["qps"] / exact_qps, 2)
            entry["meets_target"] = bool(entry["recall_at_10_vs_exact"] >= TARGET_RECALL
                                         and entry["qps_vs_exact"] >= TARGET_SPEEDUP)
        if labels is not None:
            qlab = labels[exclude] if exclude is not None else None
            if qlab is not None:
                got = np.where(ids >= 0, labels[np.maximum(ids, 0)], -1)
                entry["label_quality"] = {
                    **{f"recall@{k}": round(v, 4) for k, v in recall_at_k(qlab, got, (1, 5, 10)).items()},
                    "mAP@10 (over returned top-10)": round(mean_average_precision(qlab, got), 4),
                }
        out[name] = entry
        del idx
        gc.collect()
    if "ivf" in out and "hnsw" in out:
        out["ivf_vs_hnsw"] = {
            "build_s_ratio": round(out["ivf"]["build_s"] / out["hnsw"]["build_s"], 3),
            "qps_ratio": round(out["ivf"]["qps"] / out["hnsw"]["qps"], 3),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small N, same JSON shape (< 30 s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    n_fmnist, n_clustered = (2_000, 4_000) if args.quick else (70_000, 1_000_000)
    n_queries = 100 if args.quick else 2_000
    repeats = 1 if args.quick else 3
    t0 = time.perf_counter()
    result: dict = {
        "bench": "retrieval",
        "quick": args.quick,
        "threads": args.threads,
        "faiss": faiss.__version__,
        "target": {"recall_at_10_vs_exact": TARGET_RECALL, "qps_vs_exact": TARGET_SPEEDUP},
        "default_factory": {"fmnist": default_factory(70_000), "clustered": default_factory(1_000_000)},
    }

    # Approximate indexes are forced (default_factory with exact_below=0) so each dataset compares all three.
    def factories(n: int) -> dict[str, str]:
        return {"exact": "Flat", "ivf": default_factory(n, exact_below=0), "hnsw": "HNSW32,Flat"}

    if Path(FMNIST_DIR, "train-images-idx3-ubyte.gz").is_file():
        images, labels = load_fmnist(FMNIST_DIR)
        if n_fmnist < len(images):
            keep = np.sort(rng.choice(len(images), n_fmnist, replace=False))
            images, labels = images[keep], labels[keep]
        x = pixel_pca_embeddings(images, 128, args.seed)
        qids = np.sort(rng.choice(len(x), n_queries, replace=False))
        fm = run_dataset(x, labels, x[qids], qids, factories(len(x)), repeats)
        result["fmnist"] = {"source": f"Fashion-MNIST train+test pixels, PCA to 128-d ({FMNIST_DIR})",
                            "queries_are": "indexed images, each searched without itself", **fm}
    else:
        result["fmnist"] = {"skipped": f"no Fashion-MNIST IDX files in {FMNIST_DIR} (set VITSSL_FMNIST_DIR)"}

    params = {"dim": 384, "centres": 4096, "intrinsic_dim": 32, "centre_distribution": "N(0, I) in the subspace",
              "within_centre_std": 0.5, "noise_std": 0.02, "seed": args.seed}
    xb, xq = clustered_vectors(n_clustered, n_queries // 2, params)
    cl = run_dataset(xb, None, xq, None, factories(len(xb)), repeats)
    result["clustered"] = {"generator": params, "queries_are": "fresh draws from the generator", **cl}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
