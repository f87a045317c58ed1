"""Host reads of tensor values per optimizer update, and the update time, for each objective's trainer loop;
prints JSON.

A host read (`.item()`, `float(t)`, `int(t)`, `bool(t)`, `.tolist()`, `.numpy()`, `.cpu()`) of a tensor on a GPU
waits for every kernel queued before it: the queue drains, and the next step's kernels start late. On this CPU
machine nothing waits, but the calls are the same, so counting them in the training process tells how many times a
GPU run would stall per update. Decoding and per-sample views run in a DataLoader worker process
(data.num_workers=1), whose reads of its CPU tensors are not counted. Each objective's Fashion-MNIST recipe, shrunk to a tiny ViT, trains `--steps`
updates on the built-in digits with `run.log_every` 20 (the recipes' cadence): the reads that happen only at log
steps and the ones on every update are told apart as `per_update` (median over updates that log nothing) and
`per_logged_update`.

    OMP_NUM_THREADS=2 python bench/step_syncs.py [--quick] [--steps 60]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from pretrain.recipe import load_recipe  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402

RECIPES = {name: ROOT / "recipes" / f"{name}_vit_tiny_fmnist.yaml" for name in ("mae", "dino", "clip", "finetune")}
TINY = ["model.img_size=16", "model.patch_size=4", "model.in_chans=1", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "model.mlp_ratio=2.0", "data.batch_size=32", "data.num_workers=1", "data.val=''",
        "objective.mae.decoder_embed_dim=32", "objective.mae.decoder_depth=1", "objective.mae.decoder_num_heads=2",
        "objective.mae.mean=[]", "objective.mae.std=[]", "objective.dino.out_dim=256", "objective.dino.hidden_dim=64",
        "objective.dino.bottleneck_dim=32", "objective.dino.global_crop_size=16", "objective.dino.local_crop_size=8",
        "objective.dino.local_crops_number=2", "objective.dino.mean=[]", "objective.dino.std=[]",
        "objective.clip.mean=[]", "objective.clip.std=[]", "objective.clip.text_width=32", "objective.clip.text_layers=1",
        "objective.clip.text_heads=2", "objective.clip.embed_dim=32", "objective.supervised.mean=[]",
        "objective.supervised.std=[]", "objective.supervised.init_from=''", "run.progress=false",
        "run.visualize=false", "run.trackers=[jsonl]", "run.log_every=20", "eval.enabled=false",
        "run.checkpoint_every_minutes=0", "run.max_minutes=0", "run.fit_to_max_minutes=false", "optim.warmup_steps=5"]
READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu")


class HostReads:
    """Counts host reads of tensor values while active (wraps the Tensor methods that read them), and where they
    come from (the calling file and function)."""

    def __init__(self) -> None:
        self.count = 0
        self.sites: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, object] = {}

    def __enter__(self) -> HostReads:
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, __original=original, **kwargs):
                self.count += 1
                caller = sys._getframe(1)
                where = Path(caller.f_code.co_filename)
                self.sites[f"{where.parent.name}/{where.name}:{caller.f_code.co_name}"] += 1
                return __original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def measure(objective: str, shards: Path, out: Path, steps: int, extra: tuple[str, ...] = ()) -> dict:
    recipe = load_recipe(RECIPES[objective], [f"data.train={shards}", f"run.out_dir={out}", f"run.max_steps={steps}",
                                              *TINY, *extra])
    trainer = Trainer(recipe)
    per_update: list[tuple[int, int, float]] = []  # (step, reads, seconds) of each update
    reads = HostReads()
    mark = {"reads": 0, "t": time.perf_counter()}

    hook = trainer.unwrapped_objective.on_step_end

    def on_step_end_hook(step: int, total: int) -> dict:
        out = hook(step, total)
        now = time.perf_counter()
        per_update.append((step, reads.count - mark["reads"], now - mark["t"]))
        mark["reads"], mark["t"] = reads.count, now
        return out

    trainer.unwrapped_objective.on_step_end = on_step_end_hook
    with reads:
        trainer.fit()
    log_every = recipe.run.log_every
    # the update that logs is counted with the next one (the hook runs before the log row is written)
    quiet = [r for s, r, _ in per_update[5:] if s % log_every not in (0, 1)]
    logged = [r for s, r, _ in per_update[5:] if s % log_every == 1]
    seconds = [t for _, _, t in per_update[5:]]
    updates = len(per_update)
    return {"updates": updates, "per_update": statistics.median(quiet) if quiet else None,
            "per_logged_update": statistics.median(logged) if logged else None,
            "total_reads": reads.count, "update_ms_median": round(1000 * statistics.median(seconds), 2),
            # the callers, reads per update averaged over the run (start-up and the end's export included)
            "sites": {k: round(n / updates, 2) for k, n in reads.sites.most_common(8)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12 updates of MAE and DINO only, logged every 4th, 512 digits (a smoke check)")
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    from shards.sources import SampleSource, digits_source
    from shards.writer import write_shard_set

    t0 = time.perf_counter()
    objectives = ("mae", "dino") if a.quick else tuple(RECIPES)
    steps = 12 if a.quick else a.steps
    # --quick: a log row every 4th update, so 12 updates still have quiet and logged ones past the first 5
    extra = ("run.log_every=4",) if a.quick else ()
    result: dict = {"benchmark": "step_syncs", "quick": a.quick, "steps": steps, "device_type": "cpu",
                    "threads": torch.get_num_threads(), "objectives": {}}
    with tempfile.TemporaryDirectory() as tmp:
        source = digits_source()
        if a.quick:  # the first 512 digits: enough batches of 32 for 12 updates
            whole = source
            source = SampleSource(whole.description, whole.classes, 512,
                                  lambda skip: itertools.islice(whole.generate(skip), 512))
        shards = Path(tmp) / "digits"
        write_shard_set(source, shards, classes=source.classes, source=source.description)
        for name in objectives:
            result["objectives"][name] = measure(name, shards, Path(tmp) / name, steps, extra)
    result["total_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
