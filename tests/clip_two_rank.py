"""Run by torchrun in test_clip.py: CLIP across 2 gloo ranks. Not a test itself (no test_ prefix).

1. One fixed global batch (the first 2 x batch_size digits), rank r takes half r. For each (local_loss,
   gather_with_grad) setting the rank's loss and its gradients, averaged over ranks as DDP averages them, go to
   OUT/rank{r}.json and (rank 0) OUT/grads_{setting}.safetensors, with the initial weights and the global batch,
   so the test can compare with one process on the whole batch.
2. A few real trainer steps; each rank writes a digest of its parameters.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from pretrain.recipe import load_recipe
from pretrain.trainer import Trainer
from shards.stream import ShardStream

SETTINGS = [(True, True), (False, True), (False, False), (True, False)]


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    recipe = load_recipe(None, overrides)
    trainer = Trainer(recipe)
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    # A copy outside DDP: its parameters carry none of DDP's gradient hooks.
    objective = copy.deepcopy(trainer.unwrapped_objective)
    b = recipe.data.batch_size
    stream = ShardStream(recipe.data.train, batch_size=world * b, transform=objective.eval_transform(),
                         shuffle=False, rank=0, world_size=1)
    full = next(iter(stream.loader()))
    mine = {k: full[k][rank * b:(rank + 1) * b] for k in ("image", "label", "index", "caption", "key")}
    if rank == 0:
        state = {k: v.detach().contiguous() for k, v in objective.state_dict().items()}
        save_file(state, str(out / "initial.safetensors"))
        save_file({"image": full["image"].contiguous(), "label": full["label"], "index": full["index"]},
                  str(out / "batch.safetensors"))
    report: dict = {"rank": rank, "world": world, "loss": {}}
    for local_loss, gather_with_grad in SETTINGS:
        name = f"local{int(local_loss)}_grad{int(gather_with_grad)}"
        objective.cfg.local_loss, objective.cfg.gather_with_grad = local_loss, gather_with_grad
        objective._losses.clear()
        objective.zero_grad(set_to_none=True)
        loss, _ = objective(mine)
        loss.backward()
        grads = {}
        for n, p in objective.named_parameters():
            if p.grad is not None:
                g = p.grad.detach().clone()
                dist.all_reduce(g)
                grads[n] = (g / world).contiguous()
        report["loss"][name] = float(loss.detach())
        if rank == 0:
            save_file(grads, str(out / f"grads_{name}.safetensors"))

    trainer.fit()
    digest = hashlib.sha256()
    for n, p in sorted(trainer.unwrapped_objective.named_parameters()):
        digest.update(n.encode() + p.detach().cpu().numpy().tobytes())
    report["params"] = digest.hexdigest()
    report["steps"] = trainer.state.step
    report["global_batch"] = trainer.global_batch
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
