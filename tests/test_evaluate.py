"""Online k-NN during pretraining and the collapse alarms (pretrain.evaluate).

The online number is checked against independent instruments on the same features: downstream's offline k-NN of
the same checkpoint on the same split (exact top-1 equality) and a brute-force torch vote. The alarms are checked
on trajectories measured on this project's machine (a healthy Fashion-MNIST DINO run, the collapsed 64-px run of
the issue) and end to end: a deliberately collapsing tiny DINO fires and, with the switch, stops with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_VIT, params, tiny_overrides, tiny_recipe, torchrun_two_cpu

from downstream.features import extract_features
from downstream.probe import knn_classify
from pretrain.alarms import CollapseAlarms
from pretrain.checkpoint import latest_checkpoint, list_checkpoints
from pretrain.evaluate import OnlineEvaluator, draw_split, key_rank
from pretrain.knn import knn_scores, knn_top1
from pretrain.recipe import AlarmConfig, EvalConfig, RecipeError, load_recipe
from pretrain.restore import load_backbone_from
from pretrain.trainer import Trainer
from shards.sources import digits_source
from shards.tar import iter_tar_samples, list_shards, open_shard
from shards.writer import write_shard_set

# ------------------------------------------------------------------------------------------------ k-NN


def _brute_force_top1(bank, bank_y, query, query_y, k=20, t=0.07) -> float:
    sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(len(query), int(bank_y.max()) + 1).scatter_add_(1, bank_y[idx], (top / t).exp())
    return float((votes.argmax(1) == query_y).float().mean())


def test_online_knn_is_dinos_weighted_vote_as_downstream_and_brute_force_compute_it():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g)
    bank_y, query_y = torch.randint(0, 5, (400,), generator=g), torch.randint(0, 5, (150,), generator=g)
    bank = centres[bank_y] + 1.5 * torch.randn(400, 16, generator=g)
    query = centres[query_y] + 1.5 * torch.randn(150, 16, generator=g)
    ours = knn_top1(bank, bank_y, query, query_y)
    assert 0.3 < ours < 1.0
    assert ours == knn_classify(bank, bank_y, query, query_y, num_classes=5).top1
    assert ours == pytest.approx(_brute_force_top1(bank, bank_y, query, query_y), abs=1 / 150)
    torch.testing.assert_close(knn_scores(bank, bank_y, query, num_classes=5, k=7, temperature=0.1),
                               _brute_votes(bank, bank_y, query, 5, 7, 0.1), rtol=1e-4, atol=1e-4)


def _brute_votes(bank, bank_y, query, c, k, t):
    sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top, idx = sims.topk(k, dim=1)
    return torch.zeros(len(query), c).scatter_add_(1, bank_y[idx], (top / t).exp())


# ------------------------------------------------------------------------------------------------ the split


def _keys(folder: Path) -> list[str]:
    keys = []
    for url, _ in list_shards(folder):
        with open_shard(url) as f:
            keys += [k for k, _ in iter_tar_samples(f)]
    return keys


def test_split_takes_the_smallest_key_hashes_labelled_only_and_is_reused(digits_shards, tmp_path):
    split = draw_split(str(digits_shards), 100, 300, tmp_path / "a")
    assert (split.num_query, split.num_bank, split.num_classes, split.labelled) == (100, 300, 10, 1797)
    query, bank = _keys(split.query), _keys(split.bank)
    assert len(query) == 100 and len(bank) == 300 and not set(query) & set(bank)
    ranked = sorted((f"{i:08d}" for i in range(1797)), key=key_rank)
    assert set(query) == set(ranked[:100]) and set(bank) == set(ranked[100:400])
    assert query == sorted(query), "kept in the source's order"
    # The rule depends on the keys alone (any run on this data draws the same split); a second draw into the same
    # folder reuses it.
    stamp = (split.query / "shard-000000.tar").stat().st_mtime_ns
    draw_split(str(digits_shards), 100, 300, tmp_path / "a")
    assert (split.query / "shard-000000.tar").stat().st_mtime_ns == stamp
    # Smaller than holdout + bank: both shrink in proportion.
    small = draw_split(str(digits_shards), 1000, 5000, tmp_path / "c")
    assert (small.num_query, small.num_bank) == (300, 1497)


def _unlabelled(tmp_path: Path, n: int = 96) -> Path:
    source = digits_source()
    out = tmp_path / "unlabelled"
    write_shard_set((dataclasses.replace(s, label=None) for s in itertools.islice(source, n)), out, classes=[],
                    source="digits, labels dropped", samples_per_shard=48)
    return out


def test_unlabelled_data_turns_the_online_knn_off_with_one_log_line(tmp_path, caplog):
    shards = _unlabelled(tmp_path)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="vitssl.evaluate"):
        result = Trainer(tiny_recipe(shards, out, "run.max_steps=2", "run.visualize=false", "data.batch_size=16",
                                     "eval.every_steps=1")).fit()
    said = [r.getMessage() for r in caplog.records if r.name == "vitssl.evaluate"]
    assert len(said) == 1 and "online k-NN off" in said[0] and "unlabelled" in said[0], said
    assert result.steps == 2 and result.online_knn == {}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("knn") for r in rows for k in r)


# ------------------------------------------------------------------------------------------------ in the trainer


def test_online_knn_equals_the_offline_knn_of_the_same_checkpoint_and_changes_nothing(digits_shards, tmp_path):
    """A tiny MAE run evaluating every 2 updates: each logged top-1 equals downstream's offline k-NN (features by
    downstream.features, vote by downstream.probe) of that step's checkpoint on the split the run drew, exactly.
    The evaluations (eval mode, no grad, RNG saved and restored) leave the weights bit for bit as a run without
    them (masks, drop path and the stream draw the same numbers). The healthy run raises no alarm; the summary and
    the curve carry the numbers."""
    out, plain = tmp_path / "run", tmp_path / "plain"
    common = ("run.max_steps=4", "run.checkpoint_every_steps=2", "model.drop_path_rate=0.1", "eval.holdout=100",
              "eval.bank_samples=300", "eval.batch_size=128")
    result = Trainer(tiny_recipe(digits_shards, out, *common, "eval.every_steps=2", "run.visualize=true")).fit()
    Trainer(tiny_recipe(digits_shards, plain, *common, "eval.enabled=false", "run.visualize=false")).fit()
    a, b = params(latest_checkpoint(out)), params(latest_checkpoint(plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "evaluating changed the training"
    assert not (plain / "eval_split").exists()

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    online = {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r}
    assert sorted(online) == [2, 4]
    first = next(r for r in rows if "knn_top1" in r)
    assert "knn_top1_init" in first, "the first evaluation scores the starting weights too"
    assert all(r["eval_seconds"] > 0 for r in rows if "knn_top1" in r)
    for step, top1 in online.items():
        backbone = load_backbone_from(out / "checkpoints" / f"step_{step:08d}")
        query = extract_features(backbone, out / "eval_split" / "query", batch_size=128, require_labels=True)
        bank = extract_features(backbone, out / "eval_split" / "bank", batch_size=128, require_labels=True)
        assert (len(query), len(bank)) == (100, 300)
        assert top1 == knn_classify(bank.feats, bank.labels, query.feats, query.labels).top1, f"step {step}"
    s = json.loads((out / "train_summary.json").read_text())
    assert s["online_knn"]["best"] == max(online.values()) and s["online_knn"]["last"] == online[4]
    assert s["online_knn"]["last_step"] == 4 and s["online_knn"]["init"] == first["knn_top1_init"]
    assert s["online_knn"]["best_step"] in (2, 4) and s["online_knn"]["evaluations"] == 3
    assert s["collapse_alarms"] == [] and s["stopped_early"] == ""
    curve = out / "pictures" / "knn_curve.png"
    assert curve in result.pictures and curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_run_evaluates_as_the_uninterrupted_one(digits_shards, tmp_path):
    """4 updates evaluated every 2, straight vs stopped after update 3 and relaunched: the same weights, the same
    k-NN at steps 2 and 4 (each logged once), the split reused, the baseline from the first launch kept."""
    common = ("run.max_steps=4", "run.checkpoint_every_steps=3", "eval.every_steps=2", "eval.holdout=64",
              "eval.bank_samples=128", "run.visualize=false")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Trainer(tiny_recipe(digits_shards, straight, *common)).fit()
    Trainer(tiny_recipe(digits_shards, resumed, *common)).fit()
    for c in list_checkpoints(resumed):  # as if killed after the checkpoint of update 3
        if c.name != "step_00000003":
            shutil.rmtree(c)
    shutil.rmtree(resumed / "backbone")
    split = (resumed / "eval_split" / "split.json").stat().st_mtime_ns
    result = Trainer(tiny_recipe(digits_shards, resumed, *common)).fit()
    assert result.steps == 4 and (resumed / "eval_split" / "split.json").stat().st_mtime_ns == split
    a, b = params(latest_checkpoint(straight)), params(latest_checkpoint(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def evaluations(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["knn_top1"], r.get("knn_top1_init")) for r in rows if "knn_top1" in r]

    assert evaluations(resumed) == evaluations(straight) and [e[0] for e in evaluations(straight)] == [2, 4]
    assert result.online_knn["init"] == evaluations(straight)[0][2]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_embed_their_slices_and_score_what_one_process_would(digits_shards, tmp_path):
    """torchrun, 2 CPU processes: each embeds its padded slice of query and bank, the gather drops the pads, and the
    top-1 logged equals the offline k-NN of the same checkpoint (103 query / 309 bank samples: odd, so a pad)."""
    out = tmp_path / "run"
    out.mkdir()
    p = torchrun_two_cpu(ROOT / "tests" / "two_rank_train.py", str(out), *tiny_overrides(
        digits_shards, out, "run.max_steps=4", "data.batch_size=16", "eval.every_steps=2", "eval.holdout=103",
        "eval.bank_samples=309", "eval.batch_size=32", "run.checkpoint_every_steps=2", "run.visualize=false"),
        timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    online = {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r}
    assert sorted(online) == [2, 4]
    for step, top1 in online.items():
        backbone = load_backbone_from(out / "checkpoints" / f"step_{step:08d}")
        query = extract_features(backbone, out / "eval_split" / "query", batch_size=32)
        bank = extract_features(backbone, out / "eval_split" / "bank", batch_size=32)
        offline = knn_classify(bank.feats, bank.labels, query.feats, query.labels).top1
        # Two processes batch differently (16 + pads per rank): the same features up to float rounding.
        assert abs(top1 - offline) <= 1 / 103, (step, top1, offline)


def test_evaluation_schedule_by_steps_and_by_minutes_within_its_time_share(digits_shards, tmp_path):
    off = OnlineEvaluator(EvalConfig(enabled=False, every_steps=5), train_source=str(digits_shards), out_dir=tmp_path)
    assert not off.due(5) and not off.end_due(5)
    ev = OnlineEvaluator(EvalConfig(every_steps=5, every_minutes=0), train_source=str(digits_shards),
                         out_dir=tmp_path)
    assert [s for s in range(1, 16) if ev.due(s)] == [5, 10, 15]
    assert not ev.end_due(16), "a launch that never evaluated is not evaluated at its end either"
    ev.count, ev.last_step = 1, 15
    assert ev.end_due(16) and not ev.end_due(15)
    ev.cfg = EvalConfig(every_steps=0, every_minutes=1.0, max_fraction=0.05)
    t0 = ev._last_end = 1000.0
    assert not ev.due(1, t0 + 59) and ev.due(1, t0 + 60)
    ev._last_cost = 10.0  # a 10-s evaluation: the next one waits 10 / 0.05 = 200 s, not 60
    assert not ev.due(2, t0 + 60) and not ev.due(2, t0 + 199) and ev.due(2, t0 + 200)


# ------------------------------------------------------------------------------------------------ alarms

# A healthy run, measured: recipes/dino_vit_tiny_fmnist.yaml on Fashion-MNIST (out_dim 2048: ln K = 7.625; warmup 117
# updates), 2026-12-01, its metrics.jsonl rows (step, loss, teacher_entropy, embed_rank) through update 500. After the
# warmup the loss climbs for ~150 updates (5.73 -> 7.04, 92% of ln K) while the rank grows back (14 -> 17) and the
# online k-NN rises (0.648 at 94, 0.668 at 240, 0.682 at 372), then falls: no collapse, and no alarm may say so.
HEALTHY_FMNIST = [
    (20, 7.028, 6.169, 23.16), (40, 6.735, 5.57, 20.15), (60, 6.002, 5.269, 18.13), (80, 5.784, 5.252, 16.01),
    (94, 5.728, 5.194, 14.32), (100, 5.843, 5.432, 14.72), (120, 6.104, 5.867, 14.45), (140, 6.57, 6.374, 13.95),
    (160, 6.85, 6.603, 14.65), (180, 6.972, 6.649, 14.58), (200, 6.98, 6.698, 15.73), (220, 7.017, 6.703, 16.37),
    (240, 7.032, 6.742, 16.82), (260, 7.032, 6.642, 16.98), (280, 7.044, 6.606, 17.91), (300, 7.031, 6.628, 19.34),
    (320, 6.993, 6.563, 20.75), (340, 6.974, 6.65, 21.46), (360, 6.958, 6.501, 21.63), (372, 6.928, 6.441, 22.85),
    (380, 6.909, 6.479, 22.41), (400, 6.895, 6.417, 24.34), (420, 6.865, 6.414, 23.09), (440, 6.808, 6.285, 24.05),
    (460, 6.787, 6.308, 25.33), (480, 6.689, 6.197, 25.51), (500, 6.723, 6.213, 25.75),
]
HEALTHY_FMNIST_KNN = {94: (0.6475, 25.16), 240: (0.6675, 26.46), 372: (0.682, 31.23)}  # knn_top1, feat_rank
LN_2048 = math.log(2048)


def _rows(points, ceiling=LN_2048, evaluations=None):
    rows = [{"step": s, "loss": loss, "teacher_entropy": h, "embed_rank": r, "loss_ceiling": ceiling,
             "teacher_entropy_ceiling": ceiling} for s, loss, h, r in points]
    for row in rows:
        if row["step"] in (evaluations or {}):
            row["knn_top1"], row["feat_rank"] = evaluations[row["step"]]
    return rows


def _collapse_of_the_issue(n: int = 19, every: int = 10):
    """The 64-px, 9-class, 3-channel run of the issue: 190 updates, loss 6.73 -> 7.28, teacher entropy
    6.0 -> 6.8, effective rank 24 -> 13, with batch noise (logged every 10 updates)."""
    g = torch.Generator().manual_seed(1)
    noise = (0.05 * torch.randn(n, 3, generator=g)).tolist()
    return [(every * (i + 1), 6.73 + 0.55 * i / (n - 1) + noise[i][0], 6.0 + 0.8 * i / (n - 1) + noise[i][1],
             24 - 11 * i / (n - 1) + 10 * noise[i][2]) for i in range(n)]


def test_alarm_fires_on_the_issues_collapse_and_not_on_a_healthy_run(caplog):
    quiet = CollapseAlarms(AlarmConfig(), after_steps=117)  # alarm.after_steps=-1: the recipe's warmup
    assert [f for row in _rows(HEALTHY_FMNIST, evaluations=HEALTHY_FMNIST_KNN) for f in quiet.observe(row)] == []
    # Read the loss alone (alarm.rank_fall=0), the climb after the warmup would have been called a collapse.
    loss_alone = CollapseAlarms(AlarmConfig(rank_fall=0), after_steps=117)
    assert {f.signal for row in _rows(HEALTHY_FMNIST) for f in loss_alone.observe(row)} == {"loss_rising"}

    alarms = CollapseAlarms(AlarmConfig(), after_steps=4)
    with caplog.at_level(logging.WARNING, logger="vitssl.evaluate"):
        fired = [f for row in _rows(_collapse_of_the_issue()) for f in alarms.observe(row)]
    first = fired[0]
    assert first.signal == "loss_rising" and first.step <= 100, fired
    text = caplog.records[0].getMessage()
    assert "COLLAPSE ALARM at step" in text and "teacher temperature" in text and "center_momentum" in text
    assert "alarm.stop_on_collapse=true" in text and "ceiling ln out_dim = 7.625" in text


def test_each_signal_and_its_threshold():
    cfg = AlarmConfig(warn_every=1)

    def signals(rows, **kw):
        a = CollapseAlarms(dataclasses.replace(cfg, **kw), after_steps=0)
        return {f.signal for row in rows for f in a.observe(row)}

    flat = [(s, 5.0, 5.0, 20.0) for s in range(10, 100, 10)]
    assert signals(_rows(flat)) == set()
    assert signals(_rows([(s, 7.5, 7.4, 20.0) for s in range(10, 60, 10)])) == {
        "loss_near_ceiling", "teacher_entropy_near_ceiling"}
    assert signals(_rows([(s, 0.05, 0.01, 20.0) for s in range(10, 60, 10)])) == {
        "loss_near_zero", "teacher_entropy_near_zero"}
    assert signals(_rows([(s, 5.0, 5.0, 20.0 if s < 50 else 9.0) for s in range(10, 100, 10)])) == {
        "embed_rank_falling"}
    # A rising loss counts while the effective rank falls over the same rows (or, with rank_fall=0, alone).
    rising = _rows([(s, 5.0 + s / 100, 5.0, 20.0 - s / 20) for s in range(10, 100, 10)])
    assert signals(rising) == {"loss_rising"} and signals(rising, loss_rise=0) == set()
    steady_rank = _rows([(s, 5.0 + s / 100, 5.0, 20.0) for s in range(10, 100, 10)])
    assert signals(steady_rank) == set() and signals(steady_rank, rank_fall=0) == {"loss_rising"}
    knn = [{"step": 0, "knn_top1": 0.9}, {"step": 50, "knn_top1": 0.7}, {"step": 100, "knn_top1": 0.8},
           {"step": 150, "knn_top1": 0.75}, {"step": 200, "knn_top1": 0.7}]
    a = CollapseAlarms(cfg, after_steps=0)
    fired = [(f.signal, f.step) for row in knn for f in a.observe(row)]
    assert fired == [("knn_top1_falling", 200)], "the step-0 baseline is no best; 0.7 < 0.9 x 0.8"
    # Objectives without ceilings (MAE, CLIP) feed only the falling signals; before after_steps nothing fires.
    assert signals([{"step": s, "loss": 1.0 + s} for s in range(10, 100, 10)]) == set()
    late = CollapseAlarms(cfg, after_steps=1000)
    assert [f for row in _rows([(s, 7.5, 7.4, 20.0) for s in range(10, 60, 10)]) for f in late.observe(row)] == []


def test_one_warning_per_signal_per_interval_and_replay_is_quiet(caplog):
    rows = _rows([(s, 7.5, 5.0, 20.0) for s in range(10, 400, 10)])
    a = CollapseAlarms(AlarmConfig(warn_every=100), after_steps=0)
    with caplog.at_level(logging.WARNING, logger="vitssl.evaluate"):
        steps = [f.step for row in rows for f in a.observe(row)]
    assert steps == [10, 110, 210, 310] and len(caplog.records) == 4
    caplog.clear()
    b = CollapseAlarms(AlarmConfig(warn_every=100), after_steps=0)
    with caplog.at_level(logging.WARNING, logger="vitssl.evaluate"):
        b.replay(rows[:20])
        later = [f.step for row in rows[20:] for f in b.observe(row)]
    assert [f.step for f in b.fired] == [10, 110, 210, 310] and later == [210, 310]
    assert len(caplog.records) == 2, "what fired before a resume is not warned about again"


# ------------------------------------------------------------------------------------------------ end to end: DINO

TINY_DINO = [
    "objective.name=dino",
    "model.img_size=16",
    *TINY_VIT,
    "objective.dino.out_dim=64",
    "objective.dino.hidden_dim=64",
    "objective.dino.bottleneck_dim=32",
    "objective.dino.local_crops_number=2",
    "objective.dino.local_crop_size=8",
    "data.batch_size=16",
    "data.num_workers=0",
    "run.progress=false",
    "run.trackers=[jsonl]",
    "run.log_every=1",
    "run.visualize=false",
    "objective.dino.blur_prob=[0,0,0]",
    "eval.enabled=false",
]


def test_a_collapsing_dino_run_fires_within_a_few_steps_and_stops_with_a_checkpoint(digits_shards, tmp_path):
    """The issue's collapse, on purpose: an lr ~100x too high (base_lr 1.0: 0.0625 at batch 16) makes the loss
    climb towards ln(64) while the effective rank falls. `loss_rising` fires as soon as its window holds 8 rows
    after the 5-update warmup (update 12); with alarm.stop_on_collapse the run checkpoints at the next update and
    ends with stopped_early="collapse"."""
    out = tmp_path / "run"
    result = Trainer(load_recipe(None, [
        *TINY_DINO, f"data.train={digits_shards}", f"run.out_dir={out}", "run.max_steps=40", "optim.base_lr=1.0",
        "optim.warmup_steps=5", "objective.dino.warmup_teacher_temp_epochs=0", "objective.dino.freeze_last_layer=0",
        "alarm.stop_on_collapse=true",
    ])).fit()
    first = result.collapse_alarms[0]
    assert first["signal"] == "loss_rising" and first["step"] <= 16, result.collapse_alarms
    assert "while the effective rank fell" in first["text"]
    assert result.stopped_early == "collapse" and result.steps == first["step"] + 1, "stops at the next update"
    assert [c.name for c in list_checkpoints(out)][-1] == f"step_{result.steps:08d}"
    assert result.checkpoint == latest_checkpoint(out)
    s = json.loads((out / "train_summary.json").read_text())
    assert s["stopped_early"] == "collapse" and s["collapse_alarms"] == result.collapse_alarms
    assert (out / "backbone" / "model.safetensors").is_file()


def test_without_the_switch_an_alarm_warns_and_the_run_goes_on(digits_shards, tmp_path, caplog):
    """A teacher far too soft (temperature 1.0, 25x the paper's 0.04) gives near-uniform targets from the start:
    the teacher entropy sits at its ceiling ln(64) at the first rows read; the run warns once and trains on."""
    with caplog.at_level(logging.WARNING, logger="vitssl.evaluate"):
        result = Trainer(load_recipe(None, [
            *TINY_DINO, f"data.train={digits_shards}", f"run.out_dir={tmp_path / 'run'}", "run.max_steps=5",
            "objective.dino.teacher_temp=1.0", "objective.dino.warmup_teacher_temp=1.0",
            "objective.dino.warmup_teacher_temp_epochs=0", "optim.warmup_steps=2",
        ])).fit()
    assert result.stopped_early == "" and result.steps == 5
    first_step = result.collapse_alarms[0]["step"]
    at_first = {a["signal"] for a in result.collapse_alarms if a["step"] == first_step}
    assert first_step == 2 and "teacher_entropy_near_ceiling" in at_first, result.collapse_alarms
    said = [r.getMessage() for r in caplog.records if "COLLAPSE ALARM" in r.getMessage()]
    assert len(said) == 1 and "alarm.stop_on_collapse=true to stop" in said[0]


# ------------------------------------------------------------------------------------------------ recipe


@pytest.mark.parametrize(("override", "message"), [
    ("eval.k=0", "eval.k=0: must be >= 1"),
    ("eval.pooling=max", "eval.pooling='max': must be one of ['cls', 'mean']"),
    ("eval.max_fraction=1", "eval.max_fraction=1: must be in [0, 1)"),
    ("alarm.knn_drop=1.5", "alarm.knn_drop=1.5: must be in [0, 1)"),
    ("alarm.after_steps=-2", "alarm.after_steps=-2: must be >= -1 (-1 = once the lr warmup is over)"),
    ("eval.every_step=3", "unknown recipe key 'eval.every_step' in section 'eval'"),
])
def test_eval_and_alarm_keys_are_checked_by_their_full_name(override, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_recipe(None, [override])


def test_defaults():
    r = load_recipe(None, [])
    assert (r.eval.enabled, r.eval.shards, r.eval.holdout, r.eval.bank_samples) == (True, "", 1000, 5000)
    assert (r.eval.every_steps, r.eval.every_minutes, r.eval.max_fraction) == (0, 5.0, 0.05)
    assert (r.eval.k, r.eval.temperature, r.eval.pooling) == (20, 0.07, "cls")
    assert (r.alarm.enabled, r.alarm.stop_on_collapse, r.alarm.after_steps) == (True, False, -1)
