"""Where a run stands, carried across a relaunch with another process count, batch size or accumulation.

A checkpoint's weights and optimizer state do not depend on the launch (see `pretrain.checkpoint`), but its
position does: `batches_done` counts micro-batches *per rank*, and `step` counts updates of one global batch.
Both are translated through the one quantity every launch agrees on, samples:

* samples consumed in the current epoch = batches_done x batch_size x world_size (every rank ran the same number
  of batches), so the new launch skips the same share of the epoch, rounded down to a whole update (a few samples
  may be seen twice, none is skipped unseen);
* with the global batch unchanged (e.g. 8 GPUs x 64 -> 4 GPUs x 128, or x 64 with 2x accumulation) the step, the
  lr and every schedule continue exactly; with another global batch the step is rescaled so that the schedules
  (cosine lr, DINO's teacher momentum, ...) sit at the same fraction of the run, measured in samples.

Exact-resume guarantees (identical batches after the restart) hold only for an unchanged launch; the stream
re-partitions the rest of the interrupted epoch over the new ranks, and every later epoch is exact again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pretrain.checkpoint import TrainerState


@dataclass(frozen=True)
class Launch:
    world_size: int
    batch_size: int  # per process
    accum_steps: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accum_steps

    def describe(self) -> str:
        return (f"{self.world_size} process(es) x {self.batch_size} x {self.accum_steps} accumulation "
                f"= global batch {self.global_batch}")


def launch_of(meta: dict) -> Launch | None:
    """The launch a checkpoint was written by (from its trainer_state.json), or None if it does not say."""
    if "launch" in meta:
        return Launch(**meta["launch"])
    try:  # checkpoints written before "launch" was recorded: the recipe and the world size say the same
        return Launch(int(meta["world_size"]), int(meta["recipe"]["data"]["batch_size"]),
                      int(meta["recipe"]["optim"]["accum_steps"]))
    except (KeyError, TypeError, ValueError):
        return None


def translate(state: TrainerState, old: Launch, new: Launch, steps_per_epoch: int) -> TrainerState:
    """`state` (written under `old`) as the same point of the run under `new`, whose epochs have
    `steps_per_epoch` updates."""
    if old == new:
        return state
    epoch_samples = state.batches_done * old.batch_size * old.world_size
    updates_in_epoch = epoch_samples // new.global_batch
    # Counts of updates (the step, a schedule fitted to run.max_minutes) keep their length in samples.
    step, total, warmup = (n * old.global_batch // new.global_batch
                           for n in (state.step, state.total_steps, state.warmup_steps))
    state = dataclasses.replace(state, total_steps=total, warmup_steps=warmup)
    if updates_in_epoch >= steps_per_epoch:  # the new launch's epoch is already over: start the next one
        return dataclasses.replace(state, step=step, epoch=state.epoch + 1, batches_done=0)
    return dataclasses.replace(state, step=step, batches_done=updates_in_epoch * new.accum_steps)
