"""Training throughput (images/s) and model FLOP utilisation (MFU) of MAE ViT-B/16 and DINO ViT-S/16 on one device.

Variants, both built with the project's own code from its ImageNet recipes (`load_recipe` + `build_objective`,
i.e. `create_backbone(recipe.model)` and `MAE(...)` / `DINO(...)`):
  * `mae`:  `recipes/mae_vit_base_in1k.yaml`: ViT-B/16 (768-d, 12 blocks, 12 heads), 224x224, mask ratio 0.75,
            decoder 512-d / 8 blocks / 16 heads, norm_pix_loss. Batch 256 (the recipe's per-GPU batch).
  * `dino`: `recipes/dino_vit_small_in1k.yaml`: ViT-S/16 (384-d, 12 blocks, 6 heads), 2 global 224x224 crops
            + `--local-crops` 96x96 crops (default on CUDA: the recipe's 10; on CPU: 0), the recipe's head
            (3-layer MLP 2048 -> bottleneck 256 -> 65536 prototypes). Batch 128 (the recipe's per-GPU batch).
            The last layer is trained (epoch >= freeze_last_layer, the steady state of a run).

One training step is what `pretrain.trainer` does per update: inputs copied to the device from pinned CPU memory
(`non_blocking=True`), forward under autocast, backward, gradient clipping where the recipe sets it (DINO: 3.0),
`before_optimizer_step`, AdamW step (`timm.optim.create_optimizer_v2` -> `torch.optim.AdamW`, `fused=True` on
CUDA, as the trainer), zero_grad, `on_step_end` (DINO: the teacher EMA update). Inputs are fixed random tensors
(no data loading). The variants are interleaved round by round; each step is timed alone between two
`torch.cuda.synchronize()`; images/s = batch size / median step time over all timed steps (warmup steps are not
timed); the best step is reported too.

Precision and peak. CUDA: bf16 autocast; the peak is *measured* in the same run as the best rate of a large bf16
`torch.matmul` (8192 x 8192 x 8192), once before and once after the training rounds (the higher is used, so a
clock that drops under load does not inflate MFU). CPU: fp32, peak = the best measured fp32 matmul rate
(1024^3; quick 512^3) at this process's thread count. MFU = analytic model FLOPs per image x images/s / peak.
On CUDA the datasheet dense bf16 peak is reported beside, where the device is known.

Tiny dimensions. On CPU, and with `--quick` (whose default device is the CPU, so `make test` can run it in
under 30 s with OMP_NUM_THREADS=1), the same code path runs with tiny models: img 32, patch 8, embed 64,
depth 2, heads 2, MAE decoder 32-d / 1 block / 2 heads, DINO head 128 -> 32 -> 256, local crops 16x16. Those
numbers only smoke-test the code; MFU means something on a GPU with the real dimensions.

Model FLOPs (analytic, per image). FLOPs = 2 x multiply-accumulates (MACs); only matrix products are counted
(LayerNorm, softmax, GELU, the loss, the optimizer are not). For a ViT block on N tokens (prefix/cls included),
width D, MLP hidden H (= 4D):
    block(N, D) = 3ND^2 (qkv) + ND^2 (proj) + 2NDH (fc1 + fc2; = 8ND^2) + 2N^2 D (QK^T and AV, all heads)
                = 12 N D^2 + 2 N^2 D                                                          [MACs, forward]
    patch_embed(P) = P x (p^2 C) x D   for P patches of p x p x C pixels                       [MACs, forward]
Training = forward + backward = 3x forward for every matmul with a trainable weight and an input that needs a
gradient (forward, input gradient, weight gradient). Exceptions, so the formula is exact: the patch embedding's
input (the pixels) needs no gradient, so it costs 2x forward (forward + weight gradient); no-grad parts (the
DINO teacher) cost 1x.
    MAE:  N_p = 196 patches, N_e = 1 + int(196 x (1 - 0.75)) = 50 encoder tokens (cls + visible, the project's
          `num_kept`), N_d = 197 decoder tokens, D = 768, L = 12, D_d = 512, L_d = 8:
          FLOPs = 2 x [ 2 x patch_embed(196)
                       + 3 x ( L x block(N_e, D) + N_e D D_d (decoder_embed)
                               + L_d x block(N_d, D_d) + N_d D_d p^2 C (decoder_pred) ) ]
    DINO: per view v with P_v patches (224: 196, 96: 36) and N_v = 1 + P_v tokens, D = 384, L = 12;
          head(D) = D H_h + (layers - 2) H_h^2 + H_h B + B K   (H_h = 2048, B = 256, K = 65536, layers = 3):
          FLOPs = 2 x [ sum over all views   (2 x patch_embed(P_v) + 3 x (L x block(N_v, D) + head))   student
                       + sum over global views (patch_embed(P_v) + L x block(N_v, D) + head) ]       teacher
The formula is cross-checked against `torch.utils.flop_counter.FlopCounterMode` on one forward + backward of the
benchmarked model (batch 2, attention run unfused so its products are plain matmuls the counter sees); on a GPU
also on the tiny CPU model. Both are reported (`flops_per_image_analytic`, `flops_per_image_counted`).

    python bench/gpu_throughput.py [--quick] [--steps 10 --rounds 5 --warmup 10] [--batch-size-mae 256]
                                   [--batch-size-dino 128] [--local-crops 10] [--device cuda] [--compile]

Prints one JSON object (logs, if any, go to stderr).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import torch  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pretrain.objectives import build_objective  # noqa: E402
from pretrain.objectives.dino import N_GLOBAL  # noqa: E402
from pretrain.objectives.mae import num_kept  # noqa: E402
from pretrain.recipe import Recipe, load_recipe  # noqa: E402

RECIPES = {"mae": ROOT / "recipes" / "mae_vit_base_in1k.yaml", "dino": ROOT / "recipes" / "dino_vit_small_in1k.yaml"}
TINY_MODEL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=2", "model.num_heads=2"]
TINY = {
    "mae": TINY_MODEL + ["objective.mae.decoder_embed_dim=32", "objective.mae.decoder_depth=1",
                         "objective.mae.decoder_num_heads=2"],
    "dino": TINY_MODEL + ["objective.dino.global_crop_size=32", "objective.dino.local_crop_size=16",
                          "objective.dino.out_dim=256", "objective.dino.hidden_dim=128",
                          "objective.dino.bottleneck_dim=32"],
}
MFU_TARGET = 0.40  # MAE ViT-B/16, against the measured bf16 matmul peak
TOTAL_STEPS = 100_000  # schedule length handed to the step hooks (DINO's teacher momentum); any large number
COUNT_BATCH = 2  # images in the FlopCounterMode step
# Datasheet dense (no sparsity) bf16 tensor-core peaks, FLOP/s; for reference only, MFU uses the measured peak.
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny dims on the CPU (unless --device), few steps (< 30 s), same JSON shape")
    ap.add_argument("--device", default=None, help="default: cuda if available else cpu (quick: cpu)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (default 10, quick 3)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5 on CUDA, 3 on CPU, quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default 10 CUDA, "
                                                             "3 CPU, quick 1)")
    ap.add_argument("--batch-size-mae", type=int, default=None, help="default 256 (tiny dims: 32)")
    ap.add_argument("--batch-size-dino", type=int, default=None, help="default 128 (tiny dims: 16)")
    ap.add_argument("--local-crops", type=int, default=None,
                    help="DINO local crops per image (default: the recipe's 10 on CUDA, 0 on CPU)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each objective in place (as run.compile=true: backbone, decoder/heads)")
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    cuda = args.device.startswith("cuda")
    args.tiny = args.quick or not cuda
    args.steps = args.steps or (3 if args.quick else 10)
    args.rounds = args.rounds or (2 if args.quick else 5 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 10 if cuda else 3)
    args.batch_size_mae = args.batch_size_mae or (32 if args.tiny else 256)
    args.batch_size_dino = args.batch_size_dino or (16 if args.tiny else 128)
    if args.local_crops is None:
        args.local_crops = 10 if cuda else 0
    return args


# ------------------------------------------------------------------------------------------------ analytic FLOPs


def block_macs(n: int, d: int, hidden: int) -> int:
    """Forward MACs of one ViT block on n tokens: qkv 3nd^2 + proj nd^2 + MLP 2ndH + attention 2n^2 d."""
    return 4 * n * d * d + 2 * n * d * hidden + 2 * n * n * d


def _dims(backbone) -> dict[str, int]:
    return {"embed_dim": backbone.embed_dim, "depth": len(backbone.blocks),
            "num_heads": backbone.blocks[0].attn.num_heads, "mlp_hidden": backbone.blocks[0].mlp.fc1.out_features,
            "patch_size": backbone.patch_embed.patch_size[0], "in_chans": backbone.in_chans,
            "prefix_tokens": backbone.num_prefix_tokens}


def _patch_embed_macs(dm: dict[str, int], n_patches: int) -> int:
    return n_patches * dm["patch_size"] ** 2 * dm["in_chans"] * dm["embed_dim"]


def _encoder_macs(dm: dict[str, int], n_tokens: int) -> int:
    return dm["depth"] * block_macs(n_tokens, dm["embed_dim"], dm["mlp_hidden"])


def mae_flops(mae) -> tuple[int, dict[str, int]]:
    """Training FLOPs per image (forward + backward) of `pretrain.objectives.mae.MAE`, with a breakdown."""
    dm, cfg = _dims(mae.backbone), mae.cfg
    n_p = mae.num_patches
    n_e = mae.num_prefix + (n_p if cfg.mask_tokens_in_encoder else num_kept(n_p, cfg.mask_ratio))
    n_d = mae.num_prefix + n_p
    dd, d_hidden = cfg.decoder_embed_dim, mae.decoder_blocks[0].mlp.fc1.out_features
    pix = dm["patch_size"] ** 2 * dm["in_chans"]
    parts = {  # FLOPs = 2 x MACs x (3 trained, 2 patch embedding: no gradient w.r.t. the pixels)
        "patch_embed": 2 * 2 * _patch_embed_macs(dm, n_p),
        "encoder": 2 * 3 * _encoder_macs(dm, n_e),
        "decoder_embed": 2 * 3 * n_e * dm["embed_dim"] * dd,
        "decoder": 2 * 3 * cfg.decoder_depth * block_macs(n_d, dd, d_hidden),
        "decoder_pred": 2 * 3 * n_d * dd * pix,
    }
    return sum(parts.values()), parts


def _head_macs(cfg, d: int) -> int:
    h, b, k = cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim
    mlp = d * b if cfg.head_layers <= 1 else d * h + (cfg.head_layers - 2) * h * h + h * b
    return mlp + b * k


def dino_flops(dino, view_sizes: list[int]) -> tuple[int, dict[str, int]]:
    """Training FLOPs per image of `pretrain.objectives.dino.DINO` on views of the given sizes (globals first)."""
    dm, head = _dims(dino.student_backbone), _head_macs(dino.cfg, dino.student_backbone.embed_dim)
    parts = {"student_patch_embed": 0, "student_backbone": 0, "student_head": 0,
             "teacher_patch_embed": 0, "teacher_backbone": 0, "teacher_head": 0}
    for i, s in enumerate(view_sizes):
        n_p = (s // dm["patch_size"]) ** 2
        pe, enc = _patch_embed_macs(dm, n_p), _encoder_macs(dm, dm["prefix_tokens"] + n_p)
        parts["student_patch_embed"] += 2 * 2 * pe
        parts["student_backbone"] += 2 * 3 * enc
        parts["student_head"] += 2 * 3 * head
        if i < N_GLOBAL:
            parts["teacher_patch_embed"] += 2 * pe
            parts["teacher_backbone"] += 2 * enc
            parts["teacher_head"] += 2 * head
    return sum(parts.values()), parts


# ------------------------------------------------------------------------------------------------ build and step


def build(kind: str, device: torch.device, tiny: bool, local_crops: int) -> tuple[Recipe, Any]:
    torch.manual_seed(0)
    overrides = list(TINY[kind]) if tiny else []
    if kind == "dino":
        overrides.append(f"objective.dino.local_crops_number={local_crops}")
    recipe = load_recipe(RECIPES[kind], overrides)
    obj = build_objective(recipe).to(device).train()
    if kind == "dino":  # the steady state of a run: past the epochs where the last layer is frozen
        obj.on_epoch_start(recipe.objective.dino.freeze_last_layer, 1)
    return recipe, obj


def make_optimizer(obj, recipe: Recipe, device: torch.device, batch: int) -> torch.optim.Optimizer:
    """As `pretrain.trainer.Trainer`: timm's create_optimizer_v2 (no-weight-decay groups, layer-wise lr decay where
    the recipe sets it), betas for the Adam family, fused Adam(W) on CUDA; lr = base_lr x batch / 256."""
    optim = recipe.optim
    kwargs: dict[str, Any] = {"eps": optim.eps}
    if optim.name.lower() in ("adamw", "adam", "lamb", "adan", "lion", "nadamw"):
        kwargs["betas"] = tuple(optim.betas)
    if optim.name.lower() in ("adamw", "adam") and device.type == "cuda":
        kwargs["fused"] = True
    return create_optimizer_v2(obj, opt=optim.name, lr=optim.base_lr * batch / 256,
                               weight_decay=optim.weight_decay, momentum=optim.momentum,
                               layer_decay=optim.layer_decay or None, **kwargs)


def view_sizes(kind: str, obj) -> list[int]:
    if kind == "mae":
        return [obj.img_size[0]]
    return [obj.global_size] * N_GLOBAL + [obj.cfg.local_crop_size] * obj.cfg.local_crops_number


def host_batch(kind: str, obj, batch: int, device: torch.device) -> dict[str, Any]:
    """Fixed random inputs in CPU memory, pinned when the device is a GPU."""
    g = torch.Generator().manual_seed(0)

    def t(size: int) -> torch.Tensor:
        x = torch.randn(batch, obj.in_chans, size, size, generator=g)
        return x.pin_memory() if device.type == "cuda" else x

    views = [t(s) for s in view_sizes(kind, obj)]
    return {"image": views[0] if kind == "mae" else views}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    x = batch["image"]
    if isinstance(x, list):
        return {"image": [v.to(device, non_blocking=True) for v in x]}
    return {"image": x.to(device, non_blocking=True)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    def __init__(self, kind: str, args: argparse.Namespace, device: torch.device, batch: int) -> None:
        self.kind, self.device, self.batch = kind, device, batch
        self.recipe, self.obj = build(kind, device, args.tiny, args.local_crops)
        self.opt = make_optimizer(self.obj, self.recipe, device, batch)
        self.host = host_batch(kind, self.obj, batch, device)
        self.clip = self.recipe.optim.clip_grad
        self.amp = torch.bfloat16 if device.type == "cuda" else None
        self.step_i = 0
        self.times: list[float] = []
        self.peak_mem = 0.0

    def step(self) -> None:
        """One training update, as the trainer does it."""
        batch = to_device(self.host, self.device)
        with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            loss, _ = self.obj(batch)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.obj.parameters(), self.clip)
        self.obj.before_optimizer_step(self.step_i, TOTAL_STEPS)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_i += 1
        self.obj.on_step_end(self.step_i, TOTAL_STEPS)

    def timed_steps(self, n: int) -> None:
        for _ in range(n):
            sync(self.device)
            t0 = time.perf_counter()
            self.step()
            sync(self.device)
            self.times.append(time.perf_counter() - t0)

    def flops(self) -> tuple[int, dict[str, int]]:
        if self.kind == "mae":
            return mae_flops(self.obj)
        return dino_flops(self.obj, view_sizes(self.kind, self.obj))


def counted_flops_per_image(kind: str, obj, device: torch.device) -> float:
    """FlopCounterMode over one forward + backward of `obj` on COUNT_BATCH images; attention unfused meanwhile
    (explicit q @ k^T and attn @ v, which the counter sees on every device), restored afterwards."""
    batch = to_device(host_batch(kind, obj, COUNT_BATCH, torch.device("cpu")), device)
    attn = [m for m in obj.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in attn]
    amp = device.type == "cuda"
    try:
        for m in attn:
            m.fused_attn = False
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _ = obj(batch)
            loss.backward()
    finally:
        for m, s in zip(attn, saved):
            m.fused_attn = s
        obj.zero_grad(set_to_none=True)
    return counter.get_total_flops() / COUNT_BATCH


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int, trials: int) -> float:
    """Best measured rate (FLOP/s) of an n x n x n matmul, 2 n^3 FLOPs each."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    best = 0.0
    for _ in range(trials):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    del a, b, c
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return str(device)


def datasheet_peak(name: str) -> float | None:
    for key, peak in DATASHEET_BF16:
        if key in name:
            return peak
    return None


def describe(v: Variant) -> dict[str, Any]:
    dm = _dims(v.obj.backbone)
    model = v.recipe.model.name + (" with the tiny dimensions below" if v.recipe.model.embed_dim else "")
    out: dict[str, Any] = {"recipe": str(RECIPES[v.kind].relative_to(ROOT)), "model": model, **dm}
    if v.kind == "mae":
        mae = v.obj.cfg
        out.update(img_size=v.obj.img_size[0], mask_ratio=mae.mask_ratio, norm_pix_loss=mae.norm_pix_loss,
                   encoder_tokens=v.obj.num_prefix + num_kept(v.obj.num_patches, mae.mask_ratio),
                   decoder={"embed_dim": mae.decoder_embed_dim, "depth": mae.decoder_depth,
                            "num_heads": mae.decoder_num_heads},
                   views=[f"{v.obj.img_size[0]}x{v.obj.img_size[1]}"])
    else:
        dino = v.obj.cfg
        out.update(views=[f"{s}x{s}" for s in view_sizes(v.kind, v.obj)], global_crops=N_GLOBAL,
                   local_crops=dino.local_crops_number,
                   head={"hidden_dim": dino.hidden_dim, "bottleneck_dim": dino.bottleneck_dim,
                         "out_dim": dino.out_dim, "layers": dino.head_layers},
                   teacher="forward on the global views (no grad) + EMA update after every step")
    return out


def tiny_cpu_crosscheck(local_crops: int) -> dict[str, Any]:
    """Analytic vs FlopCounterMode FLOPs per image on the tiny CPU models (a GPU run checks its formula here too)."""
    cpu, out = torch.device("cpu"), {}
    for kind in ("mae", "dino"):
        _, obj = build(kind, cpu, True, local_crops)
        analytic = mae_flops(obj)[0] if kind == "mae" else dino_flops(obj, view_sizes(kind, obj))[0]
        counted = counted_flops_per_image(kind, obj, cpu)
        out[kind] = {"flops_per_image_analytic": analytic, "flops_per_image_counted": counted,
                     "counted_over_analytic": round(counted / analytic, 6)}
    return out


def resolve_device(name: str) -> torch.device:
    """The device to run on; a bare "cuda" pinned to the current GPU's index."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def peak_settings(cuda: bool, quick: bool) -> tuple[torch.dtype, int, int, int]:
    """(dtype, n, reps, trials) of the matmul peak: bf16 8192^3 on a GPU, a small fp32 one on a CPU."""
    peak_dtype = torch.bfloat16 if cuda else torch.float32
    peak_n = 8192 if cuda else (512 if quick else 1024)
    peak_reps, peak_trials = (50, 5) if cuda else (4 if quick else 5, 3)
    return peak_dtype, peak_n, peak_reps, peak_trials


def timed_rounds(variants: dict[str, Variant], args: argparse.Namespace, device: torch.device) -> None:
    """Warm every variant up, then time them interleaved round by round (peak memory per variant on CUDA)."""
    cuda = device.type == "cuda"
    for v in variants.values():
        for _ in range(args.warmup):
            v.step()
    sync(device)
    for r in range(args.rounds):
        for name, v in variants.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            v.timed_steps(args.steps)
            if cuda:
                v.peak_mem = max(v.peak_mem, torch.cuda.max_memory_allocated(device) / 2**30)
            log(f"round {r + 1}/{args.rounds} {name}: median {1000 * statistics.median(v.times):.1f} ms/step")


def run_header(args: argparse.Namespace, device: torch.device, name: str, peak_dtype: torch.dtype, peak_n: int,
               peaks: tuple[float, float], sheet: float | None) -> dict[str, Any]:
    """The result's settings: device, precision, optimizer, inputs, step counts and the matmul peak used."""
    cuda = device.type == "cuda"
    peak_before, peak_after = peaks
    return {
        "benchmark": "gpu_throughput",
        "quick": args.quick,
        "device": name,
        "device_type": device.type,
        "dtype": "bfloat16 autocast (torch.autocast cuda), fp32 master weights" if cuda else "float32",
        "tiny_cpu_dims": args.tiny,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "compile": args.compile,
        "optimizer": f"torch.optim.AdamW fused={bool(cuda)} (timm create_optimizer_v2, as pretrain.trainer)",
        "inputs": ("fixed random tensors in pinned CPU memory, copied with non_blocking=True every step" if cuda
                   else "fixed random CPU tensors"),
        "step": "inputs to device + forward + backward + grad clip (recipe) + AdamW step + on_step_end hook",
        "warmup_steps": args.warmup,
        "timed_steps_per_round": args.steps,
        "rounds": args.rounds,
        "peak_matmul": {
            "what": f"best rate of torch.matmul {peak_n}x{peak_n}x{peak_n} {str(peak_dtype).replace('torch.', '')}",
            "flops_per_s_before": round(peak_before),
            "flops_per_s_after": round(peak_after),
            "flops_per_s_used": round(max(peak_before, peak_after)),
            "datasheet_dense_bf16_flops_per_s": sheet,
        },
        "flops_formula": "FLOPs = 2 x MACs; block(N,D) = 12ND^2 + 2N^2D (MLP 4D); training 3x forward, patch "
                         "embedding 2x (no pixel grad), DINO teacher 1x; see the docstring",
    }


def variant_entry(v: Variant, counted: float, peak: float, sheet: float | None, cuda: bool) -> dict[str, Any]:
    """One variant's images/s, step times, FLOPs (analytic and counted) and MFU."""
    analytic, parts = v.flops()
    median, best = statistics.median(v.times), min(v.times)
    ips = v.batch / median
    achieved = analytic * ips
    entry: dict[str, Any] = {
        "config": describe(v),
        "batch_size": v.batch,
        "grad_clip": v.clip,
        "images_per_s": round(ips, 2),
        "images_per_s_best_step": round(v.batch / best, 2),
        "step_ms_median": round(1000 * median, 3),
        "step_ms_best": round(1000 * best, 3),
        "timed_steps": len(v.times),
        "flops_per_image_analytic": analytic,
        "flops_per_image_counted": counted,
        "counted_over_analytic": round(counted / analytic, 6),
        "flops_breakdown_per_image": parts,
        "achieved_tflops": round(achieved / 1e12, 4),
        "mfu": round(achieved / peak, 4),
        "mfu_vs_datasheet": round(achieved / sheet, 4) if sheet else None,
    }
    if cuda:
        entry["peak_mem_gib"] = round(v.peak_mem, 2)
    return entry


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark for parsed arguments (`parse_args`): the result dict that `main` prints."""
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    t_start = time.perf_counter()

    variants = {"mae": Variant("mae", args, device, args.batch_size_mae),
                "dino": Variant("dino", args, device, args.batch_size_dino)}
    counted = {name: counted_flops_per_image(name, v.obj, device) for name, v in variants.items()}
    if args.compile:
        for v in variants.values():
            v.obj.compile()  # in place, as the trainer's run.compile

    peak_dtype, peak_n, peak_reps, peak_trials = peak_settings(cuda, args.quick)
    peak_before = matmul_peak(device, peak_dtype, peak_n, peak_reps, peak_trials)
    log(f"matmul peak {peak_before / 1e12:.3f} TFLOP/s ({peak_dtype}, n={peak_n})")
    timed_rounds(variants, args, device)
    peak_after = matmul_peak(device, peak_dtype, peak_n, peak_reps, peak_trials)
    peak = max(peak_before, peak_after)
    name = device_name(device)
    sheet = datasheet_peak(name) if cuda else None

    result = run_header(args, device, name, peak_dtype, peak_n, (peak_before, peak_after), sheet)
    for vname, v in variants.items():
        result[vname] = variant_entry(v, counted[vname], peak, sheet, cuda)
    result["mfu_target_mae"] = MFU_TARGET
    result["meets_target"] = result["mae"]["mfu"] >= MFU_TARGET
    if not args.tiny:
        result["tiny_cpu_crosscheck"] = tiny_cpu_crosscheck(args.local_crops)
    if args.tiny:
        result["note"] = ("tiny dimensions (img 32, patch 8, 64-d, 2 blocks): a smoke test of the code path only; "
                          "images/s and MFU are meaningless here (tiny matmuls, "
                          + ("CPU fp32" if not cuda else "GPU") + "). Real numbers: run on a GPU without --quick.")
    else:
        result["note"] = ("MFU = analytic model FLOPs (no recompute, no elementwise ops) x images/s / measured "
                          "bf16 matmul peak of this device; mfu_vs_datasheet uses the datasheet dense peak.")
    result["wall_s_after_imports"] = round(time.perf_counter() - t_start, 2)
    return result


def main(argv: list[str] | None = None) -> dict:
    result = measure(parse_args(argv))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
