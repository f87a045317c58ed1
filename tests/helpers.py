"""What several test modules share: the project root, the tiny MAE run, a child-process environment and a real
2-process CPU torchrun. A plain module (not a conftest), imported by name: tests/ is on sys.path under pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]

# A 2-block 32-d ViT (image size set by each test): a step takes milliseconds, so tests stay fast.
TINY_VIT = [
    "model.patch_size=4",
    "model.in_chans=1",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.mlp_ratio=2.0",
]

# The tiny MAE run on 16x16 digits that the resume and launch tests train.
TINY = [
    "model.img_size=16",
    *TINY_VIT,
    "model.pos_embed=sincos",
    "objective.mae.decoder_embed_dim=32",
    "objective.mae.decoder_depth=1",
    "objective.mae.decoder_num_heads=2",
    "objective.mae.mask_ratio=0.5",
    "optim.base_lr=1e-3",
    "data.batch_size=32",
    "data.num_workers=0",
    "run.progress=false",
    "run.trackers=[jsonl]",
    "run.log_every=1",
]


def tiny_overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    """The tiny MAE run on `shards`, writing to `out`, as command-line overrides."""
    return [*TINY, f"data.train={shards}", f"run.out_dir={out}", *extra]


def tiny_recipe(shards: Path, out: Path, *extra: str) -> Recipe:
    return load_recipe(None, tiny_overrides(shards, out, *extra))


def params(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint folder's weights."""
    return load_file(str(path / "model.safetensors"))


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment plus `extra`, with the project importable and no WORLD_SIZE inherited from a launcher."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    return env


def torchrun_two_cpu(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 SCRIPT ARGS` on CPU (gloo), one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *map(str, args)]
    env = subprocess_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def kl_divergence(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || q) = sum p (log p - log q): the reference for DINO's `st_kl` (loss - entropy)."""
    p = p.float()
    return (torch.special.xlogy(p, p) - p * log_q.float()).sum(dim=-1).mean()
