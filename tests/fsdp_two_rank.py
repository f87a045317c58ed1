"""Run by torchrun in tests/test_fsdp.py: the trainer with `run.fsdp` (or plain DDP) on two CPU processes (gloo).

Accelerate 1.15 applies its FSDP plugin only to GPU processes; torch's FSDP2 itself runs on CPU over gloo. With
`--lift-gpu-gate` this script lifts exactly that gate: it builds the CPU Accelerator as usual, then marks its state
FSDP with the trainer's own plugin, so Accelerate's FSDP2 preparation (`fully_shard` per block, optimizer
re-pointing), our trainer, the sharded gradient clipping and the gathered checkpoints all run for real.

Each rank writes fsdp_rank{r}.json: the wrapping it found (FSDP units, local shard sizes) and the run's result.
Not a test itself (no test_ prefix).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pretrain.trainer as trainer_module
from pretrain.launch import fsdp_plugin, make_accelerator
from pretrain.recipe import load_recipe


def cpu_fsdp_accelerator(**kwargs):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    kwargs.pop("fsdp")
    acc = make_accelerator(fsdp=False, **kwargs)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = fsdp_plugin()
    return acc


def main() -> None:
    args = sys.argv[1:]
    lift = args[0] == "--lift-gpu-gate"
    if lift:
        args = args[1:]
        trainer_module.make_accelerator = cpu_fsdp_accelerator
    out, overrides = Path(args[0]), args[1:]
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    trainer = trainer_module.Trainer(load_recipe(None, overrides))
    model = trainer.model
    units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    shards = {name: [list(p.to_local().shape), list(p.shape)] for name, p in model.named_parameters()
              if isinstance(p, DTensor)}
    optimizer_params = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
    optimizer_dtensors = sum(isinstance(p, DTensor) for g in trainer.optimizer.param_groups for p in g["params"])
    result = trainer.fit()
    rank = trainer.accelerator.process_index
    (out / f"fsdp_rank{rank}.json").write_text(json.dumps({
        "sharded": trainer.sharded, "units": units, "shards": shards,
        "optimizer_params": optimizer_params, "optimizer_dtensors": optimizer_dtensors,
        "steps": result.steps, "checkpoint": str(result.checkpoint),
        "backbone_dir": str(result.backbone_dir) if result.backbone_dir else None,
    }))


if __name__ == "__main__":
    main()
