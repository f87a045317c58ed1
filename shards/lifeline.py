"""Processes that die with their parent: DataLoader workers with the rank that made them, ranks with their launcher.

Measured (torch 2.14, accelerate 1.15, Linux): torchrun (and `accelerate launch`, which runs torchrun's agent
in-process) starts every rank in a session of its own and never asks the kernel to end it with the launcher, so
after a SIGKILL of the launcher the ranks are re-parented and train on to the end -- or, killed during start-up,
sleep for 30 minutes in the TCPStore client's reconnect loop (the store lived in the launcher). A DataLoader worker
notices a dead parent only through torch's ManagerWatchdog, between two index-queue gets of 5 s each, and not at all
while it is busy in a long fetch.

Two tools:
  * `die_with_parent(sig)` / `worker_dies_with_parent(worker_id)` (a DataLoader `worker_init_fn`): the kernel sends
    `sig` (SIGKILL by default) when the parent dies (`prctl(PR_SET_PDEATHSIG)`), plus a poll thread as a backstop.
  * `exit_with_launcher()` for training ranks started by a launcher: when the launcher goes, SIGTERM ourselves (the
    trainer checkpoints at the next step boundary and exits) and, if still alive after a grace period
    (VITSSL_ORPHAN_GRACE_S, default 10 s), SIGKILL ourselves -- a rank stuck in a collective with a dead peer
    cannot live on.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

POLL_SECONDS = 0.5
DEFAULT_GRACE_SECONDS = 10.0
GRACE_ENV = "VITSSL_ORPHAN_GRACE_S"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# Set by torchrun (and `accelerate launch --multi_gpu`, which runs torchrun's agent) in every rank's environment.
_LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")

# pid of the process whose rank watchdog is installed: a forked child inherits this module's globals but not the
# thread, so the flag is only trusted in the process that set it.
_rank_watch_pid: int | None = None
_lock = threading.Lock()


def _set_pdeathsig(sig: int) -> bool:
    """Ask the kernel to send `sig` when our parent (strictly: the parent *thread* that forked us) exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(int(sig)), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet reaped) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _say(msg: str) -> None:
    # The launcher owned our stderr's reader more often than not: a dead pipe must not stop the shutdown.
    with contextlib.suppress(OSError, ValueError):
        print(f"vitssl lifeline (pid {os.getpid()}): {msg}", file=sys.stderr, flush=True)


def _watch(parent_gone: Callable[[], bool], act: Callable[[], None], name: str) -> threading.Thread:
    def loop() -> None:
        while not parent_gone():
            time.sleep(POLL_SECONDS)
        act()

    t = threading.Thread(target=loop, name=name, daemon=True)
    t.start()
    return t


def die_with_parent(sig: int = signal.SIGKILL, parent_pid: int | None = None) -> None:
    """End this process with `sig` when `parent_pid` (default: our current parent) dies.

    PR_SET_PDEATHSIG is set only when `parent_pid` is our real parent (it watches the parent, nothing else); it
    fires when the parent *thread* exits, and not at all if the parent died before the prctl -- hence the check
    right after it. A daemon thread polls every POLL_SECONDS as the backstop (and is all there is off Linux).
    """
    watched = os.getppid() if parent_pid is None else parent_pid
    direct = os.getppid() == watched
    if direct:
        _set_pdeathsig(sig)

    def gone() -> bool:
        # Re-parenting is immediate when the parent exits; _alive also covers a watched non-parent (forkserver).
        return (direct and os.getppid() != watched) or not _alive(watched)

    def act() -> None:
        os.kill(os.getpid(), sig)

    if gone():  # the parent died before PDEATHSIG was armed
        act()
        return
    _watch(gone, act, "vitssl-die-with-parent")


def worker_dies_with_parent(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: the worker is SIGKILLed when the process that iterates the loader dies."""
    die_with_parent(signal.SIGKILL)


class WorkerLifeline:
    """`worker_init_fn` that makes the worker die with `parent_pid` (the process that built the DataLoader), then
    calls the caller's own `worker_init_fn`. A class, not a closure, so spawn/forkserver workers can unpickle it."""

    def __init__(self, then: Callable[[int], None] | None = None, parent_pid: int | None = None) -> None:
        self.then = then
        self.parent_pid = os.getpid() if parent_pid is None else parent_pid

    def __call__(self, worker_id: int) -> None:
        die_with_parent(signal.SIGKILL, self.parent_pid)
        if self.then is not None:
            self.then(worker_id)


def _parent_is_launcher() -> bool:
    """`accelerate launch` with one process (its simple launcher) sets no rank variables: read the parent's argv."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    head = argv[:4]
    accelerate = any(os.path.basename(a) in ("accelerate", "accelerate-launch") for a in head) and "launch" in head
    torchrun = any(os.path.basename(a) == "torchrun" or a == "torch.distributed.run" for a in head)
    return accelerate or torchrun


def launched_by_launcher() -> bool:
    """Whether a launcher (torchrun, `accelerate launch`) started this process and should outlive it."""
    return any(k in os.environ for k in _LAUNCHER_ENV) or _parent_is_launcher()


def grace_seconds_from_env(default: float = DEFAULT_GRACE_SECONDS) -> float:
    raw = os.environ.get(GRACE_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else default
    except ValueError:
        return default


def exit_with_launcher(grace_seconds: float | None = None) -> bool:
    """In a rank started by a launcher: when the launcher dies, SIGTERM this process, then SIGKILL it after
    `grace_seconds` (default VITSSL_ORPHAN_GRACE_S or 10 s). Returns whether the watchdog runs (once per process).

    A plain `python -m pretrain` has no launcher: being re-parented there means `nohup` or a closed shell, which
    must not stop a run, so nothing is installed. No PR_SET_PDEATHSIG here: it fires when the launcher's *thread*
    exits, and a launcher that spawns from a short-lived thread would stop a healthy run.
    """
    global _rank_watch_pid
    if not launched_by_launcher():
        return False
    grace = grace_seconds_from_env() if grace_seconds is None else grace_seconds
    with _lock:
        if _rank_watch_pid == os.getpid():
            return True
        _rank_watch_pid = os.getpid()
    launcher = os.getppid()

    def gone() -> bool:
        # PID 1 as parent at install time: the launcher died before we got here (we were re-parented already).
        return launcher == 1 or os.getppid() != launcher

    def act() -> None:
        who = "the launcher died before this rank could watch it" if launcher == 1 else f"launcher pid {launcher} died"
        _say(f"{who}: stopping (SIGTERM now, SIGKILL in {grace:g} s)")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        _say(f"still alive {grace:g} s after the launcher died: SIGKILL")
        os.kill(os.getpid(), signal.SIGKILL)

    _watch(gone, act, "vitssl-exit-with-launcher")
    return True
