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
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from pretrain.backbone import backbone_config, export_backbone, with_data_stats
from pretrain.checkpoint import (
    TrainerState,
    load_checkpoint,
    load_model_state,
    read_trainer_state,
    save_checkpoint,
)
from pretrain.device_batch import to_device
from pretrain.evaluate import knn_summary
from pretrain.launch import LaunchError, fsdp_units, make_accelerator
from pretrain.loop_state import LoopState, Update
from pretrain.metrics_log import MetricsLog, last_logged_loss
from pretrain.objectives import build_objective
from pretrain.objectives.base import Objective
from pretrain.optimizer import build_optimizer, cosine_schedule, decayed_groups
from pretrain.position import Launch, launch_of, translate
from pretrain.rank_decision import RankDecision, any_rank
from pretrain.recipe import Recipe, save_recipe
from pretrain.run_pictures import run_pictures
from pretrain.run_resume import log_resumed, resume_point
from pretrain.run_summary import TrainResult, read_summary, summary_path, write_summary
from pretrain.schedule import cosine_value
from pretrain.stop_signal import StopSignal
from pretrain.time_budget import fitted_schedule
from pretrain.watchers import Watchers
from shards.ownership import OutputExistsError, claim_output, mark_output, marked_kind
from shards.stream import ShardStream
from shards.tar import StreamError, list_shards

log = logging.getLogger("vitssl.trainer")


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint was reloaded."""


class RunInputError(ValueError):
    """A shard set the run would read is missing, empty or refused: found before any compute."""


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

        self.optimizer = build_optimizer(self.objective, o, self.lr, acc.device)
        self.scheduler = self._make_scheduler(self.optimizer)
        self.wd_groups = decayed_groups(self.optimizer)
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
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", acc, self.is_main)
        self.metrics_path = self.metrics.path
        self.watchers = Watchers(recipe, acc, self.objective.eval_transform(), self.out_dir, sharded=self.sharded,
                                 is_main=self.is_main)

    # ------------------------------------------------------------------ helpers
    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> CosineLRScheduler:
        return cosine_schedule(optimizer, total_steps=self.total_steps, warmup_steps=self.warmup_steps, lr=self.lr,
                               min_lr=self.recipe.optim.min_lr)

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
        """run.fit_to_max_minutes, at each of FIT_POINTS of the budget: fit the schedule to the updates the rest of
        the time budget holds at the rate measured since the previous point (`fitted_schedule`), so the lr decays
        fully instead of being cut off by run.max_minutes; the slowest rank decides; the fitted length is kept in
        checkpoints."""
        r = self.recipe.run
        remaining = max(0.0, 60 * r.max_minutes - self.state.wall_seconds)
        rate = torch.tensor([steps_here / max(seconds_here, 1e-9)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            rate = self.accelerator.gather(rate)
        fitted = fitted_schedule(
            step=self.state.step, remaining=remaining, rate=float(rate.min()), total_steps=self.total_steps,
            planned_steps=self.planned_steps, planned_warmup=self.planned_warmup,
            warmup_in_steps=bool(self.recipe.optim.warmup_steps), max_minutes=r.max_minutes, is_main=self.is_main,
        )
        if fitted is not None:
            self._set_schedule_length(*fitted)
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

    def resume(self) -> None:
        """Restore the run's newest readable checkpoint (run.resume=auto) or the one named; `fit` calls it."""
        found = resume_point(self.accelerator, self.recipe.run.resume, self.out_dir, model=self.model,
                             optimizer=self.optimizer, is_main=self.is_main)
        if found is None:
            return
        ckpt, state = found
        self.last_checkpoint = ckpt
        self.metrics.truncate_to(state)
        old = launch_of(read_trainer_state(ckpt)[1]) or self.launch
        self.state = translate(state, old, self.launch, self.steps_per_epoch)
        if self.state.total_steps:  # a schedule fitted to run.max_minutes before the interruption
            total = min(self.state.total_steps, self.planned_steps)
            self._set_schedule_length(total, min(self.state.warmup_steps, self.planned_warmup))
        if self.is_main:
            log_resumed(ckpt, state, self.state, old, self.launch, self.batches_per_epoch)

    def _plain_objective(self) -> torch.nn.Module:
        """The objective with whole tensors, for the export and pictures on the main process. Under FSDP the
        prepared one holds shards (and its forward is collective), so a plain copy is built from the final
        checkpoint's gathered weights."""
        if not self.sharded:
            return self.unwrapped_objective
        objective = build_objective(self.recipe)
        objective.load_state_dict(load_model_state(self.last_checkpoint))
        return objective.to(self.accelerator.device)

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
        self.watchers.start(self.unwrapped_objective.backbone, self.state.step, self.warmup_steps, self.metrics)
        if self.is_main:
            log.info(self._describe_launch())
        self.model.train()
        loop = LoopState.start(self.state.wall_seconds, self.state.step, r)
        if self.is_main and r.progress:
            loop.progress = tqdm(total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True)
        with StopSignal() as stop:
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

    def _run_epoch(self, loop: LoopState, stop: StopSignal) -> None:
        """The rest of the current epoch (from the resume point), micro-batch by micro-batch; returns at the epoch's
        end or when the run stops."""
        acc, o = self.accelerator, self.recipe.optim
        epoch = self.state.epoch
        self.stream.set_position(epoch, self.state.batches_done)
        self.unwrapped_objective.on_epoch_start(epoch, self.steps_per_epoch)
        update = Update()
        loop.window.restart(time.monotonic())
        micro = 0
        for batch in self.stream.loader(pin_memory=acc.device.type == "cuda"):
            # Micro-batches past the epoch's last full update are dropped, identically on every rank.
            if self.state.batches_done >= self.steps_per_epoch * o.accum_steps:
                break
            self.state.batches_done += 1
            micro += 1
            stepped = self.train_step(to_device(batch, acc.device), update, loop, last=micro % o.accum_steps == 0)
            if stepped is None:
                continue
            if loop.progress is not None:
                loop.progress.update(1)
            if self._after_update(loop, stop, update, epoch, *stepped):
                return
            update = Update()
        else:
            # loader exhausted before the step count says the epoch is over (fewer batches than planned)
            if self.state.batches_done:
                self.state.epoch += 1
                self.state.batches_done = 0

    def train_step(self, batch: dict, update: Update, loop: LoopState, *, last: bool) -> tuple[float, Any] | None:
        """One micro-batch of an update; on the update's `last` one, the optimizer update. Returns None between
        updates, else (lr, grad norm tensor or None).

        Nothing is read back from the device per micro-batch: whether the loss was finite is a device flag, read
        once per update, where a non-finite loss on any rank drops the update's gradients."""
        acc, o = self.accelerator, self.recipe.optim
        with acc.autocast():
            loss, update.metrics = self.model(batch)
        finite = torch.isfinite(loss.detach()).all()
        update.finite = finite if update.finite is None else update.finite & finite
        with contextlib.nullcontext() if last else acc.no_sync(self.model):  # only the last backward all-reduces
            acc.backward(loss / o.accum_steps)
        loop.window.add_loss(loss.detach(), finite)
        update.count(batch)
        if not last:
            return None
        lr = self.set_step_schedules(self.state.step)
        (bad,) = any_rank(acc, not bool(update.finite))  # the update's one host read of the step's results
        if bad:
            self._skip_update(loop)
            return lr, None
        loop.bad_in_a_row = 0
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), o.clip_grad) if o.clip_grad > 0 else None
        objective = self.unwrapped_objective
        objective.before_optimizer_step(self.state.step, self.total_steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        update.metrics = {**update.metrics, **objective.on_step_end(self.state.step, self.total_steps)}  # e.g. EMA
        return lr, grad_norm  # the grad norm is read at the log row

    def _skip_update(self, loop: LoopState) -> None:
        """A non-finite loss on some rank: the update's gradients are dropped; too many in a row end the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state.nonfinite_total += 1
        loop.bad_in_a_row += 1
        log.warning(
            f"non-finite loss at step {self.state.step} (epoch {self.state.epoch}); update skipped "
            f"({loop.bad_in_a_row} in a row, {self.state.nonfinite_total} in total)"
        )
        if loop.bad_in_a_row >= self.recipe.run.nonfinite_patience:
            self._diverged(loop.bad_in_a_row)

    def _after_update(self, loop: LoopState, stop: StopSignal, update: Update, epoch: int, lr: float,
                      grad_norm: Any) -> bool:
        """What follows an update: shared decisions, the online k-NN, the log row, the schedule fit, the epoch's
        end, checkpoints and stopping. True when the epoch loop should end (epoch over, or the run stops)."""
        r, o = self.recipe.run, self.recipe.optim
        now = time.monotonic()
        self.state.wall_seconds = now - loop.t_start
        decision = RankDecision(
            samples=update.samples,
            skipped=update.skipped,
            signalled=stop.received is not None,
            checkpoint_due=r.checkpoint_every_minutes > 0
            and now - loop.last_checkpoint_time >= 60 * r.checkpoint_every_minutes,
            time_up=r.max_minutes > 0 and self.state.wall_seconds >= 60 * r.max_minutes,
            fit_due=loop.time_budget.fit_due(self.state.wall_seconds, self.state.step),
            eval_due=self.watchers.evaluator.due(self.state.step, now),
            collapse=self.watchers.collapse_pending,
        ).shared(self.accelerator)
        signalled, time_up, collapse = decision.signalled, decision.time_up, decision.collapse
        self.state.samples_seen += decision.samples
        loop.window.samples += decision.samples
        self._count_skipped(epoch, decision.skipped)
        # The online k-NN: when due, and at the end of the schedule or the time budget.
        last = (self.state.step >= self.total_steps or time_up) and not (signalled or collapse)
        evaluated = decision.eval_due or (last and self.watchers.evaluator.end_due(self.state.step))
        if evaluated:
            self.watchers.evaluate(self.unwrapped_objective.backbone, self.state.step)
        self._log_update(loop, update, epoch, lr, grad_norm, now, force=evaluated)
        if decision.fit_due:
            mark = loop.time_budget.fit_mark
            self._fit_schedule_to_time(self.state.step - mark[1], now - mark[0])
            loop.time_budget.fitted(now, self.state.step, self.state.wall_seconds)
            if loop.progress is not None:
                loop.progress.total = self.total_steps
        by_steps = r.checkpoint_every_steps and self.state.step % r.checkpoint_every_steps == 0
        if self.state.batches_done >= self.steps_per_epoch * o.accum_steps:
            self.state.epoch += 1
            self.state.batches_done = 0
        if by_steps or decision.checkpoint_due or signalled or time_up or collapse:
            self._save()
            loop.last_checkpoint_time = time.monotonic()
        loop.stopped = "signal" if signalled else "max_minutes" if time_up else "collapse" if collapse else ""
        return bool(loop.stopped) or self.state.step >= self.total_steps or self.state.batches_done == 0

    def _log_update(self, loop: LoopState, update: Update, epoch: int, lr: float, grad_norm: Any, now: float, *,
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
            **self.watchers.take_eval_row(),  # knn_top1, feat_rank, eval_seconds when an evaluation ran
        }
        self.metrics.append(row)
        self.watchers.watch(row)
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
            if self.recipe.run.visualize:
                pictures = run_pictures(objective, self.unwrapped_objective.eval_transform(), self.recipe,
                                        self.accelerator, self.out_dir, self.state.step, self.metrics_path)
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
            collapse_alarms=self.watchers.fired(),
        )
        if self.is_main:
            write_summary(result)
        return result

    def _already_finished(self) -> TrainResult:
        """A relaunch of a run that has reached the end of its schedule trains nothing and rewrites nothing (the
        end-of-run outputs are made only if the first launch died before writing its summary)."""
        if self.is_main:
            log.warning(
                f"{self.out_dir} already finished: step {self.state.step} of {self.total_steps}; nothing to train "
                f"(raise run.epochs or run.max_steps to train longer, or set run.resume=never to start again)"
            )
        self.accelerator.wait_for_everyone()
        if summary_path(self.out_dir).is_file() and (self.out_dir / "backbone").is_dir():
            self.accelerator.end_training()
            return read_summary(self.out_dir)
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


def train(recipe: Recipe) -> TrainResult:
    return Trainer(recipe).fit()
