"""FSDP (run.fsdp) and checkpoints that move between process counts.

Accelerate runs FSDP only on GPUs; on CPU the two-process tests lift exactly that gate (tests/fsdp_two_rank.py)
so that Accelerate's FSDP2 preparation, the trainer and the checkpoints run for real over gloo. What only a GPU
run shows: NCCL collectives, bf16 mixed-precision policies under FSDP, and the memory saved.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_VIT, params, tiny_overrides, torchrun_two_cpu
from safetensors.torch import load_file

from pretrain.checkpoint import TrainerState, latest_checkpoint, list_checkpoints, read_trainer_state
from pretrain.launch import fsdp_plugin, fsdp_units
from pretrain.objectives import build_objective
from pretrain.position import Launch, launch_of, translate
from pretrain.recipe import RecipeError, load_recipe
from pretrain.trainer import Trainer

SCRIPT = ROOT / "tests" / "fsdp_two_rank.py"
DINO = [
    "objective.name=dino",
    "objective.dino.out_dim=64",
    "objective.dino.hidden_dim=64",
    "objective.dino.bottleneck_dim=32",
    "objective.dino.local_crops_number=2",
    "objective.dino.local_crop_size=8",
]


# ---- position across launches (pure arithmetic) ---------------------------------------------------------------


def test_same_global_batch_keeps_the_step_and_the_share_of_the_epoch():
    state = TrainerState(step=130, epoch=2, batches_done=20, samples_seen=130 * 64)
    old, new = Launch(2, 16, 2), Launch(4, 16, 1)  # both a global batch of 64
    got = translate(state, old, new, steps_per_epoch=28)
    # 20 micro-batches x 16 x 2 ranks = 640 samples = 10 updates of 64 -> 10 micro-batches per rank now
    assert (got.step, got.epoch, got.batches_done, got.samples_seen) == (130, 2, 10, 130 * 64)
    assert translate(state, old, old, 28) is state


def test_another_global_batch_rescales_the_step_in_samples_and_rounds_down_to_an_update():
    state = TrainerState(step=100, epoch=1, batches_done=13, samples_seen=3200, total_steps=300, warmup_steps=30)
    got = translate(state, Launch(2, 16, 1), Launch(1, 48, 1), steps_per_epoch=37)  # 32 -> 48
    assert got.step == 100 * 32 // 48 == 66
    assert (got.total_steps, got.warmup_steps) == (200, 20)  # a schedule fitted to run.max_minutes, in samples
    assert got.batches_done == (13 * 16 * 2) // 48 == 8  # 416 samples done: 8 whole updates (384), none skipped
    assert (got.epoch, got.samples_seen) == (1, 3200)


def test_a_position_past_the_new_epoch_end_starts_the_next_epoch():
    got = translate(TrainerState(step=9, epoch=0, batches_done=9), Launch(1, 32, 1), Launch(2, 16, 1), 8)
    assert (got.epoch, got.batches_done, got.step) == (1, 0, 9)


def test_launch_of_reads_new_and_old_checkpoint_metadata():
    assert launch_of({"launch": {"world_size": 8, "batch_size": 64, "accum_steps": 2}}) == Launch(8, 64, 2)
    old = {"world_size": 2, "recipe": {"data": {"batch_size": 32}, "optim": {"accum_steps": 4}}}
    assert launch_of(old) == Launch(2, 32, 4) and launch_of({}) is None
    assert Launch(2, 32, 4).global_batch == 256


# ---- the FSDP switch ------------------------------------------------------------------------------------------


def test_fsdp_plugin_is_full_shard_fsdp2_with_whole_state_dicts():
    p = fsdp_plugin()
    assert p.fsdp_version == 2 and p.reshard_after_forward is True
    assert p.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy" and not p.activation_checkpointing
    assert "FULL_STATE_DICT" in str(p.state_dict_type)


CLIP = ["objective.name=clip", "objective.clip.embed_dim=32", "objective.clip.text_width=32",
        "objective.clip.text_heads=2", "objective.clip.text_layers=1", "objective.clip.text_context_length=16"]


@pytest.mark.parametrize(("extra", "units"), [([], ["Block"]), (DINO, ["Block"]),
                                              (CLIP, ["Block", "ResidualAttentionBlock"])], ids=["mae", "dino", "clip"])
def test_fsdp_units_are_the_transformer_blocks(extra, units):
    obj = build_objective(load_recipe(None, ["model.img_size=16", *TINY_VIT, *extra]))
    assert fsdp_units(obj) == units  # timm's ViT blocks (MAE's decoder too); CLIP's text tower blocks
    with pytest.raises(Exception, match="no transformer blocks"):
        fsdp_units(torch.nn.Linear(2, 2))


def test_fsdp_with_compile_is_refused_in_the_recipe():
    with pytest.raises(RecipeError, match="run.fsdp=true with run.compile=true"):
        load_recipe(None, ["run.fsdp=true", "run.compile=true"])


def test_fsdp_in_one_process_trains_unsharded_with_a_warning(digits_shards, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vitssl.launch"):
        t = Trainer(load_recipe(None, tiny_overrides(digits_shards, tmp_path / "run", "run.fsdp=true",
                                                     "run.max_steps=1", "run.visualize=false")))
    assert "nothing to shard" in caplog.text and not t.sharded
    assert t.fit().steps == 1


@pytest.mark.multiprocess
def test_fsdp_on_cpu_processes_is_refused_not_silently_ddp(digits_shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    p = torchrun_two_cpu(SCRIPT, str(out), *tiny_overrides(digits_shards, out, "run.fsdp=true", "run.max_steps=1"),
                         timeout=180)
    assert p.returncode != 0
    assert "run.fsdp=true needs GPU processes" in p.stderr and "Use run.fsdp=false" in p.stderr
    assert not (out / "checkpoints").exists()


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


# Both in the slow tier (~45 s each on 2 cores; DINO's teacher EMA on shards is the harder case): make test keeps
# the FSDP plugin, unit and refusal tests.
@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mae", "dino"])
@pytest.mark.multiprocess
def test_checkpoints_move_between_one_process_two_sharded_and_back(objective, digits_shards, tmp_path):
    """1 process -> 2 FSDP processes (same global batch) -> 1 process with a doubled global batch.

    The sharded leg must match a plain DDP leg from the same checkpoint (same data, same masks: FSDP's
    reduce-scatter and DDP's all-reduce average the same gradients), its gathered checkpoint must hold whole
    tensors that load unsharded, and the last leg must translate the position and order checkpoints by progress."""
    extra = [*(DINO if objective == "dino" else []), "run.visualize=false", "run.checkpoint_every_steps=4",
             "optim.clip_grad=1.0"]
    base = tmp_path / "base"
    Trainer(load_recipe(None, tiny_overrides(digits_shards, base, "run.max_steps=4", *extra))).fit()  # batch 32
    legs = {}
    for leg in ("fsdp", "ddp"):
        out = tmp_path / leg
        shutil.copytree(base, out)
        args = tiny_overrides(digits_shards, out, "run.max_steps=8", "data.batch_size=16", *extra,
                              f"run.fsdp={leg == 'fsdp'}")
        p = torchrun_two_cpu(SCRIPT, *(["--lift-gpu-gate"] if leg == "fsdp" else []), str(out), *args, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
        log = p.stdout + p.stderr
        assert f"resumed from {out / 'checkpoints' / 'step_00000004'}: step 4" in log
        assert ("written by 1 process(es) x 32 x 1 accumulation = global batch 32; this launch is 2 process(es) x 16 x 1"
                " accumulation = global batch 32: step 4 -> 4, epoch 0 batch 4 -> epoch 0 batch 4") in log
        legs[leg] = [json.loads((out / f"fsdp_rank{r}.json").read_text()) for r in (0, 1)]

    fsdp, ddp = legs["fsdp"], legs["ddp"]
    assert fsdp[0]["sharded"] and not ddp[0]["sharded"]
    blocks = [u for u in fsdp[0]["units"] if ".blocks." in u or u.startswith("blocks.")]
    assert len(blocks) >= 2 and "" in fsdp[0]["units"], fsdp[0]["units"]  # every block a unit, plus the root
    for name, (local, full) in fsdp[0]["shards"].items():
        if full[0] >= 2:
            assert local[0] == full[0] // 2, f"{name}: rank 0 holds {local} of {full}"
    assert fsdp[0]["optimizer_dtensors"] == fsdp[0]["optimizer_params"] > 0, "the optimizer steps the shards"
    assert ddp[0]["shards"] == {}

    a, b = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert sorted(b) == list(range(1, 9)) and [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]
    torch.testing.assert_close(torch.tensor([b[s] for s in range(5, 9)]), torch.tensor([a[s] for s in range(5, 9)]),
                               rtol=1e-5, atol=1e-6)
    ckpt_f, ckpt_d = tmp_path / "fsdp/checkpoints/step_00000008", tmp_path / "ddp/checkpoints/step_00000008"
    pf, pd = params(ckpt_f), params(ckpt_d)
    assert pf.keys() == pd.keys()
    for k in pf:  # whole tensors, named as in the unsharded model
        assert pf[k].shape == pd[k].shape, k
        torch.testing.assert_close(pf[k], pd[k], rtol=1e-4, atol=1e-5)
    of = torch.load(ckpt_f / "optimizer.pt", weights_only=True)
    od = torch.load(ckpt_d / "optimizer.pt", weights_only=True)
    assert of["state"].keys() == od["state"].keys() and all(isinstance(k, str) for k in of["state"])
    for k in of["state"]:
        torch.testing.assert_close(of["state"][k]["exp_avg_sq"], od["state"][k]["exp_avg_sq"], rtol=1e-3, atol=1e-9)
    state, meta = read_trainer_state(ckpt_f)
    assert meta["sharded"] and meta["launch"] == {"world_size": 2, "batch_size": 16, "accum_steps": 1}
    # The export (DINO's is the teacher, `backbone.`) comes from the gathered weights, not from one rank's shards.
    exported = load_file(str(tmp_path / "fsdp/backbone/model.safetensors"))
    torch.testing.assert_close(exported["blocks.0.attn.qkv.weight"], pf["backbone.blocks.0.attn.qkv.weight"])

    # 2 sharded processes -> 1 process, global batch 32 -> 64: step 8 -> 4, same share of the epoch.
    out = tmp_path / "fsdp"
    t = Trainer(load_recipe(None, tiny_overrides(digits_shards, out, "run.max_steps=6", "data.batch_size=64", *extra)))
    t.resume()
    assert (t.state.step, t.state.epoch, t.state.batches_done, t.state.samples_seen) == (4, 0, 4, state.samples_seen)
    weights = t.unwrapped_objective.state_dict()
    for k in pf:
        torch.testing.assert_close(weights[k], pf[k])
    name = ("student_" if objective == "dino" else "") + "backbone.blocks.0.attn.qkv.weight"  # a trained parameter
    param = dict(t.unwrapped_objective.named_parameters())[name]
    torch.testing.assert_close(t.optimizer.state[param]["exp_avg"], of["state"][name]["exp_avg"])
    # Run on to step 8 in the new units, with no periodic checkpoint: the step number of the checkpoint it resumed
    # from, at a later point of the run, so the final checkpoint must still be written (and replace it).
    result = Trainer(load_recipe(None, tiny_overrides(digits_shards, out, "run.max_steps=8", "data.batch_size=64",
                                                      *extra, "run.checkpoint_every_steps=0"))).fit()
    assert result.steps == 8 and latest_checkpoint(out).name == "step_00000008"
    assert read_trainer_state(latest_checkpoint(out))[0].samples_seen == state.samples_seen + 4 * 64


def test_checkpoints_are_ordered_by_samples_seen_not_by_step_number(tmp_path):
    """After a relaunch with a larger global batch, step numbers restart lower: step_6 of 64 samples per step is
    newer than step_8 of 32."""
    for name, samples in (("step_00000004", 128), ("step_00000008", 256), ("step_00000006", 384)):
        d = tmp_path / "checkpoints" / name
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"state": {"step": int(name[5:]), "samples_seen": samples}}))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000008", "step_00000006"]
    assert latest_checkpoint(tmp_path).name == "step_00000006"
