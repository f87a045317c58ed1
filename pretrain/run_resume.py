"""Where a relaunched run resumes: the checkpoint run.resume names, or the newest one that loads (the unreadable
ones kept aside by name)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pretrain.checkpoint import (
    CheckpointError,
    TrainerState,
    checkpoint_root,
    list_checkpoints,
    load_checkpoint,
)
from pretrain.position import Launch

log = logging.getLogger("vitssl.trainer")


def resume_point(accelerator: Any, resume: str, out_dir: Path, *, model: Any, optimizer: Any,
                 is_main: bool) -> tuple[Path, TrainerState] | None:
    """run.resume: never (None), auto (the newest readable checkpoint, None when there is none) or a path; the
    model and optimizer are loaded from it."""
    if resume == "never":
        return None
    if resume == "auto":
        return load_newest_readable(accelerator, out_dir, model=model, optimizer=optimizer, is_main=is_main)
    ckpt = Path(resume)
    return ckpt, load_checkpoint(accelerator, ckpt, model=model, optimizer=optimizer)


def load_newest_readable(accelerator: Any, out_dir: Path, *, model: Any, optimizer: Any,
                         is_main: bool) -> tuple[Path, TrainerState] | None:
    """run.resume=auto: the newest checkpoint that loads. An unreadable one (truncated weights, a damaged
    optimizer file, ...) is reported by name, kept (renamed `*.unreadable`, so neither pruning nor a later
    save of the same step deletes it) and the previous one is tried."""
    unreadable: list[tuple[Path, str]] = []
    found = None
    for ckpt in reversed(list_checkpoints(out_dir)):
        try:
            found = ckpt, load_checkpoint(accelerator, ckpt, model=model, optimizer=optimizer)
            break
        except CheckpointError as e:
            unreadable.append((ckpt, str(e)))
            log.warning(f"checkpoint {ckpt} is unreadable ({e}); trying the one before it")
    accelerator.wait_for_everyone()  # every rank has tried the same ones before any is renamed
    kept = []
    for ckpt, _ in unreadable:
        aside = ckpt.with_name(f"{ckpt.name}.unreadable")
        n = 1
        while aside.exists():
            n += 1
            aside = ckpt.with_name(f"{ckpt.name}.unreadable{n}")
        if is_main:
            ckpt.rename(aside)
        kept.append(aside)
    accelerator.wait_for_everyone()
    if unreadable and found is None:
        raise CheckpointError(
            f"no checkpoint in {checkpoint_root(out_dir)} can be read ({len(unreadable)} tried, kept as "
            f"{', '.join(p.name for p in kept)}; first problem: {unreadable[0][1]}). To start this run afresh "
            f"set run.resume=never (or another run.out_dir); to resume from a copy elsewhere, run.resume=PATH"
        )
    if unreadable and is_main:
        log.warning(f"resuming from {found[0].name}, the newest readable checkpoint; the unreadable ones are kept "
                    f"as {', '.join(str(p) for p in kept)}")
    return found


def log_resumed(ckpt: Path, saved: TrainerState, now: TrainerState, old: Launch, launch: Launch,
                batches_per_epoch: int) -> None:
    """Where the run goes on, and how its position was carried over when the launch differs from the one that
    wrote the checkpoint."""
    log.info(
        f"resumed from {ckpt}: step {now.step}, epoch {now.epoch}, "
        f"batch {now.batches_done} of {batches_per_epoch}"
    )
    if old != launch:
        log.warning(
            f"the checkpoint was written by {old.describe()}; this launch is {launch.describe()}: "
            f"step {saved.step} -> {now.step}, epoch {saved.epoch} batch {saved.batches_done} -> "
            f"epoch {now.epoch} batch {now.batches_done} (positions carried over in samples; "
            f"the rest of epoch {saved.epoch} is re-partitioned over the new ranks, later epochs are exact)"
        )
