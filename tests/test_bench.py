"""Every benchmark runs with --quick and prints one JSON object, so none of them rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shards.sources import find_mnist_files

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
# The shared data sits beside the project folder (../shared), as tests/conftest.py finds it.
FMNIST_DIR = Path(os.environ.get("VITSSL_FMNIST_DIR", ROOT.parent / "shared" / "datasets" / "fashion-mnist"))
# Benches that read the Fashion-MNIST IDX files and cannot run without them: skipped (with the reason) when the
# `fmnist_dir` fixture finds none. Others mention the folder but measure without it.
NEEDS_FMNIST = {"fmnist_eval.py", "shards_stream.py"}
RUNS_WITHOUT_FMNIST = {"retrieval.py", "augment.py", "train_e2e.py"}  # retrieval skips its Fashion-MNIST part; the others fall back to the digits
RUNS_WITHOUT_FMNIST |= {"gpu_check.py"}  # its Fashion-MNIST DINO run falls back to the digits (said in the JSON)
GPU_CHECK_PARTS = ("throughput", "precision", "augment", "fmnist_dino")


def test_benches_that_read_fashion_mnist_are_known() -> None:
    mention = {b for b in BENCHES if "VITSSL_FMNIST_DIR" in (ROOT / "bench" / b).read_text()}
    assert mention == NEEDS_FMNIST | RUNS_WITHOUT_FMNIST


def _fmnist_missing() -> str:
    try:
        find_mnist_files(FMNIST_DIR)
    except FileNotFoundError as e:
        return f"Fashion-MNIST IDX files not available (set VITSSL_FMNIST_DIR): {e}"
    return ""


def _run_quick(bench: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if bench in NEEDS_FMNIST:  # the same folder the fixture checks, whatever the bench's default
        env["VITSSL_FMNIST_DIR"] = str(FMNIST_DIR)
    return subprocess.run([sys.executable, str(ROOT / "bench" / bench), "--quick"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess | str]:
    """Every bench's --quick run, two at a time (one thread each, so two fill the 2-core machines): half the
    wall time of running them one after another. A bench that cannot run here maps to the reason."""
    missing = _fmnist_missing()
    runs: dict[str, subprocess.CompletedProcess | str] = {b: missing for b in BENCHES if b in NEEDS_FMNIST and missing}
    todo = [b for b in BENCHES if b not in runs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {b: pool.submit(_run_quick, b, tmp_path_factory.mktemp(b.removesuffix(".py"))) for b in todo}
        runs.update({b: f.result() for b, f in futures.items()})
    return runs


@pytest.mark.parametrize("bench", BENCHES)
def test_bench_quick_prints_json(bench, quick_runs):
    run = quick_runs[bench]
    if isinstance(run, str):
        pytest.skip(run)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert isinstance(result, dict) and result
    if bench == "gpu_check.py":  # every part reports on its own; on the CPU all of them pass
        assert result["quick"] and result["device_type"] == "cpu" and result["total_s"] > 0
        for part in GPU_CHECK_PARTS:
            assert result[part]["status"] in ("ok", "skipped"), (part, result[part])
        assert all(result["precision"][k]["pass"] for k in ("mae", "dino", "clip", "supervised"))
        assert result["ok"] and result["fmnist_dino"]["knn_val"]["top1"] > 0


def test_gpu_check_part_failures_are_reported_not_raised() -> None:
    """One broken or overrunning part of bench/gpu_check.py reports itself; the caller goes on to the next."""
    import importlib.util
    import time

    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    cpu = torch.device("cpu")
    broken = gpu_check.run_part("broken", 5, lambda budget: {"x": 1 / 0}, cpu)
    assert broken["status"] == "failed" and "ZeroDivisionError" in broken["error"] and broken["budget_s"] == 5
    slow = gpu_check.run_part("slow", 0.2, lambda budget: time.sleep(5) or {}, cpu)
    assert slow["status"] == "timeout" and slow["seconds"] < 2
    assert gpu_check.run_part("fine", 5, lambda budget: {"value": 1}, cpu) == {
        "status": "ok", "value": 1, "seconds": pytest.approx(0, abs=1), "budget_s": 5}
    assert gpu_check.run_part("absent", 5, lambda budget: {"skipped": "not built"}, cpu)["status"] == "skipped"
