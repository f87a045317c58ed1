"""Killing the launcher, a rank or a 1-process run ends every rank and DataLoader worker within seconds.

Real processes, no mocks: real `torchrun --standalone --nproc_per_node 2` trainings on CPU, killed with SIGKILL.
torchrun starts each rank in a session of its own, so a run's processes are found by the run folder in their
command line (DataLoader workers are forked ranks and share it), not by process group -- and cleaned up the same
way in a `finally`, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, subprocess_env, tiny_overrides

from pretrain.checkpoint import latest_checkpoint

START_TIMEOUT = 180.0  # imports + rendezvous on 2 shared cores


# ---- process helpers -------------------------------------------------------------------------------------------

def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _run_processes(marker: str) -> list[psutil.Process]:
    """Every live process whose command line mentions `marker` (the run folder): launcher, ranks and workers."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and any(marker in a for a in p.cmdline()) and _running(p):
                out.append(p)
        except psutil.Error:
            continue
    return out


def _wait_gone(marker: str, timeout: float) -> tuple[list[psutil.Process], float]:
    t0 = time.monotonic()
    while True:
        left = _run_processes(marker)
        waited = time.monotonic() - t0
        if not left or waited > timeout:
            return left, waited
        time.sleep(0.2)


def _describe(procs: list[psutil.Process]) -> str:
    rows = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            rows.append(f"{p.pid} ppid={p.ppid()} {p.status()} {p.name()}")
    return "; ".join(rows)


def _kill_all(marker: str, launcher: subprocess.Popen) -> None:
    for p in _run_processes(marker):
        with contextlib.suppress(psutil.Error):
            p.kill()
    if launcher.poll() is None:
        launcher.kill()
    launcher.wait(timeout=30)


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = subprocess_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_training(p: subprocess.Popen, out: Path, processes: int, log: Path) -> list[psutil.Process]:
    """Block until a step is logged and the run has `processes` live processes (ranks, workers, launcher)."""
    deadline = time.monotonic() + START_TIMEOUT
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if p.poll() is not None:
            pytest.fail(f"the run ended before training (rc {p.returncode}):\n{log.read_text()[-3000:]}")
        if metrics.is_file() and metrics.read_text().strip():
            procs = _run_processes(str(out))
            if len(procs) >= processes:
                return procs
        time.sleep(0.2)
    pytest.fail(f"no training step within {START_TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}")


def _overrides(shards: Path, out: Path) -> list[str]:
    # Endless (1e5 steps), one DataLoader worker per rank, nothing slow at the end of a stopped run.
    return tiny_overrides(shards, out, "run.max_steps=100000", "data.batch_size=16", "data.num_workers=1",
                          "run.visualize=false")


def _torchrun(recipe: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "pretrain", str(recipe), *overrides]


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text("{}\n")
    return path


# ---- real launches ---------------------------------------------------------------------------------------------

@pytest.mark.multiprocess
def test_killing_the_launcher_ends_every_rank_and_worker(digits_shards, recipe, tmp_path):
    out, log = tmp_path / "run", tmp_path / "launch.log"
    p = _start(_torchrun(recipe, _overrides(digits_shards, out)), log)
    try:
        procs = _wait_training(p, out, 5, log)  # launcher + 2 ranks + 2 workers
        assert any(q.pid == p.pid for q in procs)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
        left, waited = _wait_gone(str(out), timeout=15)
        assert not left, f"alive {waited:.0f} s after the launcher's SIGKILL: {_describe(left)}\n{log.read_text()[-3000:]}"
        # The ranks stopped through the trainer's SIGTERM path: a checkpoint at the step they stopped on.
        assert latest_checkpoint(out) is not None, log.read_text()[-3000:]
        assert "launcher pid" in log.read_text()
    finally:
        _kill_all(str(out), p)


@pytest.mark.slow  # ~15 s; torchrun's agent already did this before the lifeline (it killpg's the other ranks)
@pytest.mark.multiprocess
def test_killing_one_rank_ends_the_other_rank_the_launcher_and_all_workers(digits_shards, recipe, tmp_path):
    """The agent sees the dead rank and SIGTERMs every rank's process group (workers included), SIGKILL after
    30 s; the killed rank's own worker dies at once by PR_SET_PDEATHSIG."""
    out, log = tmp_path / "run", tmp_path / "launch.log"
    p = _start(_torchrun(recipe, _overrides(digits_shards, out)), log)
    try:
        _wait_training(p, out, 5, log)
        ranks = psutil.Process(p.pid).children()
        assert len(ranks) == 2, _describe(ranks)
        ranks[0].kill()
        left, waited = _wait_gone(str(out), timeout=30)
        assert not left, f"alive {waited:.0f} s after a rank's SIGKILL: {_describe(left)}\n{log.read_text()[-3000:]}"
        assert p.wait(timeout=10) != 0  # torchrun reports the failed rank
    finally:
        _kill_all(str(out), p)


@pytest.mark.multiprocess
def test_killing_a_one_process_run_ends_its_dataloader_worker(digits_shards, recipe, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    p = _start([sys.executable, "-m", "pretrain", str(recipe), *_overrides(digits_shards, out)], log)
    try:
        procs = _wait_training(p, out, 2, log)  # the run + its worker
        workers = [q for q in procs if q.pid != p.pid]
        assert workers and all(q.ppid() == p.pid for q in workers), _describe(procs)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
        # torch's own ManagerWatchdog would take up to 5 s (its index-queue timeout) and longer in a slow fetch.
        left, waited = _wait_gone(str(out), timeout=3)
        assert not left, f"alive {waited:.1f} s after the run's SIGKILL: {_describe(left)}"
    finally:
        _kill_all(str(out), p)


# ---- the module itself -----------------------------------------------------------------------------------------

# The child starts the grandchild (which installs a lifeline, then prints its pid) and waits for it, so a
# grandchild that fails closes the pipe instead of leaving the test waiting on readline.
CHILD = textwrap.dedent("""
    import subprocess, sys
    sys.exit(subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]]).wait())
""")


def _family(grandchild: str, *args: str, **env: str) -> tuple[subprocess.Popen, int]:
    """Start child -> grandchild; return the child and the grandchild's pid once its lifeline is installed."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, textwrap.dedent(grandchild), *args],
                             env=subprocess_env(**env), cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    line = child.stdout.readline()
    assert line.strip().isdigit(), f"grandchild said {line!r}"
    return child, int(line)


def _gone_within(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not _running(psutil.Process(pid)):
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _cleanup(child: subprocess.Popen, grandchild: int | None) -> None:
    for pid in (grandchild, child.pid):
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    child.wait(timeout=10)


DIES_WITH_PARENT = """
    import os, sys, time
    from shards.lifeline import die_with_parent
    die_with_parent()
    print(os.getpid(), flush=True)
    time.sleep(600)
"""


@pytest.mark.multiprocess
def test_die_with_parent_ends_the_grandchild_when_the_child_is_killed():
    child, grandchild = _family(DIES_WITH_PARENT)
    try:
        assert _running(psutil.Process(grandchild))
        child.kill()
        assert _gone_within(grandchild, 2.0)
    finally:
        _cleanup(child, grandchild)


WATCHES_A_PID = """
    import os, sys, time
    from shards.lifeline import die_with_parent
    die_with_parent(parent_pid=int(sys.argv[1]))
    print(os.getpid(), flush=True)
    time.sleep(600)
"""


@pytest.mark.multiprocess
def test_a_watched_pid_that_is_not_the_parent_is_polled():
    """No PDEATHSIG here (the watched process is not our parent): the poll thread alone must act."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    child, grandchild = _family(WATCHES_A_PID, str(other.pid))
    try:
        other.kill()
        other.wait()
        assert _gone_within(grandchild, 3.0)
        # The parent was not touched: it ends on its own, passing on its child's status (CHILD waits for it), and
        # is not killed by a signal (a negative return code).
        assert child.wait(timeout=10) >= 0
    finally:
        other.kill()
        _cleanup(child, grandchild)


@pytest.mark.multiprocess
def test_a_parent_that_died_before_the_lifeline_is_noticed_at_once():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    p = subprocess.run([sys.executable, "-c", "from shards.lifeline import die_with_parent\n"
                        f"die_with_parent(parent_pid={dead.pid})\nimport time; time.sleep(60)"],
                       env=subprocess_env(), cwd=ROOT, timeout=30)
    assert p.returncode == -signal.SIGKILL


RANK = """
    import os, signal, sys, time
    from pathlib import Path
    from shards.lifeline import exit_with_launcher
    # A rank that ignores SIGTERM (like one stuck in a collective): the grace period's SIGKILL must end it.
    signal.signal(signal.SIGTERM, lambda *a: Path(sys.argv[1]).write_text("SIGTERM"))
    assert exit_with_launcher(grace_seconds=1.0)
    print(os.getpid(), flush=True)
    time.sleep(600)
"""


@pytest.mark.multiprocess
def test_a_rank_whose_launcher_dies_gets_sigterm_then_sigkill_after_the_grace(tmp_path):
    marker = tmp_path / "got"
    child, grandchild = _family(RANK, str(marker), LOCAL_RANK="0")
    try:
        child.kill()
        assert _gone_within(grandchild, 4.0)
        assert marker.read_text() == "SIGTERM"
    finally:
        _cleanup(child, grandchild)


@pytest.mark.multiprocess
def test_no_rank_watchdog_without_a_launcher():
    """`nohup python -m pretrain` is re-parented too: without a launcher nothing may stop the run."""
    env = {k: v for k, v in subprocess_env().items() if k not in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    p = subprocess.run([sys.executable, "-c", "from shards.lifeline import exit_with_launcher\n"
                        "print(exit_with_launcher())"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.stdout.strip() == "False", p.stderr
