"""The pictures at the end of a run (main process): the objective's own picture of a few fixed images, and the
loss and k-NN curves read off metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pretrain.device_batch import to_device
from pretrain.evaluate import knn_curve_png
from pretrain.metrics_log import loss_curve_png
from pretrain.recipe import Recipe
from shards.stream import ShardStream


def fixed_batch(recipe: Recipe, transform: Any, device: torch.device) -> dict | None:
    """A few un-augmented images for pictures (the same ones at every call)."""
    d = recipe.data
    source = d.val or d.train
    s = ShardStream(
        source,
        batch_size=8,
        num_workers=0,
        transform=transform,
        mode="exact",
        remainder="pad",
        shuffle=False,
        rank=0,
        world_size=1,
        max_bad_fraction=d.max_bad_fraction,
    )
    for batch in s.loader():
        return to_device(batch, device)
    return None


def run_pictures(obj: torch.nn.Module, transform: Any, recipe: Recipe, accelerator: Any, out_dir: Path, step: int,
                 metrics_path: Path) -> list[Path]:
    out = []
    batch = fixed_batch(recipe, transform, accelerator.device)
    if batch is not None:
        was_training = obj.training
        obj.eval()
        with torch.no_grad(), accelerator.autocast():
            p = obj.visualize(batch, out_dir / "pictures" / f"{recipe.objective.name}_step{step:08d}.png")
        obj.train(was_training)
        if p is not None:
            out.append(Path(p))
    for draw, name in ((loss_curve_png, "loss_curve.png"), (knn_curve_png, "knn_curve.png")):
        curve = draw(metrics_path, out_dir / "pictures" / name)
        if curve is not None:
            out.append(curve)
    return out
