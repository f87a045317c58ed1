"""Training checkpoints: written atomically, loaded without executing pickled code.

A checkpoint is a folder `OUT/checkpoints/step_00000100/` holding
  model.safetensors      the objective's whole state (backbone, heads, teacher, ...), full tensors
  backbone_config.json   kwargs for `timm.create_model(**config)` (so the backbone is self-describing)
  optimizer.pt           optimizer state keyed by parameter name, full tensors (loaded with weights_only=True)
  scaler.pt              fp16 grad-scaler state (only with fp16)
  rng_rank{R}.pt / .json per-rank RNG states (torch tensors / python + numpy as JSON)
  trainer_state.json     step, epoch, stream position, counters, the recipe
The folder is assembled under `.step_00000100.tmp` and renamed when every rank has written its part,
so a run killed mid-save never leaves a checkpoint that looks complete.

Weights and optimizer state are gathered whole (torch.distributed.checkpoint's state-dict API: FSDP shards are
all-gathered, DDP and compile wrappers unwrapped) and the optimizer state is keyed by parameter name, not by
position, so a checkpoint loads the same into 1 process or 64, with or without FSDP. What does depend on the
launch (the stream position, counted per rank) is translated by `pretrain.position`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from shards.atomic import fsync_file, write_text_atomic

CKPT_RE = re.compile(r"^step_(\d{8})$")
COMPLETE_MARKER = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or not ours."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batches_done: int = 0  # micro-batches consumed in `epoch` by each rank
    nonfinite_total: int = 0
    samples_seen: int = 0  # all ranks together
    wall_seconds: float = 0.0
    total_steps: int = 0  # the schedule's length once fitted to run.max_minutes (0: as the recipe plans it)
    warmup_steps: int = 0  # its warmup, fitted with it
    skipped_total: int = 0  # unreadable samples the stream skipped, all ranks
    skipped_per_epoch: list[int] = field(default_factory=list)


# Full tensors, on the CPU, on rank 0 only (other ranks get empty dicts): what one writer needs.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper (its step() also drives the grad scaler)."""
    return getattr(optimizer, "optimizer", optimizer)


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Collective: the model's and optimizer's whole state, keyed by parameter name (filled on rank 0)."""
    return (get_model_state_dict(model, options=_GATHER),
            get_optimizer_state_dict(model, torch_optimizer(optimizer), options=_GATHER))


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _progress(ckpt: Path) -> tuple[int, int] | None:
    """(samples seen, step): steps are counted in global batches, which a relaunch may change; samples are not.
    None when it is being removed (a running trainer prunes old ones): it was complete when listed."""
    step = int(CKPT_RE.match(ckpt.name).group(1))
    try:
        return read_trainer_state(ckpt)[0].samples_seen, step
    except CheckpointError:
        return (-1, step) if (ckpt / COMPLETE_MARKER).is_file() else None


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (by training progress). Safe to call while a trainer writes and prunes."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    ranked = [(progress, p) for p in found if (progress := _progress(p)) is not None]
    return [p for _, p in sorted(ranked)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    plain = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, st, g = plain["python"]
    random.setstate((v, tuple(st), g))
    n = plain["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# An OSError's words inside another error's text: a DataLoader worker's, re-raised as text; safetensors' (Rust's).
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]+)')?")
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(e: Exception, path: str | Path) -> OSError | None:
    """`e`, a failed read or write, as an OSError with a one-line cause that names the file (its own, else `path`)
    and keeps the errno where any was given; None when `e` is no I/O error."""
    if isinstance(e, OSError) and e.errno:
        return OSError(e.errno, e.strerror or str(e), str(e.filename or path))
    if not isinstance(e, OSError | SafetensorError):
        return None
    text = str(e)
    if found := _ERRNO_TEXT.search(text):
        return OSError(int(found[1]), found[2], found[3] or str(path))
    if found := _RUST_OS_ERROR.search(text):
        return OSError(int(found[1]), os.strerror(int(found[1])), str(path))
    if isinstance(e, SafetensorError):
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(e).__name__]
    return OSError(None, lines[-1], str(e.filename or path))


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Any failure to write `path` leaves as an OSError that names it (a bare write error names no file)."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        err = as_os_error(e, path)
        if err is None:
            raise
        raise err from e


class _KeepsWriteError:
    """The file torch.save writes through. Its zip writer turns a failed write into `RuntimeError('unexpected pos N
    vs M')` and drops the OSError (no space left, ...); this keeps the first one, so the caller can raise it."""

    def __init__(self, f: IO[bytes]):
        self._f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()


def _open_for_write(path: Path) -> IO[bytes]:
    return open(path, "wb")


def _torch_save(obj: Any, path: Path) -> None:
    with _writing(path), _open_for_write(path) as f:
        sink = _KeepsWriteError(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None


def _write_text(path: Path, text: str) -> None:
    with _writing(path), _open_for_write(path) as f:
        f.write(text.encode())


# What this writer leaves in checkpoints/ when killed mid-save: a step folder being assembled, and `latest` being
# rewritten (shards.atomic's `.latest.<random>.tmp`). Matched exactly: nothing else there is touched.
_OWN_TEMP_RE = re.compile(r"^\.step_\d{8}\.tmp$|^\.latest\.[A-Za-z0-9_]+\.tmp$")


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Remove what an earlier, killed save left in `out_dir/checkpoints` (only this writer's temporary names);
    returns what was removed. Call it while no save is under way (the main process, at the start of a save)."""
    root = checkpoint_root(out_dir)
    removed = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if not _OWN_TEMP_RE.match(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def save_checkpoint(
    accelerator,
    out_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    recipe: dict,
    backbone_config: dict,
    keep_last: int,
    launch: dict | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    A write that fails (no space left, ...) raises an OSError naming the file, removes the half-written folder and
    leaves the checkpoints before it as they were."""
    root = checkpoint_root(out_dir)
    name = f"step_{state.step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    if accelerator.is_main_process:
        remove_stale_temporaries(out_dir)  # this step's own, and any a killed save left
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _write_parts(accelerator, tmp, model=model, optimizer=optimizer, state=state, recipe=recipe,
                     backbone_config=backbone_config, launch=launch)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _publish(tmp, final, out_dir, keep_last)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what it took; the previous checkpoints are untouched
        raise
    accelerator.wait_for_everyone()
    return final


def _write_parts(accelerator, tmp: Path, *, model, optimizer, state: TrainerState, recipe: dict,
                 backbone_config: dict, launch: dict | None) -> None:
    """Collective (the state-dict gather): every rank writes its RNG, the main process the rest."""
    model_state, optim_state = full_state_dicts(model, optimizer)
    tensors, plain = _rng_state()
    rank = accelerator.process_index
    _torch_save(tensors, tmp / f"rng_rank{rank}.pt")
    _write_text(tmp / f"rng_rank{rank}.json", json.dumps(plain))
    if not accelerator.is_main_process:
        return
    weights = tmp / "model.safetensors"
    with _writing(weights):
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(weights))
    _torch_save(optim_state, tmp / "optimizer.pt")
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        _torch_save(scaler.state_dict(), tmp / "scaler.pt")
    _write_text(tmp / "backbone_config.json", json.dumps(backbone_config, indent=2))
    meta = {"state": state.__dict__, "world_size": accelerator.num_processes, "recipe": recipe,
            "sharded": accelerator.is_fsdp2, **({"launch": launch} if launch else {})}
    _write_text(tmp / COMPLETE_MARKER, json.dumps(meta, indent=2))


def _publish(tmp: Path, final: Path, out_dir: str | Path, keep_last: int) -> None:
    """Make the assembled folder the newest checkpoint: fsync, rename, prune, point `latest` at it."""
    for f in tmp.iterdir():  # data reach the disk before the rename makes them visible
        with _writing(f):
            fsync_file(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    latest = final.parent / "latest"
    with _writing(latest):
        write_text_atomic(latest, final.name + "\n")


def read_trainer_state(ckpt: str | Path) -> tuple[TrainerState, dict]:
    path = Path(ckpt) / COMPLETE_MARKER
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: {COMPLETE_MARKER} is missing")
    try:
        meta = json.loads(path.read_text())
        return TrainerState(**meta["state"]), meta
    except FileNotFoundError as e:  # removed between the check and the read
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: {COMPLETE_MARKER} is missing") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt or not a vitssl checkpoint: {e}") from e


def load_model_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    path = Path(ckpt) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or not a safetensors file: {e}") from e


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; one clear message for all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is truncated, corrupt or holds more than plain tensors ({first})") from e


def load_checkpoint(
    accelerator,
    ckpt: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    restore_rng: bool = True,
) -> TrainerState:
    """Restore model, optimizer, scaler and this rank's RNG; return the trainer state.

    Collective under FSDP (every rank shards the full tensors it reads). The checkpoint may come from another
    process count or from a sharded run: its tensors are whole and keyed by name."""
    ckpt = Path(ckpt)
    state, meta = read_trainer_state(ckpt)
    weights = load_model_state(ckpt)
    expected = set(accelerator.unwrap_model(model).state_dict())
    missing, unexpected = expected - weights.keys(), weights.keys() - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt} does not match this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None:
        optim_state = _torch_load(ckpt / "optimizer.pt")
        if any(isinstance(i, int) for g in optim_state.get("param_groups", []) for i in g.get("params", [])):
            # Written before checkpoints keyed the state by name: only the same unsharded model can take it.
            optimizer.load_state_dict(optim_state)
        else:
            for g in optim_state.get("param_groups", []):
                # Written by a trainer that flagged scheduled groups inside the optimizer (not a torch key); a
                # fresh optimizer has no such key and torch refuses the load.
                g.pop("_wd_scheduled", None)
            # strict=False: a parameter that has not been stepped yet (DINO freezes its last layer at first) has no
            # state, in the checkpoint as in a fresh optimizer.
            set_optimizer_state_dict(model, torch_optimizer(optimizer), optim_state,
                                     options=StateDictOptions(full_state_dict=True, strict=False))
            # Loading into a fresh optimizer first initialises every parameter's state with a zero-lr step, so a
            # parameter the checkpoint holds no state for (never stepped yet) would start its first real update
            # with Adam's step count at 1, not 0. Drop that state: the parameter starts fresh, as it would have.
            saved, opt = set(optim_state.get("state", {})), torch_optimizer(optimizer)
            for name, p in accelerator.unwrap_model(model).named_parameters():
                if name not in saved and p in opt.state:
                    del opt.state[p]
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and (ckpt / "scaler.pt").is_file():
        scaler.load_state_dict(_torch_load(ckpt / "scaler.pt"))
    if restore_rng:
        rank = accelerator.process_index
        if meta.get("world_size") == accelerator.num_processes and (ckpt / f"rng_rank{rank}.pt").is_file():
            tensors = _torch_load(ckpt / f"rng_rank{rank}.pt")
            plain = json.loads((ckpt / f"rng_rank{rank}.json").read_text())
            _set_rng_state(tensors, plain)
    return state
