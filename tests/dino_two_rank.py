"""Run by torchrun in test_dino.py: one DINO forward per rank on rank-specific views, then write what it saw.

Each rank writes rank{r}.json: the sum and count of its teacher outputs and the centre after the forward, so
the test can check the centre is the momentum average of the mean over *both* ranks' batches. The ranks get
different batch sizes (3 and 5): the centre is the mean over the global batch, not a mean of rank means.
Not a test itself (no test_ prefix).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.objectives import build_objective
from pretrain.objectives.dino import N_GLOBAL, _multicrop_embed
from pretrain.recipe import load_recipe


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same model on both ranks
    dino = build_objective(load_recipe(None, overrides))
    cfg = dino.cfg
    g = torch.Generator().manual_seed(100 + rank)
    b = 3 + 2 * rank
    views = [torch.randn(b, 1, 16, 16, generator=g) for _ in range(N_GLOBAL)]
    views += [torch.randn(b, 1, cfg.local_crop_size, cfg.local_crop_size, generator=g)
              for _ in range(cfg.local_crops_number)]
    with torch.no_grad():
        teacher_out = dino.teacher_head(_multicrop_embed(dino.backbone, views[:N_GLOBAL]))
    before = dino.loss_fn.center.clone()
    loss, _ = dino({"image": views})
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": dist.get_world_size(), "loss": float(loss),
        "sum": teacher_out.double().sum(0).tolist(), "count": teacher_out.shape[0],
        "before": before[0].tolist(), "center": dino.loss_fn.center[0].tolist(),
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
