"""The one trainer: outputs, exact resume, non-finite handling, launch checks, SIGKILL resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, params, subprocess_env, tiny_overrides, tiny_recipe, torchrun_two_cpu

from pretrain.backbone import data_stats
from pretrain.checkpoint import latest_checkpoint, list_checkpoints
from pretrain.launch import LaunchError, check_world
from pretrain.restore import load_backbone_from
from pretrain.trainer import Trainer, TrainingDiverged, scaled_lr


def test_lr_scaling_rule():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(5e-4, 256) == pytest.approx(5e-4)


def test_mae_run_writes_everything(digits_shards, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(tiny_recipe(digits_shards, out, "run.epochs=3", "run.visualize=true", "optim.clip_grad=5.0",
                                  "objective.mae.mean=[0.25]", "objective.mae.std=[0.5]"))
    assert trainer.steps_per_epoch == 1797 // 32  # data.remainder=drop: full batches only
    result = trainer.fit()
    assert result.steps == 3 * trainer.steps_per_epoch and result.epochs_done == 3
    rows = [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl is not JSON"))
            for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == result.steps
    assert rows[-1]["loss"] < rows[0]["loss"], "three epochs of MAE should lower the loss"
    assert {"lr", "samples_per_s", "grad_norm"} <= set(rows[0])
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"step_{result.steps:08d}"
    for f in ("model.safetensors", "optimizer.pt", "trainer_state.json", "backbone_config.json", "rng_rank0.pt"):
        assert (ckpt / f).is_file(), f
    assert (out / "backbone" / "model.safetensors").is_file() and (out / "backbone" / "config.json").is_file()
    assert (out / "recipe.yaml").is_file() and (out / "train_summary.json").is_file()
    pngs = {p.name for p in result.pictures}
    assert any(n.startswith("mae_step") for n in pngs) and "loss_curve.png" in pngs
    for p in result.pictures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp")), "no temporary files may be left behind"
    # The training normalisation travels with the weights, in the checkpoint and in the export.
    for where in (ckpt, out / "backbone", out):
        assert data_stats(load_backbone_from(where)) == ((0.25,), (0.5,))


def test_lr_warmup_and_cosine_follow_the_recipe(digits_shards, tmp_path):
    out = tmp_path / "run"
    r = tiny_recipe(digits_shards, out, "run.max_steps=20", "optim.warmup_steps=5", "optim.min_lr=1e-5")
    t = Trainer(r)
    assert t.global_batch == 32 and t.lr == pytest.approx(1e-3 * 32 / 256)
    t.fit()
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(0.0)  # first update at step 0 of warmup
    assert lrs[4] == pytest.approx(t.lr * 4 / 5)
    assert max(lrs) == pytest.approx(t.lr, rel=1e-6)
    assert lrs[-1] < lrs[10] and lrs[-1] >= 1e-5


def test_fit_to_max_minutes_completes_the_schedule_within_the_budget(digits_shards, tmp_path, caplog):
    """2,000 planned updates (100 of warmup), 8 seconds: the rate measured early shortens the schedule (the warmup,
    given in updates, kept up to a quarter of it) so the cosine ends, lr at its floor, before the time cap would cut it off; a resume keeps the
    fitted length."""
    out = tmp_path / "run"
    extra = ("run.max_steps=2000", "run.max_minutes=0.133", "run.fit_to_max_minutes=true", "optim.warmup_steps=100",
             "optim.min_lr=1e-6", "run.log_every=1", "run.visualize=false")
    with caplog.at_level("WARNING", logger="vitssl.trainer"):
        result = Trainer(tiny_recipe(digits_shards, out, *extra)).fit()
    assert "the lr schedule now ends at update" in caplog.text
    assert result.stopped_early in ("", "max_minutes") and 5 < result.steps < 2000
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["state"]
    total, warmup = state["total_steps"], state["warmup_steps"]
    assert warmup == min(100, total // 4)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
    peak = 1e-3 * 32 / 256
    if result.stopped_early == "":
        # The last update used the fitted cosine's last value (timm's, at update total - 1), near the floor.
        assert total == result.steps and result.wall_seconds < 8
        expected = 1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup)))
        assert last == pytest.approx(expected, rel=1e-6)
    else:
        # The machine slowed down after the last re-fit (the suite shares the cores): the time cap fell within
        # the fitted schedule's last tenth, so the lr had already come down.
        assert result.steps >= 0.9 * total
    assert last < 0.1 * peak
    again = Trainer(tiny_recipe(digits_shards, out, *extra))
    again.resume()
    assert (again.total_steps, again.warmup_steps) == (state["total_steps"], state["warmup_steps"])


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_matches_straight_run(digits_shards, tmp_path, workers):
    """2x steps straight == x steps, a fresh process-state resume, x more steps (accumulation on, mid-epoch)."""
    common = ["run.max_steps=14", "optim.accum_steps=2", "data.batch_size=16", f"data.num_workers={workers}",
              "optim.warmup_steps=3", "optim.clip_grad=1.0", "run.checkpoint_every_steps=7", "run.visualize=false"]
    straight = tmp_path / "straight"
    Trainer(tiny_recipe(digits_shards, straight, *common)).fit()

    resumed = tmp_path / "resumed"
    Trainer(tiny_recipe(digits_shards, resumed, *common)).fit()
    # Forget everything after step 7, as if the run had died there.
    import shutil

    for c in list_checkpoints(resumed):
        if c.name != "step_00000007":
            shutil.rmtree(c)
    shutil.rmtree(resumed / "backbone")
    torch.manual_seed(12345)  # disturb the process RNG: the checkpoint must restore it
    t = Trainer(tiny_recipe(digits_shards, resumed, *common))
    result = t.fit()
    assert t.last_checkpoint.name == "step_00000014" and result.steps == 14

    a, b = params(latest_checkpoint(straight)), params(latest_checkpoint(resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs after resume")
    # The resumed run redid no logged step twice.
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 14


def _nan_after(module, steps_to_break: set[int] | None = None, from_call: int | None = None):
    original = module.forward
    calls = {"n": 0}

    def forward(batch):
        loss, metrics = original(batch)
        calls["n"] += 1
        if (steps_to_break and calls["n"] in steps_to_break) or (from_call is not None and calls["n"] >= from_call):
            loss = loss * float("nan")
        return loss, metrics

    module.forward = forward
    return calls


def test_nonfinite_loss_is_skipped_and_counted(digits_shards, tmp_path):
    t = Trainer(tiny_recipe(digits_shards, tmp_path / "run", "run.max_steps=10", "run.visualize=false"))
    before = {k: v.clone() for k, v in t.objective.state_dict().items()}
    _nan_after(t.objective, steps_to_break={3, 7})
    result = t.fit()
    assert result.nonfinite_skipped == 2
    assert result.steps == 10  # skipped updates are not counted as steps
    after = t.objective.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_streak_reloads_last_good_checkpoint_and_stops(digits_shards, tmp_path):
    out = tmp_path / "run"
    t = Trainer(tiny_recipe(digits_shards, out, "run.max_steps=30", "run.checkpoint_every_steps=4",
                            "run.nonfinite_patience=3", "run.visualize=false"))
    _nan_after(t.objective, from_call=7)
    with pytest.raises(TrainingDiverged, match=r"3 non-finite losses in a row at step 6.*reloaded.*step_00000004"):
        t.fit()
    good = params(out / "checkpoints" / "step_00000004")
    for k, v in t.objective.state_dict().items():
        torch.testing.assert_close(v, good[k])


def test_world_size_mismatch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="torchrun --standalone --nproc_per_node"):
        check_world(1)
    check_world(2)


@pytest.mark.multiprocess
def test_accelerate_cpu_num_processes_trap_is_refused(digits_shards, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: refuse instead of training alone."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pretrain", "-",
           *tiny_overrides(digits_shards, tmp_path / "run", "run.max_steps=2")]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    cmd[cmd.index("-")] = str(recipe)
    p = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode != 0
    assert "accelerate launch --multi_gpu --num_processes" in p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.multiprocess
def test_two_cpu_processes_train_in_sync(digits_shards, tmp_path):
    """torchrun, 2 processes, gloo: parameters stay identical and the ranks see different samples."""
    out = tmp_path / "run"
    out.mkdir()
    p = torchrun_two_cpu(ROOT / "tests" / "two_rank_train.py", str(out),
                         *tiny_overrides(digits_shards, out, "run.max_steps=6", "data.batch_size=16",
                                         "optim.accum_steps=2", "run.visualize=false"), timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["params"] == ranks[1]["params"], "DDP ranks diverged"
    seen = [set(r["seen"]) for r in ranks]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 6 * 2 * 16
    assert not seen[0] & seen[1], "the ranks trained on the same samples"
    # The lr follows the true global batch: 2 processes x 16 x 2 accumulation.
    assert ranks[0]["global_batch"] == 64 and ranks[0]["lr"] == pytest.approx(1e-3 * 64 / 256)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step_00000006"
