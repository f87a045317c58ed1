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

# What each bench's JSON must hold (read off the code that builds it): top-level key -> type, a tuple of types, or
# a dict of the same kind for a nested object whose measurements the bench's docstring names (checked to that
# depth; other keys may be there too). None stands for null. A bench in bench/ without an entry fails
# test_every_bench_has_expected_keys, so a new bench cannot skip the check.
NUM = (int, float)
STEP_RATES = {"images_per_s": float, "images_per_s_best_step": float, "step_ms_median": float, "timed_steps": int}
DINO_STEP_VARIANT = {"views": list, "student_tokens_per_image": int, "batch_size": int, "images_per_s": float,
                     "images_per_s_best": float, "transform_samples_per_s_one_core": float, "loss": float}
THROUGHPUT_VARIANT = {**STEP_RATES, "config": dict, "batch_size": int, "grad_clip": NUM, "step_ms_best": float,
                      "flops_per_image_analytic": int, "flops_per_image_counted": float,
                      "counted_over_analytic": float, "flops_breakdown_per_image": dict, "achieved_tflops": float,
                      "mfu": float, "mfu_vs_datasheet": (float, None)}
AUGMENT_SETTING = {"views": str, "per_sample_images_per_s": float, "batched_images_per_s": float, "ratio": float}
EXACT_INDEX = {"factory": str, "build_s": float, "qps": float}
APPROXIMATE_INDEX = {**EXACT_INDEX, "search_params": dict, "tuning": list, "recall_at_10_vs_exact": float,
                     "qps_vs_exact": float, "meets_target": bool}
STREAM_WORKERS = {"stream_images_per_s": float, "imagefolder_images_per_s": float,
                  "ratio_stream_over_imagefolder": float, "stream_images_per_s_per_worker": float,
                  "imagefolder_images_per_s_per_worker": float}
WRITE_WORKERS = {"images_per_s": float, "runs_images_per_s": list, "best_s": float}
E2E_MODE = {"images_per_s": float, "runs": list, "ratio_to_step": float}
GPU_CHECK_PART = {"status": str, "seconds": float, "budget_s": NUM}  # run_part's own keys, beside the part's

SERVE_LEVEL = {"clients": int, "requests": int, "qps": float, "p50_ms": float, "p99_ms": float, "errors": int,
               "python_qps": float, "service_over_python": float}
SERVE_PYTHON = {"batch": int, "qps": float, "p50_ms": float, "p99_ms": float}
STEP_SYNCS = {"updates": int, "per_update": NUM, "per_logged_update": NUM, "total_reads": int,
              "update_ms_median": float, "sites": dict}
EXPECTED: dict[str, dict] = {
    "augment.py": {
        "bench": str, "quick": bool, "data": str, "batch": int, "rounds": int, "device": str, "threads": int,
        "results": {"fmnist": AUGMENT_SETTING, "rgb64": AUGMENT_SETTING}, "seconds": float,
    },
    "clip_step.py": {
        "benchmark": str, "quick": bool, "device": str, "torch_threads": int, "config": dict,
        "clip_step": STEP_RATES, "every_caption_encoded": STEP_RATES, "image_tower_only": STEP_RATES,
        "speedup_dedup_over_every_caption": float, "speedup_dedup_best_steps": float,
        "clip_over_image_tower_only": float, "clip_over_image_tower_only_best_steps": float,
    },
    "dino_step.py": {
        "bench": str, "recipe": str, "device": str, "threads": int, "quick": bool,
        "multicrop": DINO_STEP_VARIANT, "global_only": DINO_STEP_VARIANT,
        "multicrop_over_global_only": {"images_per_s": float, "transform_samples_per_s": float},
    },
    "fmnist_eval.py": {
        "bench": str, "quick": bool, "data": {"train": int, "test": int, "dir": str},
        "paper": {"linear": dict, "knn": dict, "finetune": dict}, "rows": list, "label_efficiency": list,
        "threads": int, "seconds": float,
    },
    "gpu_check.py": {
        "benchmark": str, "quick": bool, "device": str, "device_type": str, "torch": str, "cuda": (str, None),
        "cudnn": (int, None), "cuda_capability": (str, None), "python": str, "torch_threads": int,
        "throughput": {**GPU_CHECK_PART, "mae": dict, "dino": dict, "peak_matmul_flops_per_s": int,
                       "mfu_target_mae": float, "meets_target": bool, "gpu_throughput": dict},
        "precision": {**GPU_CHECK_PART, "steps": int, "tolerance_rel_final_loss": float, "mae": dict, "dino": dict,
                      "clip": dict, "supervised": dict, "all_pass": bool},
        "augment": {**GPU_CHECK_PART, "batch_size": int, "timed_calls": int, "dino_vit_small_in1k": dict,
                    "dino_vit_tiny_fmnist": dict},
        "fmnist_dino": {**GPU_CHECK_PART, "recipe": str, "data": dict, "shards_seconds": float, "minutes": float,
                        "overrides": list, "train": dict, "online_knn": dict, "knn_val": dict},
        "ok": bool, "total_s": float,
    },
    "gpu_throughput.py": {
        "benchmark": str, "quick": bool, "device": str, "device_type": str, "dtype": str, "tiny_cpu_dims": bool,
        "torch": str, "torch_threads": int, "compile": bool, "optimizer": str, "inputs": str, "step": str,
        "warmup_steps": int, "timed_steps_per_round": int, "rounds": int,
        "peak_matmul": {"what": str, "flops_per_s_before": int, "flops_per_s_after": int, "flops_per_s_used": int,
                        "datasheet_dense_bf16_flops_per_s": (float, None)},
        "flops_formula": str, "mae": THROUGHPUT_VARIANT, "dino": THROUGHPUT_VARIANT, "mfu_target_mae": float,
        "meets_target": bool, "note": str, "wall_s_after_imports": float,
    },
    "mae_step.py": {
        "benchmark": str, "quick": bool, "device": str, "torch_threads": int, "config": dict, "memory_method": str,
        "baseline_all_tokens": {**STEP_RATES, "encoder_tokens": int, "peak_mem_mib": float},
        "mae_visible_only": {**STEP_RATES, "encoder_tokens": int, "peak_mem_mib": float},
        "speedup_mae_over_baseline": float, "speedup_best_steps": float, "memory_ratio_baseline_over_mae": float,
        "target_speedup": float, "target_met": bool,
    },
    "retrieval.py": {
        "bench": str, "quick": bool, "threads": int, "faiss": str,
        "target": {"recall_at_10_vs_exact": float, "qps_vs_exact": float},
        "default_factory": {"fmnist": str, "clustered": str},
        "fmnist": dict,  # the same measurements as `clustered`, or {"skipped": ...} without Fashion-MNIST
        "clustered": {"generator": dict, "queries_are": str, "n": int, "dim": int, "queries": int, "k": int,
                      "exact": EXACT_INDEX, "ivf": APPROXIMATE_INDEX, "hnsw": APPROXIMATE_INDEX,
                      "ivf_vs_hnsw": {"build_s_ratio": float, "qps_ratio": float}},
        "total_s": float,
    },
    "serve.py": {
        "bench": str, "quick": bool, "threads": int, "cpu_count": int, "index": dict, "k": int,
        "requests_per_level": int, "image": {c: SERVE_LEVEL for c in ("1", "8", "32")},
        "text": {c: SERVE_LEVEL for c in ("1", "8", "32")},
        "python": {kind: {b: SERVE_PYTHON for b in ("1", "8", "32")} for kind in ("image", "text")},
        "seconds": float,
    },
    "shards_stream.py": {
        "benchmark": str, "quick": bool, "images": int, "image": str, "batch_size": int, "repeats": int,
        "write_seconds": float, "workers": {"0": STREAM_WORKERS, "1": STREAM_WORKERS, "2": STREAM_WORKERS},
        "tar_parse_samples_per_s": {"ours": float, "webdataset_tarfile": float, "ratio_ours_over_webdataset": float},
        "to_tensor_us_per_image": {"to_float_tensor": float, "v2_pil_to_tensor_to_dtype": float},
        "target_per_worker_images_per_s": float, "meets_target": bool, "cpu_count": int, "load_average": list,
        "python": str, "torch": str,
    },
    "shards_write.py": {
        "benchmark": str, "quick": bool, "images": int, "image": str, "jpeg_kb_per_image": float, "stored": str,
        "shard_kb_per_image": float, "repeats": int, "make_folder_s": float,
        "workers": {"1": WRITE_WORKERS, "2": WRITE_WORKERS}, "ratio_workers2_over_workers1": float,
        "identical_shards": bool, "shards": int, "device_type": str, "cpu_count": int, "omp_num_threads": (str, None),
        "load_average_start": list, "load_average_end": list, "python": str, "pillow": str, "total_s": float,
    },
    "step_syncs.py": {
        "benchmark": str, "quick": bool, "steps": int, "device_type": str, "threads": int, "total_s": float,
        "objectives": {name: STEP_SYNCS for name in ("mae", "dino")},  # --quick runs these two
    },
    "train_e2e.py": {
        "bench": str, "quick": bool, "data": str, "steps": int, "repeats": int, "threads": int,
        "dino": {"recipe": str, "step_only_images_per_s": float, "batched_over_pil": float,
                 "end_to_end": {"pil": E2E_MODE, "batched": E2E_MODE}},
        "mae": {"recipe": str, "step_only_images_per_s": float, "end_to_end": {"worker": E2E_MODE}},
        "seconds": float,
    },
}


def json_problems(value, spec, where: str = "") -> list[str]:
    """What in `value` (parsed JSON) does not match `spec` (see EXPECTED); [] when it all does. A bool is not an
    int here (JSON tells them apart), and None in a spec is null."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{where or 'the JSON'}: {type(value).__name__}, expected an object"]
        return [problem for key, sub in spec.items()
                for problem in (json_problems(value[key], sub, f"{where}.{key}".lstrip(".")) if key in value
                                else [f"{where}.{key}: missing".lstrip(".")])]
    types = tuple(type(None) if t is None else t for t in (spec if isinstance(spec, tuple) else (spec,)))
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return []
    return [f"{where}: {type(value).__name__} {value!r:.60}, expected {' or '.join(t.__name__ for t in types)}"]


def test_every_bench_has_expected_keys() -> None:
    assert set(BENCHES) - set(EXPECTED) == set(), "add the new bench's JSON keys and types to EXPECTED"
    assert set(EXPECTED) - set(BENCHES) == set(), "EXPECTED names a bench that bench/ no longer has"


def test_json_problems_reports_missing_keys_wrong_types_and_bools() -> None:
    spec = {"n": int, "rate": float, "opt": (str, None), "part": {"ok": bool, "x": NUM}}
    assert json_problems({"n": 3, "rate": 1.5, "opt": None, "part": {"ok": True, "x": 2}, "extra": 0}, spec) == []
    assert json_problems({"n": True, "rate": 1, "opt": 2, "part": {"x": 1.0}}, spec) == [
        "n: bool True, expected int", "rate: int 1, expected float", "opt: int 2, expected str or NoneType",
        "part.ok: missing"]
    assert json_problems({"n": 1, "rate": 1.0, "opt": "a", "part": []}, spec) == [
        "part: list, expected an object"]


def test_benches_that_read_fashion_mnist_are_known() -> None:
    mention = {b for b in BENCHES if "VITSSL_FMNIST_DIR" in (ROOT / "bench" / b).read_text()}
    assert mention == NEEDS_FMNIST | RUNS_WITHOUT_FMNIST


@pytest.mark.parametrize("bench", BENCHES)
@pytest.mark.multiprocess
def test_bench_quick_prints_json(bench, tmp_path, request):
    assert bench in EXPECTED, f"{bench} has no entry in EXPECTED"
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
    assert not (problems := json_problems(result, EXPECTED[bench])), "\n".join(problems)
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
