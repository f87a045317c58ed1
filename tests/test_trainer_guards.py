"""The trainer's guard rails: a finished run relaunched, inputs checked before compute, an unreadable newest
checkpoint, skipped samples in the logs, and run.fit_to_max_minutes re-fitting both ways."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import threading
from pathlib import Path

import pytest
import webdataset as wds
from helpers import params, tiny_recipe
from PIL import Image

from pretrain.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from pretrain.trainer import RunInputError, Trainer


def test_relaunching_a_finished_run_trains_nothing_and_keeps_its_summary(digits_shards, tmp_path, caplog):
    out = tmp_path / "run"
    extra = ("run.max_steps=4", "run.visualize=false")
    first = Trainer(tiny_recipe(digits_shards, out, *extra)).fit()
    summary = (out / "train_summary.json").read_text()
    metrics = (out / "metrics.jsonl").read_text()
    weights = params(first.checkpoint)
    assert math.isfinite(json.loads(summary)["final_loss"])

    with caplog.at_level(logging.WARNING, logger="vitssl.trainer"):
        again = Trainer(tiny_recipe(digits_shards, out, *extra)).fit()
    said = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
    assert len(said) == 1 and "step 4 of 4; nothing to train" in said[0]
    assert (out / "train_summary.json").read_text() == summary, "the summary was rewritten"
    assert (out / "metrics.jsonl").read_text() == metrics
    assert again.steps == 4 and again.final_loss == pytest.approx(first.final_loss)
    assert [c.name for c in list_checkpoints(out)] == ["step_00000004"]
    for k, v in params(latest_checkpoint(out)).items():
        assert v.equal(weights[k])


def test_a_run_killed_after_its_last_checkpoint_finishes_its_outputs_on_relaunch(digits_shards, tmp_path):
    """Died between the final checkpoint and the summary: the relaunch writes the summary (with the last logged
    loss, a JSON number, not NaN) without training."""
    out = tmp_path / "run"
    Trainer(tiny_recipe(digits_shards, out, "run.max_steps=3", "run.visualize=false")).fit()
    (out / "train_summary.json").unlink()
    shutil.rmtree(out / "backbone")
    again = Trainer(tiny_recipe(digits_shards, out, "run.max_steps=3", "run.visualize=false")).fit()
    summary = json.loads((out / "train_summary.json").read_text())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert summary["final_loss"] == pytest.approx(last) and again.steps == 3
    assert (out / "backbone" / "model.safetensors").is_file()


@pytest.mark.parametrize("key", ["data.val", "data.train"])
def test_a_missing_shard_set_fails_before_any_compute(digits_shards, tmp_path, key):
    out = tmp_path / "run"
    with pytest.raises(RunInputError, match=rf"{key}='{tmp_path}/nowhere' cannot be read"):
        Trainer(tiny_recipe(digits_shards, out, f"{key}={tmp_path}/nowhere"))
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("val", ["null", "''"])
def test_val_is_optional(digits_shards, tmp_path, val):
    out = tmp_path / "run"
    result = Trainer(tiny_recipe(digits_shards, out, f"data.val={val}", "run.max_steps=2")).fit()
    assert result.steps == 2 and result.pictures  # the pictures come from data.train


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_unreadable_newest_checkpoint_is_kept_and_the_one_before_it_resumes(digits_shards, tmp_path, caplog):
    out = tmp_path / "run"
    common = ("run.checkpoint_every_steps=2", "run.visualize=false")
    Trainer(tiny_recipe(digits_shards, out, "run.max_steps=6", *common)).fit()
    bad = out / "checkpoints" / "step_00000006"
    _truncate(bad / "model.safetensors")

    with caplog.at_level(logging.WARNING, logger="vitssl.trainer"):
        result = Trainer(tiny_recipe(digits_shards, out, "run.max_steps=8", *common)).fit()
    assert f"checkpoint {bad} is unreadable" in caplog.text and "resuming from step_00000004" in caplog.text
    assert "resumed from" in caplog.text or result.steps == 8
    kept = out / "checkpoints" / "step_00000006.unreadable"
    assert kept.is_dir() and (kept / "model.safetensors").stat().st_size > 0, "the damaged checkpoint was not kept"
    assert result.steps == 8 and latest_checkpoint(out).name == "step_00000008"
    # The run went on from step 4 and wrote a new, readable step 6.
    assert params(out / "checkpoints" / "step_00000006")

    # Every checkpoint damaged: a clear error that says how to go on, and nothing deleted.
    for c in list_checkpoints(out):
        (c / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"(?s)no checkpoint in .* can be read .* run\.resume=never"):
        Trainer(tiny_recipe(digits_shards, out, "run.max_steps=10", *common)).fit()
    assert len(list((out / "checkpoints").glob("step_*.unreadable*"))) == 4


def test_checkpoints_can_be_listed_while_a_trainer_writes_and_prunes_them(tmp_path):
    """An evaluator polling a live run (or the resume test's killer) lists checkpoints the trainer is pruning: a
    checkpoint that vanishes mid-listing is simply not listed, never an error."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    stop = threading.Event()

    def churn() -> None:  # the trainer's pattern: write under a temporary name, rename, prune all but the newest
        step = 0
        while not stop.is_set():
            step += 1
            tmp, final = root / f".step_{step:08d}.tmp", root / f"step_{step:08d}"
            tmp.mkdir()
            (tmp / "trainer_state.json").write_text(json.dumps({"state": {"step": step, "samples_seen": step * 8}}))
            os.replace(tmp, final)
            if step > 1:
                shutil.rmtree(root / f"step_{step - 1:08d}")

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        seen = [list_checkpoints(tmp_path) for _ in range(2000)]
    finally:
        stop.set()
        writer.join()
    assert all(len(s) <= 2 for s in seen) and any(s for s in seen)
    assert all(s == sorted(s) for s in seen), [[p.name for p in s] for s in seen if s != sorted(s)][:3]


def _digits_with_bad_samples(folder: Path, bad: set[int], n: int = 120) -> None:
    """n digits in 4 shards of PNGs; the samples in `bad` have damaged image bytes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True)
    for s in range(4):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as w:
            for i in range(s * n // 4, (s + 1) * n // 4):
                buf = io.BytesIO()
                Image.fromarray((digits.images[i] * 15).astype("uint8"), "L").save(buf, format="PNG")
                png = buf.getvalue()
                if i in bad:
                    png = png[:40] + b"\0" * 30
                w.write({"__key__": f"{i:08d}", "png": png, "cls": str(int(digits.target[i]))})


def test_skipped_samples_are_counted_in_metrics_and_summary(tmp_path):
    shards = tmp_path / "shards"
    _digits_with_bad_samples(shards, bad={3, 50, 77})
    out = tmp_path / "run"
    result = Trainer(tiny_recipe(shards, out, "run.epochs=2", "data.batch_size=20", "data.max_bad_fraction=0.1",
                                 "run.visualize=false")).fit()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_epoch = {}
    for r in rows:
        per_epoch[r["epoch"]] = r["skipped_epoch"]
    assert per_epoch == {0: 3, 1: 3} and rows[-1]["skipped_total"] == 6
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["skipped_samples"] == 6 and summary["skipped_per_epoch"] == [3, 3]
    # samples_seen counts samples trained, not the pads standing in for the skipped ones.
    assert result.samples_seen == summary["samples_seen"] == 2 * (120 - 3)


def test_fit_to_max_minutes_refits_both_ways_within_the_recipe(digits_shards, tmp_path, caplog):
    """A slow first measurement shortens the schedule; when the slowdown goes away the next measurement lengthens
    it again, never past the recipe's own length. A warmup in updates is kept (at most a quarter of the fitted run);
    one in epochs follows in proportion."""
    t = Trainer(tiny_recipe(digits_shards, tmp_path / "run", "run.max_steps=1000", "optim.warmup_steps=100",
                            "run.max_minutes=10", "run.fit_to_max_minutes=true"))
    t.state.step, t.state.wall_seconds = 10, 18.0
    t._fit_schedule_to_time(steps_here=10, seconds_here=18.0)  # busy: 0.56 updates/s -> ~320 fit in 582 s
    short = t.total_steps
    assert 10 < short < 400 and t.warmup_steps == min(100, short // 4)
    t.state.step, t.state.wall_seconds = 40, 150.0
    t._fit_schedule_to_time(steps_here=30, seconds_here=10.0)  # quiet again: 3 updates/s -> ~1,300 would fit
    assert t.total_steps == 1000 and t.warmup_steps == 100
    assert (t.state.total_steps, t.state.warmup_steps) == (1000, 100)
    t.state.step, t.state.wall_seconds = 100, 300.0
    t._fit_schedule_to_time(steps_here=60, seconds_here=150.0)  # 0.4/s: 100 + 0.95 * 300 * 0.4 = 214
    assert t.total_steps == 214 and t.warmup_steps == 53
    t.recipe.optim.warmup_steps = 0  # as if the recipe's warmup had been given in epochs: it scales with the fit
    t.state.step, t.state.wall_seconds = 10, 18.0
    t._fit_schedule_to_time(steps_here=10, seconds_here=18.0)
    assert t.warmup_steps == round(100 * t.total_steps / 1000) < min(100, t.total_steps // 4)
