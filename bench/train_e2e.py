"""End-to-end training images/s on real shards (stream -> views -> step), DINO and MAE side by side in one run,
each beside its step-only rate; prints JSON.

- DINO (`recipes/dino_vit_tiny_fmnist.yaml`): the multi-crop views made per sample in the DataLoader worker
  (`objective.dino.augment=pil`) and on the batch in the training process (`augment=batched`).
- MAE (`recipes/mae_vit_tiny_fmnist.yaml`): its one random-resized crop + flip per sample in the worker (PIL,
  ~5,000 images/s per worker, the cheap path the batched one exists to spare DINO).

Each variant is a real `Trainer` run of its recipe (data.num_workers=1, as the recipes) for `--steps` updates on
shards written from the Fashion-MNIST IDX files (or the built-in digits at 28x28 when Fashion-MNIST is absent);
the variants alternate `--repeats` times (a busy machine slows all alike) and each reports the median
`samples_per_s` the trainer logged after its first 5 updates (start-up excluded). The step-only rate is the same
model and optimizer on inputs made once, no data loading: the ceiling the end-to-end rates are held to
(`ratio_to_step`; the issue's goal is >= 0.9 on 2 cores).

    OMP_NUM_THREADS=2 python bench/train_e2e.py [--quick] [--steps 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from pretrain.objectives import build_objective  # noqa: E402
from pretrain.recipe import load_recipe  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402

FMNIST_DIR = Path(os.environ.get("VITSSL_FMNIST_DIR", ROOT.parent / "shared" / "datasets" / "fashion-mnist"))
RECIPES = {"dino": ROOT / "recipes" / "dino_vit_tiny_fmnist.yaml", "mae": ROOT / "recipes" / "mae_vit_tiny_fmnist.yaml"}
# (objective, how its views are made, overrides): the variants that alternate
VARIANTS = (("dino", "pil", ["objective.dino.augment=pil"]), ("dino", "batched", ["objective.dino.augment=batched"]),
            ("mae", "worker", []))
# --quick: a tiny model of each objective, a smoke check of the same code
TINY = {
    "dino": ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "objective.dino.out_dim=256",
             "objective.dino.hidden_dim=64", "objective.dino.bottleneck_dim=32", "data.batch_size=32"],
    "mae": ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "objective.mae.decoder_embed_dim=32",
            "objective.mae.decoder_depth=1", "objective.mae.decoder_num_heads=2", "data.batch_size=32"],
}
QUIET = ["run.progress=false", "run.visualize=false", "run.trackers=[jsonl]", "run.log_every=1", "eval.enabled=false",
         "run.checkpoint_every_minutes=0", "run.max_minutes=0", "run.fit_to_max_minutes=false", "data.val=''"]


def write_shards(folder: Path, limit: int) -> tuple[Path, str]:
    from itertools import islice

    from shards.sources import FASHION_MNIST_CLASSES, digits_source, find_mnist_files, idx_source
    from shards.writer import write_shard_set

    if FMNIST_DIR.is_dir():
        images, labels = find_mnist_files(FMNIST_DIR)["train"]
        source, name = idx_source(images, labels, classes=FASHION_MNIST_CLASSES), "fashion-mnist"
    else:
        source, name = digits_source(), "digits (Fashion-MNIST absent)"
    write_shard_set(islice(source, limit), folder, classes=getattr(source, "classes", None), source=name)
    return folder, name


def trained_rate(objective: str, shards: Path, out: Path, steps: int, extra: list[str]) -> float:
    r = load_recipe(RECIPES[objective], [f"data.train={shards}", f"run.out_dir={out}", f"run.max_steps={steps}", *QUIET, *extra])
    Trainer(r).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [row["samples_per_s"] for row in rows if row["step"] > 5]
    return statistics.median(rates)


def step_only_rate(objective: str, shards: Path, steps: int, extra: list[str]) -> float:
    """The recipe's model, loss and AdamW step on one batch of inputs made beforehand (no loading, no views)."""
    recipe = load_recipe(RECIPES[objective], [f"data.train={shards}", *QUIET, *extra])
    obj = build_objective(recipe).train()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    b, c = recipe.data.batch_size, recipe.model.in_chans
    if objective == "dino":
        dino = recipe.objective.dino
        sizes = [obj.global_size] * 2 + [dino.local_crop_size] * dino.local_crops_number
        batch = {"image": [torch.randn(b, c, s, s, generator=g) for s in sizes]}
    else:
        batch = {"image": torch.randn(b, c, recipe.model.img_size, recipe.model.img_size, generator=g)}
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss, _ = obj(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.on_step_end(i, steps)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return b / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 8 steps, one repeat, 512 images: a smoke check")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    steps, repeats = (8, 1) if a.quick else (a.steps, a.repeats)  # quick: rows of steps 6-8 give the rates
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shards, data = write_shards(Path(tmp) / "shards", 512 if a.quick else 12_000)
        rates: dict[tuple[str, str], list[float]] = {(o, m): [] for o, m, _ in VARIANTS}
        for rep in range(repeats):
            for objective, mode, extra in VARIANTS:
                out = Path(tmp) / f"{objective}_{mode}_{rep}"
                tiny = TINY[objective] if a.quick else []
                rates[objective, mode].append(trained_rate(objective, shards, out, steps, [*tiny, *extra]))
        step_only_steps = 5 if a.quick else max(8, steps // 2)  # the first 3 untimed
        step = {o: step_only_rate(o, shards, step_only_steps, TINY[o] if a.quick else []) for o in RECIPES}
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {"bench": "train_e2e", "quick": a.quick, "data": data, "steps": steps, "repeats": repeats,
              "threads": torch.get_num_threads()}
    for objective, recipe in RECIPES.items():
        result[objective] = {
            "recipe": recipe.name,
            "step_only_images_per_s": round(step[objective], 1),
            "end_to_end": {m: {"images_per_s": round(v, 1), "runs": [round(x, 1) for x in rates[o, m]],
                               "ratio_to_step": round(v / step[objective], 3)}
                           for (o, m), v in med.items() if o == objective},
        }
    result["dino"]["batched_over_pil"] = round(med["dino", "batched"] / med["dino", "pil"], 3)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
