"""Retrieval service benchmark: `python -m downstream serve` on loopback vs the same queries in-process; one JSON object.

Data (built into a temporary folder): scikit-learn's 1,797 digits as shards, indexed with a small random ViT
(8x8, patch 4, 64-d, 4 blocks) in its backbone space, and 450 of them with an untrained tiny CLIP in its joint
space for text queries. The server runs in its own process (`--no-access-log --poll 0`); clients are threads
in this one, each with its own keep-alive httpx connection, every request timed end to end.

For 1, 8 and 32 concurrent clients, image uploads (top-10) and text queries (top-10): queries/s, p50 and p99
latency, errors; beside each, the same queries through the Python API in this process (`Embedder` +
`RetrievalIndex.search` + `rows_for`, what the service does per batch) with batches of 1, 8 and 32, so that
`service_over_python` is the service's throughput as a fraction of the bare library's.
`--quick` runs 32 requests per level instead of 600 (< 30 s).

    python bench/serve.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from downstream.search import HIT_FIELDS, build_index, open_index  # noqa: E402
from downstream.serve_app import decode_upload  # noqa: E402
from pretrain.backbone import create_backbone, export_backbone  # noqa: E402
from pretrain.objectives.clip import CLIP, export_open_clip  # noqa: E402
from pretrain.recipe import CLIPConfig, ModelConfig  # noqa: E402
from shards.sources import digits_source  # noqa: E402
from shards.tar import iter_tar_samples, list_shards, open_shard  # noqa: E402
from shards.writer import write_shard_set  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CLIENTS = (1, 8, 32)
K = 10


def build(folder: Path) -> dict:
    """Digits shards, a backbone-space index of all of them and a CLIP-space index of the first shard."""
    source = digits_source()
    shards = folder / "digits"
    write_shard_set(source, shards, classes=source.classes, source=source.description, samples_per_shard=450)
    torch.manual_seed(0)
    backbone = export_backbone(create_backbone(MODEL), folder / "backbone", mean=[0.3], std=[0.3])
    clip = CLIP(create_backbone(MODEL), CLIPConfig(embed_dim=32, text_width=32, text_heads=2, text_layers=2,
                                                   text_context_length=16), captions="auto", class_names=DIGITS)
    build_index(backbone, str(shards), folder / "digits-index")
    first = list_shards(str(shards))[0][0]
    build_index(export_open_clip(clip.eval(), folder / "clip"), first, folder / "clip-index", space="clip")
    with open_shard(first) as f:
        images = [files["png"] for _, files in iter_tar_samples(f)][:64]
    texts = [f"{a} handwritten digit {d}" for a in ("a", "one", "the", "some") for d in DIGITS]
    return {"index": folder / "digits-index", "clip_index": folder / "clip-index", "images": images, "texts": texts}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folders: list[Path], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "downstream", "serve", *map(str, folders), "--port", str(port),
                             "--poll", "0", "--no-access-log"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start in 120 s")


def latency_stats(seconds: list[float], wall: float, n: int) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"qps": round(n / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def load_service(url: str, requests: list[dict], clients: int) -> dict:
    """`requests` (httpx.post kwargs) spread over `clients` threads, each its own connection; all timed."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(mine: list[dict]) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            c.get("/healthz")  # connect before the clock starts
            start.wait()
            for kwargs in mine:
                t = time.perf_counter()
                r = c.post("/search", **kwargs)
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    errors[0] += r.status_code != 200 or len(r.json()["hits"]) != K

    threads = [threading.Thread(target=client, args=(requests[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(requests), **latency_stats(latencies, wall, len(requests)),
            "errors": errors[0]}


def load_python(index, embed, queries: list, batch: int) -> dict:
    """The same queries through the library in this process, `batch` at a time: embed, search, metadata rows."""
    embed(queries[:batch])  # warm up
    latencies = []
    t0 = time.perf_counter()
    for lo in range(0, len(queries), batch):
        t = time.perf_counter()
        _, ids = index.search(embed(queries[lo:lo + batch]).numpy(), K)
        hits = [[{f: row[f] for f in HIT_FIELDS} for row in rows] for rows in index.rows_for(ids)]
        assert all(len(h) == K for h in hits)
        latencies += [time.perf_counter() - t] * len(hits)
    wall = time.perf_counter() - t0
    return {"batch": batch, **latency_stats(latencies, wall, len(queries))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 requests per level instead of 600")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server and in-process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    n = 32 if args.quick else 600  # quick: one request per client at the widest level
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        data = build(Path(tmp))
        images = [data["images"][i % len(data["images"])] for i in range(n)]
        texts = [data["texts"][i % len(data["texts"])] for i in range(n)]
        kinds = {
            "image": ([{"files": {"image": ("q.png", b, "image/png")}, "data": {"k": str(K)}} for b in images],
                      data["index"], images),
            "text": ([{"params": {"index": "clip-index"}, "json": {"text": t, "k": K}} for t in texts],
                     data["clip_index"], texts),
        }
        proc, url = start_server([data["index"], data["clip_index"]], args.threads)
        try:
            service = {kind: {str(c): load_service(url, reqs, c) for c in CLIENTS} for kind, (reqs, _, _) in kinds.items()}
        finally:
            proc.terminate()
            proc.wait(30)
        python = {}
        for kind, (_, folder, queries) in kinds.items():
            index, embedder = open_index(folder, None)  # the index's own checkpoint, as the server loads it
            if kind == "image":
                queries = [decode_upload(b) for b in queries]
            embed = embedder.images if kind == "image" else embedder.texts
            python[kind] = {str(b): load_python(index, embed, queries, b) for b in CLIENTS}
    for kind in kinds:
        for c in map(str, CLIENTS):
            service[kind][c]["python_qps"] = python[kind][c]["qps"]
            service[kind][c]["service_over_python"] = round(service[kind][c]["qps"] / python[kind][c]["qps"], 3)
    result = {
        "bench": "serve",
        "quick": args.quick,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "index": {"image": "1,797 digits, 64-d ViT (4 blocks), Flat", "text": "450 digits, tiny CLIP joint space, Flat"},
        "k": K,
        "requests_per_level": n,
        "image": service["image"],
        "text": service["text"],
        "python": python,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
