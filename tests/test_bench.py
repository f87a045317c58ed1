"""Every benchmark runs with --quick and prints one JSON object, so none of them rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
# Benches that read the Fashion-MNIST IDX files and cannot run without them: skipped (with the reason) when the
# `fmnist_dir` fixture finds none. Others mention the folder but measure without it.
NEEDS_FMNIST = {"fmnist_eval.py", "shards_stream.py"}
RUNS_WITHOUT_FMNIST = {"retrieval.py", "augment.py", "train_e2e.py"}  # retrieval skips its Fashion-MNIST part; the others fall back to the digits
RUNS_WITHOUT_FMNIST |= {"gpu_check.py"}  # its Fashion-MNIST DINO run falls back to the digits (said in the JSON)
GPU_CHECK_PARTS = ("throughput", "precision", "augment", "fmnist_dino")


def test_benches_that_read_fashion_mnist_are_known() -> None:
    mention = {b for b in BENCHES if "VITSSL_FMNIST_DIR" in (ROOT / "bench" / b).read_text()}
    assert mention == NEEDS_FMNIST | RUNS_WITHOUT_FMNIST


@pytest.mark.parametrize("bench", BENCHES)
def test_bench_quick_prints_json(bench, tmp_path, request):
    if bench == "gpu_check.py":  # its precision part and digits fallback read scikit-learn's digits
        pytest.importorskip("sklearn", reason="gpu_check.py needs scikit-learn's digits")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if bench in NEEDS_FMNIST:  # the same folder the fixture checked, whatever the bench's default
        env["VITSSL_FMNIST_DIR"] = str(request.getfixturevalue("fmnist_dir"))
    p = subprocess.run([sys.executable, str(ROOT / "bench" / bench), "--quick"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)
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
