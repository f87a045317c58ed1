"""A run that cannot write ends cleanly: a disk that fills during a checkpoint (ENOSPC), a file-size limit (EFBIG),
stale temporaries of killed saves, and `pretrain export` refusing its input -- one line on stderr, a non-zero exit.
Real files throughout: a real tmpfs of a few MiB when this machine lets us mount one, a real file whose disk has a
fixed number of bytes left otherwise, a real RLIMIT_FSIZE on the CLI."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import subprocess_env, tiny_overrides, tiny_recipe
from torch._utils import ExceptionWrapper

import pretrain.checkpoint as checkpoint
from pretrain.__main__ import _os_error_line, main
from pretrain.backbone import create_backbone, export_backbone
from pretrain.checkpoint import (
    TrainerState,
    as_os_error,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
    remove_stale_temporaries,
    save_checkpoint,
)
from pretrain.recipe import ModelConfig
from pretrain.trainer import Trainer
from shards.atomic import atomic_path


class _Disk:
    """The free space of a pretend disk, shared by every file written on it."""

    def __init__(self, free: int):
        self.free = free


class _FileOnDisk(io.FileIO):
    """A real file on `disk`: a write takes what fits, then fails with ENOSPC, as the kernel's write(2) does."""

    def __init__(self, path: Path, disk: _Disk):
        super().__init__(path, "wb")
        self.disk = disk

    def write(self, data) -> int:
        n = min(len(memoryview(data)), self.disk.free)
        if n == 0 and len(memoryview(data)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.free -= n
        return super().write(memoryview(data)[:n])


def _parts() -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer]:
    """A real accelerator, a model and an optimizer that has stepped once (so it has state to write)."""
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    return acc, model, opt


def _save(acc, model, opt, out: Path, step: int) -> Path:
    return save_checkpoint(acc, out, model=model, optimizer=opt, state=TrainerState(step=step, samples_seen=step),
                           recipe={}, backbone_config={}, keep_last=3)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_checkpoint_that_runs_out_of_space_names_the_file_and_keeps_the_one_before(tmp_path, monkeypatch):
    acc, model, opt = _parts()
    out = tmp_path / "run"
    first = _save(acc, model, opt, out, 1)
    before = _digest(first)
    rng = sum((first / n).stat().st_size for n in ("rng_rank0.pt", "rng_rank0.json"))
    assert (first / "optimizer.pt").stat().st_size > 2 * 4096
    disk = _Disk(free=rng + 4096)  # the RNG files fit (written first), the optimizer state does not
    monkeypatch.setattr(checkpoint, "_open_for_write", lambda path: io.BufferedWriter(_FileOnDisk(path, disk)))

    with pytest.raises(OSError) as caught:
        _save(acc, model, opt, out, 2)
    err = caught.value
    # torch's zip writer alone would have said "unexpected pos N vs M": no errno, no file
    assert err.errno == errno.ENOSPC and err.filename == str(out / "checkpoints" / ".step_00000002.tmp" / "optimizer.pt")
    assert not (out / "checkpoints" / ".step_00000002.tmp").exists(), "the half-written folder was left"
    assert list_checkpoints(out) == [first] and latest_checkpoint(out) == first
    assert (out / "checkpoints" / "latest").read_text() == "step_00000001\n"
    assert _digest(first) == before and read_trainer_state(first)[0].step == 1
    line = _os_error_line(err, str(out), resumes=True)
    assert line == (f"error: {err.filename}: no space left on device (ENOSPC); free space there or set run.out_dir "
                    "to a larger disk and relaunch: it resumes from the last complete checkpoint")


def test_an_error_a_dataloader_worker_re_raised_still_names_its_file(tmp_path):
    """torch re-raises a worker's OSError as OSError(its traceback as text): no errno, no filename, many lines. The
    line the run ends with still names the file, the cause and errno's name."""
    gone = tmp_path / "shard-000001.tar"
    try:
        gone.read_bytes()
    except OSError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(OSError) as caught:
        wrapped.reraise()
    assert caught.value.errno is None and "\n" in str(caught.value)
    line = _os_error_line(as_os_error(caught.value, "runs/x"), "runs/x", resumes=False)
    assert line == f"error: {gone}: no such file or directory (ENOENT); fix that and relaunch"
    bare = _os_error_line(as_os_error(OSError("a message\nof two lines"), "runs/x"), "runs/x", resumes=False)
    assert bare == "error: runs/x: of two lines; fix that and relaunch"


def test_a_save_removes_the_temporaries_of_killed_saves_and_nothing_else(tmp_path):
    acc, model, opt = _parts()
    out = tmp_path / "run"
    root = out / "checkpoints"
    root.mkdir(parents=True)
    # What a kill leaves: `latest` half rewritten under shards.atomic's own temporary name ...
    killed = atomic_path(root / "latest")
    (stale_latest := killed.__enter__()).write_text("step_0000")
    # ... and a step folder half assembled.
    (root / ".step_00000007.tmp").mkdir()
    (root / ".step_00000007.tmp" / "optimizer.pt").write_bytes(b"partial")
    others = [root / n for n in (".latest.tmp", "notes.tmp", ".step_7.tmp", "step_00000003.unreadable", ".latest.x")]
    for p in others:
        p.write_text("not the writer's")
    elsewhere = out / stale_latest.name  # the same name outside checkpoints/ is not the checkpoint writer's
    elsewhere.write_text("someone's")

    assert remove_stale_temporaries(tmp_path / "no-run") == []
    saved = _save(acc, model, opt, out, 1)
    left = sorted(p.name for p in root.iterdir())
    assert stale_latest.name not in left and ".step_00000007.tmp" not in left
    assert left == sorted([saved.name, "latest", *(p.name for p in others)])
    assert all(p.read_text() == "not the writer's" for p in others) and elsewhere.read_text() == "someone's"
    del killed


def _cli(out: Path, overrides: list[str], **popen) -> subprocess.CompletedProcess:
    """`python -m pretrain RECIPE OVERRIDES` in a child process, the recipe all defaults (the overrides make it tiny)."""
    recipe = out.parent / "recipe.yaml"
    recipe.write_text("{}\n")
    cmd = [sys.executable, "-m", "pretrain", str(recipe), *overrides]
    env = subprocess_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=300, **popen)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_the_cli_ends_a_failed_write_with_one_line_and_a_nonzero_exit(digits_shards, tmp_path):
    """A real limit on file size (RLIMIT_FSIZE: write(2) fails with EFBIG past it): the run's small files fit, its
    first checkpoint's weights do not. Python ignores SIGXFSZ, so the write fails instead of killing the process."""
    out = tmp_path / "run"
    done = _cli(out, tiny_overrides(digits_shards, out, "data.val=null", "run.max_steps=2", "run.visualize=false",
                                    "eval.enabled=false"),
                preexec_fn=_limit_file_size(48 * 1024))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = _error_lines(done.stderr)
    assert line.startswith(f"error: {out}/checkpoints/.step_00000002.tmp/") and "file too large (EFBIG)" in line
    assert done.stderr.rstrip().endswith(line), "the error is not the last thing said"
    assert list((out / "checkpoints").iterdir()) == [], "the half-written checkpoint was left"


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB tmpfs at tmp_path/disk (skips where mounting is not allowed: not root, no CAP_SYS_ADMIN)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mount -t tmpfs refused here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill `disk` with one file, then give back `leave` bytes: the free space left is about that."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush (and fail) at close
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with open(filler, "rb+") as f:
        f.truncate(max(0, filler.stat().st_size - leave))
    return filler


def test_a_disk_that_fills_mid_run_ends_with_one_line_and_the_last_checkpoint_resumes(digits_shards, small_disk):
    out = small_disk / "run"
    extra = ("data.val=null", "run.visualize=false", "eval.enabled=false", "run.checkpoint_every_steps=2")
    Trainer(tiny_recipe(digits_shards, out, "run.max_steps=2", *extra)).fit()
    kept = latest_checkpoint(out)
    before = _digest(kept)
    filler = _fill(small_disk, leave=64 * 1024)  # room for the logs, not for the next checkpoint

    done = _cli(out, tiny_overrides(digits_shards, out, "run.max_steps=4", *extra))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "unexpected pos" not in done.stderr, done.stderr[-3000:]
    [line] = _error_lines(done.stderr)
    assert line.startswith(f"error: {out}/checkpoints/.step_00000004.tmp/"), line
    assert "no space left on device (ENOSPC)" in line and "resumes from the last complete checkpoint" in line
    assert list_checkpoints(out) == [kept] and _digest(kept) == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", kept.name]

    filler.unlink()  # space again: the same command goes on from step 2
    result = Trainer(tiny_recipe(digits_shards, out, "run.max_steps=4", *extra)).fit()
    assert result.steps == 4 and latest_checkpoint(out).name == "step_00000004"


# ---- `python -m pretrain export` -------------------------------------------------------------------------------

def _exported(tmp_path: Path) -> Path:
    model = create_backbone(ModelConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2))
    return export_backbone(model, tmp_path / "export")


@pytest.mark.parametrize(("edit", "said"), [
    ({"pretrained": True}, "key 'pretrained'=True is refused"),
    ({"model_name": "not_a_model"}, "model_name='not_a_model' is not a model in timm's registry"),
])
def test_export_of_a_refused_config_is_one_line_and_a_nonzero_exit(tmp_path, capsys, edit, said):
    src = _exported(tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **edit}))
    assert main(["export", str(src), "--out", str(tmp_path / "again")]) == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert line.startswith(f"error: {src / 'config.json'}: ") and said in line and captured.out == ""
    assert not (tmp_path / "again").exists()


def test_export_from_nowhere_or_into_a_foreign_folder_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == f"error: no checkpoint, run or exported backbone at {tmp_path / 'nowhere'}\n"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["export", str(_exported(tmp_path)), "--out", str(foreign)]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and str(foreign) in line and (foreign / "notes.txt").read_text() == "keep"
