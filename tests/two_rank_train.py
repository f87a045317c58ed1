"""Run by torchrun in test_two_cpu_processes_train_in_sync: train a few steps, then write what this rank saw.

Each rank writes rank{r}.json: the sample indices its objective received and a digest of every parameter
after training, so the test can compare ranks. Not a test itself (no test_ prefix).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from pretrain.recipe import load_recipe
from pretrain.trainer import Trainer


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    trainer = Trainer(load_recipe(None, overrides))
    objective = trainer.unwrapped_objective
    seen: list[int] = []
    forward = objective.forward

    def recording_forward(batch):
        seen.extend(batch["index"].tolist())
        return forward(batch)

    objective.forward = recording_forward
    trainer.fit()
    digest = hashlib.sha256()
    for name, p in sorted(objective.named_parameters()):
        digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
    rank = trainer.accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": trainer.accelerator.num_processes, "seen": seen,
        "params": digest.hexdigest(), "global_batch": trainer.global_batch, "lr": trainer.lr,
    }))


if __name__ == "__main__":
    main()
