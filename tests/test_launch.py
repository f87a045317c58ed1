"""Launch configs (recipes/launch): each parses as an Accelerate config, and the 2-CPU-process one really
starts two processes that train together."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from helpers import ROOT, subprocess_env, tiny_overrides

from pretrain.checkpoint import latest_checkpoint

LAUNCH = ROOT / "recipes" / "launch"
CONFIGS = sorted(LAUNCH.glob("*.yaml"))
# name -> (distributed_type, num_processes, num_machines, use_cpu)
EXPECTED = {
    "cpu_1proc.yaml": (DistributedType.NO, 1, 1, True),
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, 1, True),
    "gpu_1.yaml": (DistributedType.NO, 1, 1, False),
    "gpu_8.yaml": (DistributedType.MULTI_GPU, 8, 1, False),
    "multinode.yaml": (DistributedType.MULTI_GPU, 16, 2, False),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_topology_has_a_config():
    assert {p.name for p in CONFIGS} == set(EXPECTED)
    assert (LAUNCH / "README.md").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_config_parses_with_the_fields_accelerate_needs(path):
    raw = yaml.safe_load(path.read_text())
    for key in ("compute_environment", "distributed_type", "num_processes", "num_machines", "machine_rank",
                "mixed_precision", "use_cpu"):
        assert key in raw, f"{path.name} lacks {key}"
    cfg = load_config_from_file(str(path))  # accelerate's own loader: unknown keys or bad enums fail here
    dist_type, procs, machines, use_cpu = EXPECTED[path.name]
    assert cfg.distributed_type == dist_type
    assert (cfg.num_processes, cfg.num_machines, cfg.use_cpu) == (procs, machines, use_cpu)
    assert cfg.num_processes % cfg.num_machines == 0
    # MULTI_CPU starts a single process under accelerate 1.15 (no MPI hostfile): never use it here.
    assert cfg.distributed_type != DistributedType.MULTI_CPU
    if cfg.num_machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port, "a multi-node config needs the rendezvous address"


# ~20 s; two CPU processes training in sync stay in make test (test_trainer, torchrun)
@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_launch_cpu_2proc_config_starts_two_processes(digits_shards, tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(LAUNCH / "cpu_2proc.yaml"),
           "--main_process_port", str(free_port()), "-m", "pretrain", str(recipe),
           *tiny_overrides(digits_shards, out, "run.max_steps=2", "data.batch_size=16", "run.visualize=false")]
    p = subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "mae: 2 process(es)" in log, log[-2000:]
    assert "global batch 32 = 16 per process x 2 processes x 1 accumulation" in log
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step_00000002"
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()


@pytest.mark.slow  # ~12 s; test_trainer's refusal of the --cpu --num_processes trap stays in make test
@pytest.mark.multiprocess
def test_a_multi_cpu_config_file_that_starts_one_process_is_refused(digits_shards, tmp_path):
    """accelerate 1.15 runs `distributed_type: MULTI_CPU, num_processes: 2` (no MPI hostfile) as ONE process."""
    config = tmp_path / "multi_cpu.yaml"
    config.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_CPU",
                                      "num_processes": 2, "num_machines": 1, "machine_rank": 0, "use_cpu": True,
                                      "mixed_precision": "no", "dynamo_config": {}}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(config), "-m", "pretrain", str(recipe),
           *tiny_overrides(digits_shards, tmp_path / "run", "run.max_steps=2")]
    p = subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode != 0
    assert "was asked for 2 processes but started one" in p.stderr
    assert "recipes/launch/cpu_2proc.yaml" in p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # ~30 s; make test covers both halves: test_lifeline (2 ranks SIGTERM themselves and checkpoint
# when their launcher dies) and test_resume_recipes (a relaunch resumes exactly)
@pytest.mark.multiprocess
def test_sigterm_to_both_processes_checkpoints_and_relaunch_resumes(digits_shards, tmp_path):
    """A preempted 2-process run (SIGTERM to every rank, as SLURM does) writes a final checkpoint at the step it
    stopped at and exits cleanly; the same command then resumes from that checkpoint."""
    import signal
    import time

    import psutil

    from pretrain.checkpoint import list_checkpoints

    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    accelerate = Path(sys.executable).with_name("accelerate")

    def command() -> list[str]:
        return [str(accelerate), "launch", "--config_file", str(LAUNCH / "cpu_2proc.yaml"),
                "--main_process_port", str(free_port()), "-m", "pretrain", str(recipe),
                *tiny_overrides(digits_shards, out, "run.max_steps=100", "data.batch_size=16", "run.checkpoint_every_steps=20",
                      "run.visualize=false", "run.log_every=5")]

    env = subprocess_env(OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(command(), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list_checkpoints(out):
        time.sleep(0.2)
    assert list_checkpoints(out), "no checkpoint within 180 s"
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "pretrain" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    for p in workers:
        p.send_signal(signal.SIGTERM)
    log, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, log[-3000:]
    summary = json.loads(next(ln for ln in log.splitlines() if ln.startswith('{"out_dir"')))
    assert summary["stopped_early"] == "signal" and summary["steps"] < 100
    stopped_at = latest_checkpoint(out)
    assert stopped_at.name == f"step_{summary['steps']:08d}", "the final checkpoint is at the step it stopped at"
    assert (stopped_at / "rng_rank0.pt").is_file() and (stopped_at / "rng_rank1.pt").is_file()

    p = subprocess.run(command(), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {stopped_at}: step {summary['steps']}" in p.stdout + p.stderr
    assert latest_checkpoint(out).name == "step_00000100"
