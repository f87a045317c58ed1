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
RUNS_WITHOUT_FMNIST = {"retrieval.py"}  # reports its Fashion-MNIST part as skipped


def test_benches_that_read_fashion_mnist_are_known() -> None:
    mention = {b for b in BENCHES if "VITSSL_FMNIST_DIR" in (ROOT / "bench" / b).read_text()}
    assert mention == NEEDS_FMNIST | RUNS_WITHOUT_FMNIST


@pytest.mark.parametrize("bench", BENCHES)
def test_bench_quick_prints_json(bench, tmp_path, request):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if bench in NEEDS_FMNIST:  # the same folder the fixture checked, whatever the bench's default
        env["VITSSL_FMNIST_DIR"] = str(request.getfixturevalue("fmnist_dir"))
    p = subprocess.run([sys.executable, str(ROOT / "bench" / bench), "--quick"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)
    assert isinstance(result, dict) and result
