"""DINO: teacher EMA, centre (one and two processes), loss pairs, multi-crop views, collapse monitors, head
checkpointing, the trainer on real digits, and the paper recipe."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, TINY_VIT, kl_divergence, torchrun_two_cpu
from PIL import Image
from safetensors.torch import load_file, save_file

from pretrain.checkpoint import latest_checkpoint, list_checkpoints
from pretrain.monitors import CollapseMonitor, effective_rank, embedding_std, entropy
from pretrain.multicrop import MultiCropTransform, blur_kernel_size
from pretrain.objectives import build_objective
from pretrain.objectives.dino import (
    DINO,
    DINOHead,
    DINOLoss,
    _multicrop_embed,
    teacher_momentum_at,
    teacher_temp_at,
)
from pretrain.recipe import RecipeError, load_recipe
from pretrain.restore import load_backbone_from
from pretrain.trainer import Trainer
from shards.stream import ShardStream

RECIPES = ROOT / "recipes"

TINY = [
    "objective.name=dino",
    "model.img_size=16",
    *TINY_VIT,
    "objective.dino.out_dim=64",
    "objective.dino.hidden_dim=64",
    "objective.dino.bottleneck_dim=32",
    "objective.dino.local_crops_number=2",
    "objective.dino.local_crop_size=8",
    "objective.dino.warmup_teacher_temp_epochs=2",
]


def tiny_dino(*extra: str) -> DINO:
    torch.manual_seed(0)
    return build_objective(load_recipe(None, [*TINY, *extra]))


def views(dino: DINO, b: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, gs, ls = dino.in_chans, dino.global_size, dino.cfg.local_crop_size
    return ([torch.randn(b, c, gs, gs, generator=g) for _ in range(2)]
            + [torch.randn(b, c, ls, ls, generator=g) for _ in range(dino.cfg.local_crops_number)])


# ----------------------------------------------------------------------------------------------- teacher


def test_teacher_gets_no_gradient_and_moves_exactly_by_the_ema_rule():
    dino = tiny_dino()
    dino.train()
    assert not dino.backbone.training and not dino.teacher_head.training, "the teacher stays in eval mode"
    teacher = dict(dino.backbone.named_parameters()) | {
        f"head.{n}": p for n, p in dino.teacher_head.named_parameters()}
    assert all(not p.requires_grad for p in teacher.values())
    opt = torch.optim.AdamW([p for p in dino.parameters() if p.requires_grad], lr=1e-2)
    names = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not names & {id(p) for p in teacher.values()}, "no teacher parameter is optimised"

    loss, _ = dino({"image": views(dino)})
    loss.backward()
    assert all(p.grad is None for p in teacher.values())
    assert dino.student_backbone.blocks[0].attn.qkv.weight.grad is not None
    opt.step()

    before = {n: p.detach().clone() for n, p in teacher.items()}
    student = dict(dino.student_backbone.named_parameters()) | {
        f"head.{n}": p for n, p in dino.student_head.named_parameters()}
    metrics = dino.on_step_end(step=1, total_steps=10)
    m = 0.996  # cosine schedule at update index 0
    assert metrics["teacher_momentum"] == pytest.approx(m)
    moved = 0
    for n, p in teacher.items():
        torch.testing.assert_close(p, m * before[n] + (1 - m) * student[n].detach(), rtol=0, atol=1e-7)
        moved += not torch.equal(p, before[n])
    assert moved > 0


def test_momentum_and_teacher_temperature_schedules():
    assert teacher_momentum_at(0, 100, 0.996) == pytest.approx(0.996)
    assert teacher_momentum_at(50, 100, 0.996) == pytest.approx(0.998)
    assert teacher_momentum_at(100, 100, 0.996) == pytest.approx(1.0)
    # linspace(0.04, 0.07, 30)[e], then constant: the paper's ViT-S schedule
    assert teacher_temp_at(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temp_at(29, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temp_at(10, 0.04, 0.07, 30) == pytest.approx(0.04 + 0.03 * 10 / 29)
    assert teacher_temp_at(31, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temp_at(0, 0.04, 0.07, 0) == pytest.approx(0.07)
    dino = tiny_dino()  # warmup over 2 epochs
    assert dino.teacher_temp() == pytest.approx(0.04)
    dino.on_epoch_start(1, 10)
    assert dino.teacher_temp() == pytest.approx(0.07)


def test_last_layer_is_frozen_during_the_first_epoch_only():
    dino = tiny_dino("objective.dino.norm_last_layer=false")
    last = list(dino.student_head.last_layer.parameters())
    assert len(last) == 2 and all(p.requires_grad for p in last)
    for epoch, frozen in ((0, True), (1, False)):
        dino.zero_grad(set_to_none=True)
        dino.on_epoch_start(epoch, 10)
        dino({"image": views(dino)})[0].backward()
        dino.before_optimizer_step(step=0, total_steps=10)
        assert all((p.grad is None) == frozen for p in last), epoch
        assert dino.student_head.mlp[0].weight.grad is not None


# ----------------------------------------------------------------------------------------------- loss + centre


def test_centre_update_formula():
    torch.manual_seed(0)
    loss_fn = DINOLoss(out_dim=8, center_momentum=0.9)
    c0 = torch.randn(1, 8)
    loss_fn.center.copy_(c0)
    teacher = torch.randn(6, 8)
    loss_fn(torch.randn(9, 8), teacher, teacher_temp=0.04)  # 2 global views of 3 + 1 more student view
    torch.testing.assert_close(loss_fn.center, 0.9 * c0 + 0.1 * teacher.mean(0, keepdim=True))
    # a non-finite batch (a step the trainer will skip) leaves the centre alone
    loss_fn(torch.randn(9, 8), torch.full((6, 8), float("nan")), teacher_temp=0.04)
    torch.testing.assert_close(loss_fn.center, 0.9 * c0 + 0.1 * teacher.mean(0, keepdim=True))


@pytest.mark.multiprocess
def test_centre_is_averaged_across_two_real_processes(tmp_path):
    p = torchrun_two_cpu(ROOT / "tests" / "dino_two_rank.py", str(tmp_path), *TINY, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["count"] for r in ranks] == [6, 10]
    total = torch.tensor(ranks[0]["sum"], dtype=torch.float64) + torch.tensor(ranks[1]["sum"], dtype=torch.float64)
    expected = 0.9 * torch.tensor(ranks[0]["before"], dtype=torch.float64) + 0.1 * total / 16
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["center"], dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)
    own = 0.1 * torch.tensor(ranks[0]["sum"], dtype=torch.float64) / 6
    assert not torch.allclose(own, expected, atol=1e-4), "rank 0's own mean would be a different centre"


def _ce(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.sum(-q * F.log_softmax(s / 0.1, dim=-1), dim=-1).mean()


def test_loss_pairs_each_teacher_view_with_every_other_student_view_only():
    torch.manual_seed(0)
    k, b = 16, 5
    x, y = torch.randn(b, k) * 3, torch.randn(b, k) * 3
    loss_fn = DINOLoss(out_dim=k)
    # Student view 0 matches teacher view 1 and vice versa: low loss only if no view meets itself.
    student = torch.cat([y, x, torch.randn(b, k)])
    teacher = torch.cat([x, y])
    loss, stats = loss_fn(student, teacher, teacher_temp=0.1)
    q = F.softmax(teacher / 0.1, dim=-1).chunk(2)
    s = student.chunk(3)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    torch.testing.assert_close(loss, sum(_ce(q[i], s[v]) for i, v in pairs) / 4)
    with_self = sum(_ce(q[i], s[v]) for i in range(2) for v in range(3)) / 6
    assert float(with_self) > float(loss) + 1.0, "the construction makes self-pairs costly"
    # The student's view 0 gets its gradient from teacher view 1 only: changing teacher view 0 changes nothing.
    grads = []
    for t0 in (x, torch.randn(b, k) * 3):
        st = student.clone().requires_grad_(True)
        DINOLoss(out_dim=k)(st, torch.cat([t0, y]), teacher_temp=0.1)[0].backward()
        grads.append(st.grad[:b])
    torch.testing.assert_close(grads[0], grads[1])
    # The logged monitors are the teacher's entropy and the mean teacher-student KL over the same pairs.
    assert stats["teacher_entropy"] == pytest.approx(float((entropy(q[0]) + entropy(q[1])) / 2), rel=1e-5)
    kls = [kl_divergence(q[i], F.log_softmax(s[v] / 0.1, dim=-1)) for i, v in pairs]
    assert stats["st_kl"] == pytest.approx(float(sum(kls) / 4), rel=1e-4, abs=1e-5)


def test_loss_needs_at_least_two_views_and_whole_views():
    loss_fn = DINOLoss(out_dim=4)
    with pytest.raises(ValueError, match="not whole views"):
        loss_fn(torch.randn(7, 4), torch.randn(6, 4), teacher_temp=0.04)


# ----------------------------------------------------------------------------------------------- views


def test_multicrop_views_shapes_and_one_channel_handling():
    img = Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy())
    t1 = MultiCropTransform(in_chans=1, mean=[0.5], std=[0.5], global_size=16, local_number=3, local_size=8)
    out = t1(img)
    assert [tuple(v.shape) for v in out] == [(1, 16, 16)] * 2 + [(1, 8, 8)] * 3
    assert all(v.dtype == torch.float32 for v in out)
    names = " ".join(repr(t) for t in t1.global_1.transforms)
    assert "Grayscale" not in names and "saturation" not in names and "hue" not in names
    t3 = MultiCropTransform(in_chans=3, mean=[0.5] * 3, std=[0.5] * 3, global_size=16, local_number=2, local_size=8)
    out3 = t3(img.convert("L"))  # a gray image is made RGB for a 3-channel backbone
    assert [tuple(v.shape) for v in out3] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2
    names3 = " ".join(repr(t) for t in t3.global_1.transforms)
    assert "Grayscale" in names3 and "saturation" in names3
    # DINO's asymmetric views: blur always on global 1, solarisation only on global 2
    assert "RandomApply" not in repr(t1.global_1.transforms[-3]) and "Solarize" not in repr(t1.global_1)
    assert "Solarize" in repr(t1.global_2) and "Solarize" not in repr(t1.local)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(28) == 3 and blur_kernel_size(96) == 9
    # Different views of one image are different crops.
    assert not torch.equal(out[0], out[1])


def test_stream_collates_views_into_a_list_of_batches(digits_shards):
    dino = tiny_dino()
    stream = ShardStream(str(digits_shards), batch_size=5, num_workers=0, transform=dino.train_transform(),
                         shuffle=False, rank=0, world_size=1)
    batch = next(iter(stream.loader()))
    assert isinstance(batch["image"], list) and len(batch["image"]) == 4
    assert [tuple(v.shape) for v in batch["image"]] == [(5, 1, 16, 16)] * 2 + [(5, 1, 8, 8)] * 2
    loss, metrics = dino(batch)
    assert math.isfinite(float(loss.detach()))
    assert {"teacher_entropy", "st_kl", "teacher_temp"} <= set(metrics)
    # the collapse monitor's SVD-based measures come with the update's hook at logged steps (here the last one)
    assert {"embed_std", "embed_rank", "teacher_momentum"} <= set(dino.on_step_end(10, 10))


def test_views_of_one_resolution_share_one_forward():
    dino = tiny_dino()
    calls = []
    handle = dino.student_backbone.patch_embed.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    v = views(dino, b=3)
    out = _multicrop_embed(dino.student_backbone, v)
    handle.remove()
    assert calls == [(6, 1, 16, 16), (6, 1, 8, 8)]
    assert out.shape == (12, 32)
    # same result as one view at a time (the local crops' position embedding is interpolated)
    dino.eval()
    torch.testing.assert_close(out, torch.cat([_multicrop_embed(dino.student_backbone, [x]) for x in v]),
                               rtol=1e-4, atol=1e-5)


def test_bad_batches_and_configs_are_clear_errors():
    dino = tiny_dino()
    with pytest.raises(ValueError, match="list of view tensors"):
        dino({"image": torch.randn(2, 1, 16, 16)})
    with pytest.raises(ValueError, match="expects 4 views"):
        dino({"image": views(dino)[:3]})
    bad = views(dino)
    bad[3] = torch.randn(4, 1, 12, 12)
    with pytest.raises(ValueError, match="view 3"):
        dino({"image": bad})
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        tiny_dino("objective.dino.local_crop_size=6")
    with pytest.raises(RecipeError, match="blur_prob"):
        load_recipe(None, [*TINY, "objective.dino.blur_prob=[1.0,0.5]"])
    with pytest.raises(RecipeError, match="local_crops_scale"):
        load_recipe(None, [*TINY, "objective.dino.local_crops_scale=[0.5,0.1]"])


# ----------------------------------------------------------------------------------------------- head


def test_head_weight_norm_and_safetensors_round_trip(tmp_path):
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16, layers=3, norm_last_layer=True)
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(64))  # unit prototypes
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == 3

    dino = tiny_dino()
    dino({"image": views(dino)})  # moves the centre
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(tmp_path / "m.safetensors"))
    fresh = tiny_dino("run.seed=5")
    torch.manual_seed(1)
    fresh.student_head.apply(DINOHead._init_weights)
    missing, unexpected = fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    assert not missing and not unexpected
    torch.testing.assert_close(fresh.loss_fn.center, dino.loss_fn.center)
    x = torch.randn(3, 32)
    torch.testing.assert_close(fresh.student_head(x), dino.student_head(x))


# ----------------------------------------------------------------------------------------------- monitors


def test_monitors_on_collapsed_and_spread_embeddings():
    d = 16
    collapsed = torch.randn(1, d).repeat(10, 1)
    assert float(embedding_std(collapsed)) == pytest.approx(0.0, abs=1e-6)
    assert float(effective_rank(collapsed)) == pytest.approx(1.0, abs=1e-3)
    # +-e_k: every dimension is +1 once and -1 once in 2d rows: std sqrt(2 / (2d - 1)), all singular values equal
    signed = torch.cat([torch.eye(d), -torch.eye(d)])
    assert float(embedding_std(signed)) == pytest.approx(math.sqrt(2 / (2 * d - 1)), rel=1e-5)
    assert float(effective_rank(signed)) == pytest.approx(d, rel=1e-4)
    # A random orthogonal matrix: rank d; mean per-dimension variance exactly 1/d
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert float(effective_rank(q)) == pytest.approx(d, rel=1e-4)
    assert float(F.normalize(q.float(), dim=-1).var(dim=0).mean()) == pytest.approx(1 / d, rel=1e-4)
    assert 0.9 / math.sqrt(d) < float(embedding_std(q)) <= 1 / math.sqrt(d) + 1e-6
    # 4 orthonormal rows in 16 dims: effective rank 4
    assert float(effective_rank(q[:4])) == pytest.approx(4.0, rel=1e-4)
    # entropy and KL
    k = 8
    assert float(entropy(torch.full((3, k), 1 / k))) == pytest.approx(math.log(k))
    assert float(entropy(F.one_hot(torch.tensor([1, 5]), k).float())) == pytest.approx(0.0)
    p = torch.tensor([[0.5, 0.5]])
    q2 = torch.tensor([[0.25, 0.75]])
    assert float(kl_divergence(p, q2.log())) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert float(kl_divergence(q2, q2.log())) == pytest.approx(0.0, abs=1e-7)


def test_collapse_monitor_warns_loudly_once_per_interval(caplog):
    mon = CollapseMonitor(warn_below=0.05, every=100)
    spread = torch.cat([torch.eye(8), -torch.eye(8)])
    collapsed = torch.ones(16, 8) + 1e-6 * torch.randn(16, 8)
    with caplog.at_level(logging.WARNING, logger="vitssl.monitors"):
        mon.measure(spread)
        assert not mon.check(1)
        mon.measure(collapsed)
        warned = [mon.check(s) for s in range(2, 250)]
    assert [s for s, w in zip(range(2, 250), warned, strict=True) if w] == [2, 102, 202]
    assert len(caplog.records) == 3 and "COLLAPSE WARNING" in caplog.records[0].getMessage()


# ----------------------------------------------------------------------------------------------- trainer


def test_trainer_runs_dino_on_digits(digits_shards, tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe(None, [
        *TINY, f"data.train={digits_shards}", f"run.out_dir={out}", "data.batch_size=32", "data.num_workers=0",
        "run.max_steps=12", "run.progress=false", "run.trackers=[jsonl]", "run.log_every=1",
        "optim.base_lr=1e-3", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "optim.clip_grad=3.0",
        "optim.warmup_steps=2", "run.visualize=true",
    ])
    trainer = Trainer(recipe)
    dino = trainer.unwrapped_objective
    teacher0 = {k: v.clone() for k, v in dino.backbone.state_dict().items()}
    result = trainer.fit()
    assert result.steps == 12
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    for key in ("teacher_entropy", "st_kl", "embed_std", "embed_rank", "teacher_momentum", "teacher_temp"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["teacher_momentum"] == pytest.approx(teacher_momentum_at(0, 12, 0.996))
    assert any(not torch.equal(teacher0[k], v) for k, v in dino.backbone.state_dict().items()), "teacher moved"
    # The exported and checkpointed backbone is the teacher's.
    exported = load_backbone_from(out)
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, dino.backbone.state_dict()[k])
    ckpt = load_file(str(result.checkpoint / "model.safetensors"))
    assert "loss_fn.center" in ckpt and any(k.startswith("teacher_head.") for k in ckpt)
    png = [p for p in result.pictures if p.name.startswith("dino_step")]
    assert png and png[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_restores_teacher_and_centre_exactly(digits_shards, tmp_path):
    """6 steps straight == 3 steps, a fresh trainer resuming from the checkpoint, 3 more (teacher, centre too)."""
    def recipe(out):
        return load_recipe(None, [
            *TINY, f"data.train={digits_shards}", f"run.out_dir={out}", "data.batch_size=16", "data.num_workers=0",
            "run.max_steps=6", "run.checkpoint_every_steps=3", "run.progress=false", "run.trackers=[jsonl]",
            "run.visualize=false", "optim.base_lr=1e-3", "optim.clip_grad=3.0",
        ])

    Trainer(recipe(tmp_path / "straight")).fit()
    resumed = tmp_path / "resumed"
    Trainer(recipe(resumed)).fit()
    for c in list_checkpoints(resumed):
        if c.name != "step_00000003":
            shutil.rmtree(c)
    torch.manual_seed(12345)
    Trainer(recipe(resumed)).fit()
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(resumed) / "model.safetensors"))
    assert a.keys() == b.keys() and "loss_fn.center" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs after resume")


def test_recipes_load_and_the_paper_recipe_has_the_papers_values():
    r = load_recipe(RECIPES / "dino_vit_small_in1k.yaml")
    assert r.objective.name == "dino"
    assert (r.model.name, r.model.img_size, r.model.patch_size, r.model.in_chans) == (
        "vit_small_patch16_224", 224, 16, 3)
    assert r.data.batch_size * 8 * r.optim.accum_steps == 1024  # 8 GPUs, as the header says
    assert r.optim.base_lr == pytest.approx(0.0005) and r.optim.min_lr == pytest.approx(1e-6)
    assert r.run.epochs == 100 and r.optim.warmup_epochs == 10
    assert r.optim.weight_decay == pytest.approx(0.04) and r.optim.weight_decay_end == pytest.approx(0.4)
    assert r.optim.clip_grad == pytest.approx(3.0) and r.model.drop_path_rate == pytest.approx(0.1)
    d = r.objective.dino
    assert d.out_dim == 65536 and d.bottleneck_dim == 256 and d.hidden_dim == 2048 and d.head_layers == 3
    assert (d.global_crop_size, d.local_crops_number, d.local_crop_size) == (224, 10, 96)
    assert d.global_crops_scale == [0.4, 1.0] and d.local_crops_scale == [0.05, 0.4]
    assert (d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert d.student_temp == 0.1 and d.center_momentum == 0.9 and d.momentum_teacher == 0.996
    assert d.freeze_last_layer == 1
    small = load_recipe(RECIPES / "dino_vit_tiny_fmnist.yaml")
    assert small.objective.name == "dino" and small.model.in_chans == 1 and small.run.max_minutes <= 30


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_cpu_processes_train_dino_in_sync(digits_shards, tmp_path):
    """torchrun, 2 processes, gloo, the real trainer: student *and teacher* stay identical on both ranks."""
    out = tmp_path / "run"
    out.mkdir()
    p = torchrun_two_cpu(ROOT / "tests" / "two_rank_train.py", str(out), *TINY, f"data.train={digits_shards}",
                         f"run.out_dir={out}", "run.max_steps=4", "data.batch_size=16", "data.num_workers=0",
                         "run.progress=false", "run.trackers=[jsonl]", "run.visualize=false", "optim.clip_grad=3.0",
                         timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["params"] == ranks[1]["params"], "DDP ranks diverged (the digest covers the teacher too)"
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
    ckpt = load_file(str(out / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert bool(ckpt["loss_fn.center"].abs().sum() > 0)
