"""The one training loop, for every objective.

recipe -> shard stream -> objective views -> batch -> objective(batch) -> loss -> accelerator.backward
-> optimizer / schedules -> objective hooks -> checkpoints and logs.

Accelerate places devices, wraps DDP and runs mixed precision; gradient accumulation is counted here
(so an epoch's update boundaries, and therefore exact resume, do not depend on Accelerate's internal
counters). The trainer never branches on the objective's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from pretrain.alarms import CollapseAlarms
from pretrain.backbone import backbone_config, export_backbone, with_data_stats
from pretrain.checkpoint import (
    CheckpointError,
    TrainerState,
    checkpoint_root,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    read_trainer_state,
    save_checkpoint,
    torch_optimizer,
)
from pretrain.curves import curve_png
from pretrain.evaluate import OnlineEvaluator, knn_curve_png, knn_summary
from pretrain.launch import LaunchError, fsdp_units, make_accelerator
from pretrain.objectives import build_objective
from pretrain.objectives.base import Objective
from pretrain.position import Launch, launch_of, translate
from pretrain.recipe import Recipe, save_recipe
from pretrain.schedule import cosine_value
from shards.atomic import write_text_atomic
from shards.ownership import OutputExistsError, claim_output, mark_output, marked_kind
from shards.stream import ShardStream
from shards.tar import StreamError, list_shards

log = logging.getLogger("vitssl.trainer")


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint was reloaded."""


class RunInputError(ValueError):
    """A shard set the run would read is missing, empty or refused: found before any compute."""


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    epochs_done: int
    final_loss: float
    checkpoint: Path | None
    backbone_dir: Path | None
    nonfinite_skipped: int
    samples_seen: int
    wall_seconds: float
    pictures: list[Path] = field(default_factory=list)
    # why the run ended before its schedule ("", "max_minutes", "signal", "collapse")
    stopped_early: str = ""
    skipped_samples: int = 0  # unreadable samples the stream skipped, all ranks, whole run
    skipped_per_epoch: list[int] = field(default_factory=list)
    # online k-NN top-1 (pretrain.evaluate): best and last with their steps, the random-init baseline ("init"), the
    # evaluations' count and seconds; {} when off
    online_knn: dict[str, Any] = field(default_factory=dict)
    collapse_alarms: list[dict[str, Any]] = field(default_factory=list)  # alarms that fired: signal, step, text

    def summary(self) -> dict[str, Any]:
        """As train_summary.json holds it: paths as strings, a missing loss as null (NaN is not JSON)."""
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        out["pictures"] = [str(p) for p in self.pictures]
        if not math.isfinite(out["final_loss"]):
            out["final_loss"] = None
        return out


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule used by MAE, DINO and most ViT recipes: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256


def _check_compile_possible(device: torch.device) -> None:
    """run.compile on the CPU: inductor builds C++ kernels; say so at start instead of deep in the first step."""
    if device.type == "cpu":
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            raise LaunchError(
                f"run.compile=true on the CPU needs a C++ compiler, and {cxx!r} is not on PATH (set CXX, install "
                "g++), or use run.compile=false"
            )


# Shares of run.max_minutes at which run.fit_to_max_minutes re-measures the update rate; a machine that slows
# down later in the run shortens the schedule again.
FIT_POINTS = (0.03, 0.25, 0.5, 0.75, 0.9)


def check_inputs(recipe: Recipe) -> None:
    """Resolve every shard set the run reads (data.train now, data.val for the pictures at its end) before any
    compute, so a wrong path fails at start instead of after the whole run."""
    d = recipe.data
    if not d.train:
        raise RunInputError("data.train is empty: point it at a shard-set folder (see `python -m shards write`)")
    for key, source in (("data.train", d.train), ("data.val", d.val)):
        if not source:  # data.val is optional (null or ""): the pictures then use data.train
            continue
        try:
            found = list_shards(source, allow_pipe=d.allow_pipe)
        except (OSError, ValueError, StreamError) as e:
            raise RunInputError(f"{key}={source!r} cannot be read: {e}") from None
        if not any(count for _, count in found):
            raise RunInputError(f"{key}={source!r} holds no samples ({len(found)} shards)")


def _same_point(a: TrainerState, b: TrainerState) -> bool:
    # Samples too: after a relaunch with another global batch, a step number can recur at a later point.
    return (a.step, a.samples_seen) == (b.step, b.samples_seen)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_config(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # ValueError: not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class _Window:
    """What the next metrics row averages: the loss of the micro-batches since the previous row, and the rate."""

    loss: Any = 0.0  # a sum of loss tensors (finite ones only), read once per row
    n: Any = 0  # how many were added (a tensor too once one was)
    t0: float = 0.0
    samples: int = 0
    micro: int = 0  # micro-batches since the row (a plain count: is there anything to average?)

    def add_loss(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        self.loss = self.loss + torch.where(finite, loss.float(), 0.0)
        self.n = self.n + finite.int()
        self.micro += 1

    def mean(self) -> float:
        """The mean finite loss of the window (one host read); NaN when none was finite."""
        n = int(self.n)
        return float(self.loss) / n if n else float("nan")

    def restart(self, now: float) -> None:
        self.loss, self.n, self.t0, self.samples, self.micro = 0.0, 0, now, 0, 0


@dataclass
class _Update:
    """One optimizer update in the making, over its accumulated micro-batches."""

    finite: Any = None  # a device flag: every micro-batch's loss was finite (read once, at the update)
    samples: int = 0
    skipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Loop:
    """The state of one launch's training loop that is not checkpointed (the clock, the log window, the progress
    bar, the run.fit_to_max_minutes marks)."""

    t_start: float
    fit_mark: tuple[float, int]  # (time, step) from which run.fit_to_max_minutes measures the rate
    fit_points: list[float]
    budget: float  # seconds of run.max_minutes
    last_checkpoint_time: float
    window: _Window = field(default_factory=_Window)
    final_loss: float = float("nan")
    bad_in_a_row: int = 0
    stopped: str = ""
    progress: Any = None

    @classmethod
    def start(cls, wall_seconds: float, step: int, run: Any) -> _Loop:
        now = time.monotonic()
        budget = 60 * run.max_minutes
        points = [f for f in FIT_POINTS if f * budget > wall_seconds] if run.fit_to_max_minutes else []
        return cls(now - wall_seconds, (now, step), points, budget, now)

    def fit_due(self, wall_seconds: float, step: int) -> bool:
        return bool(self.fit_points) and wall_seconds >= self.fit_points[0] * self.budget and step - self.fit_mark[1] >= 5

    def fitted(self, now: float, step: int, wall_seconds: float) -> None:
        self.fit_mark = (now, step)
        self.fit_points = [f for f in self.fit_points if f * self.budget > wall_seconds]


class Trainer:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        r = recipe.run
        self.out_dir = Path(r.out_dir)
        try:  # a run folder is new, empty or an earlier run of ours (resumed); never a folder of other files
            claim_output(self.out_dir, "run", resume=True)
        except OutputExistsError as e:
            raise RunInputError(f"run.out_dir: {e}") from None
        trackers = [t for t in r.trackers if t != "jsonl"]
        self.accelerator = make_accelerator(
            precision=r.precision, cpu=r.cpu, fsdp=r.fsdp, log_with=trackers or None, project_dir=str(self.out_dir)
        )
        acc = self.accelerator
        self.is_main = acc.is_main_process
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING, format="%(message)s")
        check_inputs(recipe)

        # Same initial weights on every rank; then a per-rank stream of randomness (masks, drop path; numpy and
        # python's too: timm's Mixup/CutMix draw from numpy), so a run repeats exactly.
        torch.manual_seed(r.seed)
        self.objective = build_objective(recipe)
        set_seed(r.seed + 1 + 1000 * acc.process_index)

        d, o = recipe.data, recipe.optim
        try:
            self.stream = self._train_stream()
        except ValueError as e:  # e.g. fewer samples than one batch: a fact about the data, said before compute
            raise RunInputError(f"data.train={d.train!r}: {e}") from None
        self.batches_per_epoch = self.stream.batches_per_epoch()
        self.steps_per_epoch = self.batches_per_epoch // o.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"an epoch has {self.batches_per_epoch} batches per process, fewer than optim.accum_steps="
                f"{o.accum_steps}: lower data.batch_size or accumulation, or add data"
            )
        self.total_steps = r.max_steps or r.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.launch = Launch(acc.num_processes, d.batch_size, o.accum_steps)
        self.global_batch = self.launch.global_batch
        self.lr = scaled_lr(o.base_lr, self.global_batch)
        self.warmup_steps = o.warmup_steps or int(round(o.warmup_epochs * self.steps_per_epoch))
        # The schedule as the recipe plans it: run.fit_to_max_minutes fits within this, never beyond it.
        self.planned_steps, self.planned_warmup = self.total_steps, self.warmup_steps

        opt_kwargs: dict[str, Any] = {"eps": o.eps}
        if o.name.lower() in ("adamw", "adam", "lamb", "adan", "lion", "nadamw"):
            opt_kwargs["betas"] = tuple(o.betas)
        if o.name.lower() in ("adamw", "adam") and acc.device.type == "cuda":
            opt_kwargs["fused"] = True
        self.optimizer = create_optimizer_v2(
            self.objective,
            opt=o.name,
            lr=self.lr,
            weight_decay=o.weight_decay,
            momentum=o.momentum,
            layer_decay=o.layer_decay or None,
            **opt_kwargs,
        )
        self.scheduler = self._make_scheduler(self.optimizer)
        # The groups whose weight decay optim.weight_decay_end schedules: those created with decay (no-decay groups
        # of biases and norms stay at 0). Kept here, not as a flag in the param groups: a flag there would go into
        # the checkpoint and a fresh optimizer could not load it.
        self.wd_groups = [i for i, g in enumerate(self.optimizer.param_groups) if g.get("weight_decay", 0.0) > 0.0]
        if r.compile:
            _check_compile_possible(acc.device)
            # In place (nn.Module.compile): parameter names, checkpoints and the exported backbone stay the same.
            self.objective.compile()
        self.sharded = bool(acc.is_fsdp2)
        if self.sharded:  # each transformer block its own FSDP unit; the rest (embeddings, heads) in the root
            acc.state.fsdp_plugin.transformer_cls_names_to_wrap = fsdp_units(self.objective)
        self.model, self.optimizer = acc.prepare(self.objective, self.optimizer)
        self.state = TrainerState()
        self.last_checkpoint: Path | None = None
        self.metrics_path = self.out_dir / "metrics.jsonl"
        # The online k-NN and the collapse alarms (pretrain.evaluate): the evaluator only reads the backbone.
        self.evaluator = OnlineEvaluator(
            recipe.eval, train_source=d.train, out_dir=self.out_dir, accelerator=acc,
            transform=self.objective.eval_transform(), num_workers=d.num_workers,
            max_bad_fraction=d.max_bad_fraction, allow_pipe=d.allow_pipe,
        )
        if self.sharded and recipe.eval.enabled:
            self.evaluator.off_reason = "run.fsdp=true: the online k-NN does not embed with a sharded backbone yet"
        self.alarms: CollapseAlarms | None = None  # made in fit(), when the warmup length is known

    # ------------------------------------------------------------------ helpers
    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> CosineLRScheduler:
        """timm's per-update warmup + cosine over `self.total_steps`."""
        return CosineLRScheduler(
            torch_optimizer(optimizer),
            t_initial=max(1, self.total_steps - self.warmup_steps),
            lr_min=self.recipe.optim.min_lr,
            warmup_t=self.warmup_steps,
            warmup_lr_init=0.0 if self.warmup_steps else self.lr,
            warmup_prefix=True,
            t_in_epochs=False,
        )

    def _train_stream(self) -> ShardStream:
        d, r, acc = self.recipe.data, self.recipe.run, self.accelerator
        return ShardStream(
            d.train,
            batch_size=d.batch_size,
            num_workers=d.num_workers,
            transform=self.objective.train_transform(),
            mode=d.mode,
            remainder=d.remainder,
            shuffle=True,
            shuffle_buffer=d.shuffle_buffer,
            seed=r.seed,
            epoch_samples=d.epoch_samples,
            rank=acc.process_index,
            world_size=acc.num_processes,
            max_bad_fraction=d.max_bad_fraction,
            require=tuple(self.objective.requires),
            allow_pipe=d.allow_pipe,
        )

    def _set_schedule_length(self, total_steps: int, warmup_steps: int) -> None:
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.epochs = math.ceil(total_steps / self.steps_per_epoch)
        self.scheduler = self._make_scheduler(self.optimizer)

    def _fit_schedule_to_time(self, steps_here: int, seconds_here: float) -> None:
        """run.fit_to_max_minutes, at each of FIT_POINTS of the budget: fit the schedule (a warmup given in epochs
        in proportion; one given in updates kept, up to a quarter of the run) to
        the updates the rest of the time budget holds at the rate measured since the previous point, so the lr
        decays fully instead of being cut off by run.max_minutes. Re-fitted in both directions (a busy moment at
        one measurement must not waste the rest of the budget), never beyond the recipe's own length; the slowest
        rank decides; the fitted length is kept in checkpoints."""
        r = self.recipe.run
        remaining = max(0.0, 60 * r.max_minutes - self.state.wall_seconds)
        rate = torch.tensor([steps_here / max(seconds_here, 1e-9)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            rate = self.accelerator.gather(rate)
        rate = float(rate.min())
        # Shorten to what the rest of the budget holds with a 5% margin (checkpoints, the final export, a machine
        # that slows down later). Lengthen only past 10% more, with a 10% margin: a late lengthening that the
        # budget cannot hold would cut the cosine off after all.
        total = min(self.planned_steps, max(self.state.step + 1, int(self.state.step + 0.95 * remaining * rate)))
        if total >= self.total_steps:
            longer = min(self.planned_steps, int(self.state.step + 0.9 * remaining * rate))
            total = longer if longer > 1.1 * self.total_steps else self.total_steps
        if total != self.total_steps:
            if self.is_main:
                log.warning(
                    f"run.max_minutes={r.max_minutes:g} holds about {total} of the recipe's {self.planned_steps} "
                    f"updates (measured {rate:.2f} updates/s on the slowest rank): the lr schedule now ends at update "
                    f"{total} (was {self.total_steps})"
                )
            # optim.warmup_steps counts updates: the first updates need it however long the run turns out to be,
            # so it is kept (at most a quarter of the fitted run); optim.warmup_epochs is a share of the plan and
            # shrinks with it.
            if self.recipe.optim.warmup_steps:
                warmup = min(self.planned_warmup, total // 4)
            else:
                warmup = round(self.planned_warmup * total / self.planned_steps)
            self._set_schedule_length(total, warmup)
        self.state.total_steps, self.state.warmup_steps = self.total_steps, self.warmup_steps

    @property
    def unwrapped_objective(self) -> Objective:
        """The objective without Accelerate's wrappers (DDP, compile): its parameters, buffers and methods."""
        return self.accelerator.unwrap_model(self.model)

    def set_step_schedules(self, step: int) -> float:
        """lr (timm's warmup + cosine, per update) and the optional weight-decay cosine, at `step`."""
        self.scheduler.step_update(num_updates=step)
        o = self.recipe.optim
        if o.weight_decay_end >= 0:
            wd = cosine_value(o.weight_decay, o.weight_decay_end, step, self.total_steps)
            for i in self.wd_groups:
                self.optimizer.param_groups[i]["weight_decay"] = wd
        # With layer-wise lr decay the groups' lrs are scaled down from the schedule's; log the unscaled one.
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _rank_sums(self, *values: float | bool) -> list[float]:
        """Each value summed over the ranks (a flag: > 0 when it is True on any rank), in one all-reduce: the
        decisions every rank must share and the counts every rank must agree on."""
        if self.accelerator.num_processes == 1:  # nothing to share: no device round trip
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def _any_rank(self, *flags: bool) -> list[bool]:
        """Each flag True when it is True on any rank (skip/stop decisions every rank must share)."""
        return [v > 0 for v in self._rank_sums(*flags)]

    def _count_skipped(self, epoch: int, n: int) -> None:
        per_epoch = self.state.skipped_per_epoch
        per_epoch.extend([0] * (epoch + 1 - len(per_epoch)))
        per_epoch[epoch] += n
        self.state.skipped_total += n

    def _backbone_config(self) -> dict:
        objective = self.unwrapped_objective
        return with_data_stats(backbone_config(objective.backbone), *objective.data_stats())

    def _save(self) -> Path:
        ckpt = save_checkpoint(
            self.accelerator,
            self.out_dir,
            model=self.model,
            optimizer=self.optimizer,
            state=self.state,
            recipe=self.recipe.to_dict(),
            backbone_config=self._backbone_config(),
            keep_last=self.recipe.run.keep_last,
            launch=dataclasses.asdict(self.launch),
        )
        self.last_checkpoint = ckpt
        if self.is_main:
            log.info(f"checkpoint: {ckpt}")
        return ckpt

    def _log(self, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["step"])

    def _truncate_metrics(self, state: TrainerState) -> None:
        """On resume, drop log lines past the checkpoint (they will be redone). Progress is compared in samples:
        a relaunch with another global batch numbers its steps differently."""
        if not self.is_main or not self.metrics_path.is_file():
            return

        def done(row: dict) -> bool:
            if "samples_seen" in row:
                return row["samples_seen"] <= state.samples_seen
            return row.get("step", 0) <= state.step

        kept = [ln for ln in self.metrics_path.read_text().splitlines() if ln and done(json.loads(ln))]
        write_text_atomic(self.metrics_path, "".join(ln + "\n" for ln in kept))

    def _load_newest_readable(self) -> tuple[Path, TrainerState] | None:
        """run.resume=auto: the newest checkpoint that loads. An unreadable one (truncated weights, a damaged
        optimizer file, ...) is reported by name, kept (renamed `*.unreadable`, so neither pruning nor a later
        save of the same step deletes it) and the previous one is tried."""
        unreadable: list[tuple[Path, str]] = []
        found = None
        for ckpt in reversed(list_checkpoints(self.out_dir)):
            try:
                found = ckpt, load_checkpoint(self.accelerator, ckpt, model=self.model, optimizer=self.optimizer)
                break
            except CheckpointError as e:
                unreadable.append((ckpt, str(e)))
                log.warning(f"checkpoint {ckpt} is unreadable ({e}); trying the one before it")
        self.accelerator.wait_for_everyone()  # every rank has tried the same ones before any is renamed
        kept = []
        for ckpt, _ in unreadable:
            aside = ckpt.with_name(f"{ckpt.name}.unreadable")
            n = 1
            while aside.exists():
                n += 1
                aside = ckpt.with_name(f"{ckpt.name}.unreadable{n}")
            if self.is_main:
                ckpt.rename(aside)
            kept.append(aside)
        self.accelerator.wait_for_everyone()
        if unreadable and found is None:
            raise CheckpointError(
                f"no checkpoint in {checkpoint_root(self.out_dir)} can be read ({len(unreadable)} tried, kept as "
                f"{', '.join(p.name for p in kept)}; first problem: {unreadable[0][1]}). To start this run afresh "
                f"set run.resume=never (or another run.out_dir); to resume from a copy elsewhere, run.resume=PATH"
            )
        if unreadable and self.is_main:
            log.warning(f"resuming from {found[0].name}, the newest readable checkpoint; the unreadable ones are kept "
                        f"as {', '.join(str(p) for p in kept)}")
        return found

    def resume(self) -> None:
        """Restore the run's newest readable checkpoint (run.resume=auto) or the one named; `fit` calls it."""
        r = self.recipe.run
        if r.resume == "never":
            return
        if r.resume == "auto":
            found = self._load_newest_readable()
            if found is None:
                return
            ckpt, state = found
        else:
            ckpt = Path(r.resume)
            state = load_checkpoint(self.accelerator, ckpt, model=self.model, optimizer=self.optimizer)
        self.last_checkpoint = ckpt
        self._truncate_metrics(state)
        old = launch_of(read_trainer_state(ckpt)[1]) or self.launch
        self.state = translate(state, old, self.launch, self.steps_per_epoch)
        if self.state.total_steps:  # a schedule fitted to run.max_minutes before the interruption
            total = min(self.state.total_steps, self.planned_steps)
            self._set_schedule_length(total, min(self.state.warmup_steps, self.planned_warmup))
        if self.is_main:
            log.info(
                f"resumed from {ckpt}: step {self.state.step}, epoch {self.state.epoch}, "
                f"batch {self.state.batches_done} of {self.batches_per_epoch}"
            )
            if old != self.launch:
                log.warning(
                    f"the checkpoint was written by {old.describe()}; this launch is {self.launch.describe()}: "
                    f"step {state.step} -> {self.state.step}, epoch {state.epoch} batch {state.batches_done} -> "
                    f"epoch {self.state.epoch} batch {self.state.batches_done} (positions carried over in samples; "
                    f"the rest of epoch {state.epoch} is re-partitioned over the new ranks, later epochs are exact)"
                )

    def _fixed_batch(self) -> dict | None:
        """A few un-augmented images for pictures (the same ones at every call)."""
        d = self.recipe.data
        source = d.val or d.train
        s = ShardStream(
            source,
            batch_size=8,
            num_workers=0,
            transform=self.unwrapped_objective.eval_transform(),
            mode="exact",
            remainder="pad",
            shuffle=False,
            rank=0,
            world_size=1,
            max_bad_fraction=d.max_bad_fraction,
        )
        for batch in s.loader():
            return to_device(batch, self.accelerator.device)
        return None

    def _plain_objective(self) -> torch.nn.Module:
        """The objective with whole tensors, for the export and pictures on the main process. Under FSDP the
        prepared one holds shards (and its forward is collective), so a plain copy is built from the final
        checkpoint's gathered weights."""
        if not self.sharded:
            return self.unwrapped_objective
        objective = build_objective(self.recipe)
        objective.load_state_dict(load_model_state(self.last_checkpoint))
        return objective.to(self.accelerator.device)

    def _pictures(self, obj: torch.nn.Module) -> list[Path]:
        out = []
        if not (self.recipe.run.visualize and self.is_main):
            return out
        batch = self._fixed_batch()
        if batch is not None:
            was_training = obj.training
            obj.eval()
            with torch.no_grad(), self.accelerator.autocast():
                p = obj.visualize(batch, self.out_dir / "pictures" / f"{self.recipe.objective.name}_step{self.state.step:08d}.png")
            obj.train(was_training)
            if p is not None:
                out.append(Path(p))
        for draw, name in ((loss_curve_png, "loss_curve.png"), (knn_curve_png, "knn_curve.png")):
            curve = draw(self.metrics_path, self.out_dir / "pictures" / name)
            if curve is not None:
                out.append(curve)
        return out

    def _start_watching(self) -> None:
        """The collapse alarms (with what a resumed run logged before) and the online k-NN (which keeps a fresh
        run's starting weights for its random-init baseline)."""
        a = self.recipe.alarm
        self.alarms = CollapseAlarms(a, after_steps=a.after_steps if a.after_steps >= 0 else self.warmup_steps)
        if self.is_main and self.state.step > 0 and self.metrics_path.is_file():
            self.alarms.replay([json.loads(ln) for ln in self.metrics_path.read_text().splitlines() if ln.strip()])
        self._eval_row: dict[str, float] = {}  # evaluation numbers waiting for the next logged row
        self._collapse_pending = False  # an alarm fired on the main process: every rank stops at the next update
        self.evaluator.begin(self.unwrapped_objective.backbone, fresh=self.state.step == 0)

    def _evaluate(self) -> None:
        """The online k-NN of the backbone as it is now (every rank: the embedding is collective)."""
        self._eval_row.update(self.evaluator.evaluate(self.unwrapped_objective.backbone, self.state.step))

    def _watch(self, row: dict[str, Any]) -> None:
        """The alarms read the row just logged (main process); with alarm.stop_on_collapse a firing stops the run."""
        if self.alarms is None or not self.is_main:
            return
        if self.alarms.observe(row) and self.recipe.alarm.stop_on_collapse:
            self._collapse_pending = True

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        acc, r = self.accelerator, self.recipe.run
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if marked_kind(self.out_dir) is None:
                mark_output(self.out_dir, "run")
            save_recipe(self.recipe, self.out_dir / "recipe.yaml")
            if self.recipe.auto_note:  # first, so a run's log says what its numbers were read off
                log.info(f"recipe {self.recipe.auto_note}")
        acc.wait_for_everyone()
        if any(t != "jsonl" for t in r.trackers):
            acc.init_trackers("trackers", config=_flat_config(self.recipe.to_dict()))
        self.resume()
        if self.state.step >= self.total_steps:
            return self._already_finished()
        self._start_watching()
        if self.is_main:
            log.info(self._describe_launch())
        self.model.train()
        loop = _Loop.start(self.state.wall_seconds, self.state.step, r)
        if self.is_main and r.progress:
            loop.progress = tqdm(total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True)
        with _StopSignal() as stop:
            while self.state.step < self.total_steps and not loop.stopped:
                self._run_epoch(loop, stop)
        if loop.progress is not None:
            loop.progress.close()
        if loop.window.micro and int(loop.window.n):  # updates after the last row: the final loss is theirs
            loop.final_loss = loop.window.mean()
        if self.last_checkpoint is None or not _same_point(read_trainer_state(self.last_checkpoint)[0], self.state):
            self._save()
        return self._finish(loop.final_loss, loop.stopped)

    def _describe_launch(self) -> str:
        acc, r, o = self.accelerator, self.recipe.run, self.recipe.optim
        return (f"{self.recipe.objective.name}: {acc.num_processes} process(es) on {acc.device}, precision "
                f"{r.precision}; global batch {self.global_batch} = {self.recipe.data.batch_size} per process x "
                f"{acc.num_processes} processes x {o.accum_steps} accumulation; "
                f"lr = {o.base_lr:g} x {self.global_batch}/256 = {self.lr:.3g}; "
                f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, warmup {self.warmup_steps}")

    def _run_epoch(self, loop: _Loop, stop: _StopSignal) -> None:
        """The rest of the current epoch (from the resume point), micro-batch by micro-batch; returns at the epoch's
        end or when the run stops."""
        acc, o = self.accelerator, self.recipe.optim
        epoch = self.state.epoch
        self.stream.set_position(epoch, self.state.batches_done)
        self.unwrapped_objective.on_epoch_start(epoch, self.steps_per_epoch)
        update = _Update()
        loop.window.restart(time.monotonic())
        micro = 0
        for batch in self.stream.loader(pin_memory=acc.device.type == "cuda"):
            # Micro-batches past the epoch's last full update are dropped, identically on every rank.
            if self.state.batches_done >= self.steps_per_epoch * o.accum_steps:
                break
            self.state.batches_done += 1
            micro += 1
            is_update = micro % o.accum_steps == 0
            self._micro_step(to_device(batch, acc.device), update, loop.window, sync=is_update)
            if not is_update:
                continue
            lr, grad_norm = self._optimizer_update(update, loop, epoch)
            if self._after_update(loop, stop, update, epoch, lr, grad_norm):
                return
            update = _Update()
        else:
            # loader exhausted before the step count says the epoch is over (fewer batches than planned)
            if self.state.batches_done:
                self.state.epoch += 1
                self.state.batches_done = 0

    def _micro_step(self, batch: dict, update: _Update, window: _Window, *, sync: bool) -> None:
        """Forward and backward of one micro-batch, without reading anything back from the device: whether the
        loss was finite is kept as a device flag and decided once per update (`_optimizer_update`), where a
        non-finite loss on any rank drops the update's gradients. `sync`: the last micro-batch of an update, whose
        backward all-reduces."""
        acc, o = self.accelerator, self.recipe.optim
        with acc.autocast():
            loss, update.metrics = self.model(batch)
        finite = torch.isfinite(loss.detach()).all()
        update.finite = finite if update.finite is None else update.finite & finite
        if sync:
            acc.backward(loss / o.accum_steps)
        else:
            with acc.no_sync(self.model):
                acc.backward(loss / o.accum_steps)
        window.add_loss(loss.detach(), finite)
        # Samples trained: pads (duplicates standing in for unreadable samples) are not counted.
        update.samples += batch["real"] if "real" in batch else len(batch["index"])
        update.skipped += int(batch.get("skipped", 0))

    def _optimizer_update(self, update: _Update, loop: _Loop, epoch: int) -> tuple[float, Any]:
        """One optimizer update, or a skipped one after a non-finite loss; returns (lr, grad norm tensor or None)."""
        acc, r, o = self.accelerator, self.recipe.run, self.recipe.optim
        lr = self.set_step_schedules(self.state.step)
        grad_norm = None
        (bad,) = self._any_rank(not bool(update.finite))  # the update's one host read of the step's results
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_total += 1
            loop.bad_in_a_row += 1
            log.warning(
                f"non-finite loss at step {self.state.step} (epoch {epoch}); update skipped "
                f"({loop.bad_in_a_row} in a row, {self.state.nonfinite_total} in total)"
            )
            if loop.bad_in_a_row >= r.nonfinite_patience:
                self._diverged(loop.bad_in_a_row)
        else:
            loop.bad_in_a_row = 0
            if o.clip_grad > 0:
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), o.clip_grad)  # read at the log row
            self.unwrapped_objective.before_optimizer_step(self.state.step, self.total_steps)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            hook_metrics = self.unwrapped_objective.on_step_end(self.state.step, self.total_steps)
            update.metrics = {**update.metrics, **hook_metrics}
        if loop.progress is not None:
            loop.progress.update(1)
        return lr, grad_norm

    def _after_update(self, loop: _Loop, stop: _StopSignal, update: _Update, epoch: int, lr: float,
                      grad_norm: Any) -> bool:
        """What follows an update: shared decisions, the online k-NN, the log row, the schedule fit, the epoch's
        end, checkpoints and stopping. True when the epoch loop should end (epoch over, or the run stops)."""
        r, o = self.recipe.run, self.recipe.optim
        now = time.monotonic()
        self.state.wall_seconds = now - loop.t_start
        # Clock- and signal-driven decisions differ per rank, and so do sample counts; one all-reduce makes them
        # shared.
        samples, skipped, *flags = self._rank_sums(
            update.samples,
            update.skipped,
            stop.received is not None,
            r.checkpoint_every_minutes > 0 and now - loop.last_checkpoint_time >= 60 * r.checkpoint_every_minutes,
            r.max_minutes > 0 and self.state.wall_seconds >= 60 * r.max_minutes,
            loop.fit_due(self.state.wall_seconds, self.state.step),
            self.evaluator.due(self.state.step, now),
            self._collapse_pending,
        )
        signalled, by_time, time_up, fit_due, eval_due, collapse = (v > 0 for v in flags)
        self.state.samples_seen += int(samples)
        loop.window.samples += int(samples)
        self._count_skipped(epoch, int(skipped))
        # The online k-NN: when due, and at the end of the schedule or the time budget.
        last = (self.state.step >= self.total_steps or time_up) and not (signalled or collapse)
        evaluated = eval_due or (last and self.evaluator.end_due(self.state.step))
        if evaluated:
            self._evaluate()
        self._log_update(loop, update, epoch, lr, grad_norm, now, force=evaluated)
        if fit_due:
            self._fit_schedule_to_time(self.state.step - loop.fit_mark[1], now - loop.fit_mark[0])
            loop.fitted(now, self.state.step, self.state.wall_seconds)
            if loop.progress is not None:
                loop.progress.total = self.total_steps
        by_steps = r.checkpoint_every_steps and self.state.step % r.checkpoint_every_steps == 0
        if self.state.batches_done >= self.steps_per_epoch * o.accum_steps:
            self.state.epoch += 1
            self.state.batches_done = 0
        if by_steps or by_time or signalled or time_up or collapse:
            self._save()
            loop.last_checkpoint_time = time.monotonic()
        loop.stopped = "signal" if signalled else "max_minutes" if time_up else "collapse" if collapse else ""
        return bool(loop.stopped) or self.state.step >= self.total_steps or self.state.batches_done == 0

    def _log_update(self, loop: _Loop, update: _Update, epoch: int, lr: float, grad_norm: Any, now: float, *,
                    force: bool) -> None:
        """Every run.log_every updates (and at the last one, or after an evaluation): one metrics row averaging the
        window since the previous row."""
        r, w = self.recipe.run, loop.window
        if not w.micro or not (force or self.state.step % r.log_every == 0 or self.state.step == self.total_steps):
            return
        if not int(w.n):  # only non-finite losses since the last row: nothing to average yet
            return
        loop.final_loss = w.mean()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        rate = w.samples / max(now - w.t0, 1e-9)
        row = {
            "step": self.state.step,
            "epoch": epoch,
            "loss": loop.final_loss,
            "lr": lr,
            # measured only when clipping; NaN would make metrics.jsonl invalid JSON
            **({"grad_norm": grad_norm} if math.isfinite(grad_norm) else {}),
            "samples_per_s": rate,
            "samples_seen": self.state.samples_seen,
            "nonfinite_total": self.state.nonfinite_total,
            # unreadable samples the stream skipped (all ranks): this epoch so far, and the run's
            "skipped_epoch": self.state.skipped_per_epoch[epoch],
            "skipped_total": self.state.skipped_total,
            **{k: float(v) for k, v in update.metrics.items() if k != "loss"},
            **self._eval_row,  # knn_top1, feat_rank, eval_seconds when an evaluation ran
        }
        self._eval_row = {}
        self._log(row)
        self._watch(row)
        if loop.progress is not None:
            loop.progress.set_postfix(loss=f"{loop.final_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        w.restart(now)

    def _finish(self, final_loss: float, stopped: str) -> TrainResult:
        """The end of a run: the backbone export, the objective's own outputs, pictures, train_summary.json."""
        acc = self.accelerator
        backbone_dir, pictures = None, []
        if self.is_main:
            objective = self._plain_objective()
            backbone_dir = export_backbone(objective.backbone, self.out_dir / "backbone", *objective.data_stats(),
                                           overwrite=True)  # the run's own export, e.g. after a longer schedule
            objective.on_train_end(self.out_dir)
            pictures = self._pictures(objective)
        acc.wait_for_everyone()
        acc.end_training()
        if not math.isfinite(final_loss):  # no update logged in this launch (a resumed run's last stretch)
            final_loss = last_logged_loss(self.metrics_path)
        result = TrainResult(
            out_dir=self.out_dir,
            steps=self.state.step,
            epochs_done=self.state.epoch,
            final_loss=final_loss,
            checkpoint=self.last_checkpoint,
            backbone_dir=backbone_dir,
            nonfinite_skipped=self.state.nonfinite_total,
            samples_seen=self.state.samples_seen,
            wall_seconds=self.state.wall_seconds,
            pictures=pictures,
            stopped_early=stopped,
            skipped_samples=self.state.skipped_total,
            skipped_per_epoch=list(self.state.skipped_per_epoch),
            online_knn=knn_summary(self.metrics_path) if self.is_main else {},
            collapse_alarms=list(self.alarms.fired_dicts()) if self.alarms is not None and self.is_main else [],
        )
        if self.is_main:
            write_text_atomic(self.out_dir / "train_summary.json",
                              json.dumps(result.summary(), indent=2, allow_nan=False))
        return result

    def _already_finished(self) -> TrainResult:
        """A relaunch of a run that has reached the end of its schedule trains nothing and rewrites nothing (the
        end-of-run outputs are made only if the first launch died before writing its summary)."""
        if self.is_main:
            log.warning(
                f"{self.out_dir} already finished: step {self.state.step} of {self.total_steps}; nothing to train "
                f"(raise run.epochs or run.max_steps to train longer, or set run.resume=never to start again)"
            )
        summary_path = self.out_dir / "train_summary.json"
        self.accelerator.wait_for_everyone()
        if summary_path.is_file() and (self.out_dir / "backbone").is_dir():
            self.accelerator.end_training()
            s = json.loads(summary_path.read_text())
            return TrainResult(
                **{**s, "out_dir": Path(s["out_dir"]),
                   "final_loss": float("nan") if s["final_loss"] is None else s["final_loss"],
                   "checkpoint": Path(s["checkpoint"]) if s.get("checkpoint") else None,
                   "backbone_dir": Path(s["backbone_dir"]) if s.get("backbone_dir") else None,
                   "pictures": [Path(x) for x in s.get("pictures", [])]})
        return self._finish(float("nan"), "")

    def _diverged(self, count: int) -> None:
        where = f"step {self.state.step}, epoch {self.state.epoch}, batch {self.state.batches_done}"
        if self.last_checkpoint is not None:
            load_checkpoint(self.accelerator, self.last_checkpoint, model=self.model, optimizer=self.optimizer)
            what = f"reloaded the last good checkpoint {self.last_checkpoint}"
        else:
            what = "no checkpoint had been written yet, so nothing was reloaded"
        raise TrainingDiverged(
            f"{count} non-finite losses in a row at {where} (run folder {self.out_dir}); {what}. "
            f"Try a lower optim.base_lr, optim.clip_grad > 0, or run.precision=no."
        )


def last_logged_loss(metrics_path: Path) -> float:
    """The loss of the last row of metrics.jsonl (NaN when there is none)."""
    if metrics_path.is_file():
        for line in reversed(metrics_path.read_text().splitlines()):
            row = json.loads(line) if line.strip() else {}
            if isinstance(row.get("loss"), (int, float)):
                return float(row["loss"])
    return float("nan")


def loss_curve_png(metrics_path: Path, out: Path) -> Path | None:
    if not metrics_path.is_file():
        return None
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    if len(rows) < 2:
        return None
    return curve_png([r["step"] for r in rows], [r["loss"] for r in rows], out, ylabel="loss", title="training loss")


def train(recipe: Recipe) -> TrainResult:
    return Trainer(recipe).fit()
