"""CLIP training-step throughput for the Fashion-MNIST recipe (recipes/clip_vit_tiny_fmnist.yaml).

One step = the objective's forward (image tower, text tower, open_clip ClipLoss) + backward + the recipe's
AdamW step (timm's optimizer factory, as the trainer builds it), on random 28x28 gray images with class-name
captions drawn from the recipe's templates, as training makes them. Two variants, same weights, interleaved
round by round so a busy machine slows both alike:

  clip_step              the objective as it trains: identical captions go through the text tower once per step
  every_caption_encoded  the naive step: every caption of the batch through the text tower
  image_tower_only       a supervised step on the same image tower (+ a 10-way linear head, cross-entropy): the
                         floor, so clip_step / image_tower_only is what the text tower and the loss cost

images/s is the batch size over the median step time (the best step is reported too: on a shared machine it is
the least disturbed one). The data pipeline (PNG decode + crop in a DataLoader worker) is not included; the
trainer logs end-to-end samples_per_s in metrics.jsonl.

    OMP_NUM_THREADS=2 python bench/clip_step.py [--quick] [--batch-size 256] [--threads 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

from pretrain.backbone import create_backbone  # noqa: E402
from pretrain.objectives.clip import CLIP  # noqa: E402
from pretrain.recipe import load_recipe  # noqa: E402
from pretrain.trainer import scaled_lr  # noqa: E402
from shards.sources import resolve_classes  # noqa: E402

RECIPE = ROOT / "recipes" / "clip_vit_tiny_fmnist.yaml"
VARIANTS = ("clip_step", "every_caption_encoded", "image_tower_only")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 16, 2 image-tower blocks, few steps (a smoke check), same JSON shape")
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (quick: 16)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 5, quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def build(recipe, device: torch.device) -> tuple[CLIP, torch.optim.Optimizer]:
    torch.manual_seed(0)  # every variant starts from the same weights
    model = CLIP(create_backbone(recipe.model), recipe.objective.clip, captions="classes",
                 class_names=resolve_classes("fashion-mnist"), templates=recipe.data.caption_templates)
    model.class_head = torch.nn.Linear(recipe.objective.clip.embed_dim, 10)  # used by image_tower_only only
    model = model.to(device)
    optim = recipe.optim
    opt = create_optimizer_v2(model, opt=optim.name, lr=scaled_lr(optim.base_lr, recipe.data.batch_size),
                              weight_decay=optim.weight_decay, betas=tuple(optim.betas), eps=optim.eps)
    return model.train(), opt


def every_caption_loss(model: CLIP, batch: dict) -> torch.Tensor:
    """The objective's loss without caption de-duplication (same value, more text-tower work)."""
    tokens = model.tokenize(model.captions_for(batch)).to(batch["image"].device)
    image = F.normalize(model.encode_image(batch["image"]).float(), dim=-1)
    text = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return model.clip_loss()(image, text, model.logit_scale.exp())


def train_steps(model: CLIP, opt, batch: dict, n: int, variant: str) -> list[float]:
    device = batch["image"].device
    sync = torch.cuda.synchronize if batch["image"].is_cuda else (lambda: None)
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        if variant == "clip_step":
            loss = model(batch)[0]
        elif variant == "every_caption_encoded":
            loss = every_caption_loss(model, batch)
        else:
            loss = F.cross_entropy(model.class_head(model.encode_image(batch["image"])), batch["label"].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.on_step_end(0, 1)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # --quick: 2 image-tower blocks (the recipe's 6 otherwise): the same code path, a smoke check
    recipe = load_recipe(args.recipe, ["model.depth=2"] if args.quick else None)
    b = args.batch_size or (16 if args.quick else recipe.data.batch_size)
    g = torch.Generator().manual_seed(0)
    model_cfg = recipe.model
    batch = {
        "image": torch.randn(b, model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size, generator=g).to(device),
        "label": torch.randint(0, 10, (b,), generator=g),
        "index": torch.arange(b),
        "caption": [""] * b,
        "key": [str(i) for i in range(b)],
    }
    models = {name: build(recipe, device) for name in VARIANTS}
    for name, (model, opt) in models.items():
        train_steps(model, opt, batch, args.warmup, name)
    step_s: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (model, opt) in models.items():
            step_s[name] += train_steps(model, opt, batch, args.steps, name)

    model = models["clip_step"][0]
    captions = model.captions_for(batch)
    result: dict = {
        "benchmark": "clip_step",
        "quick": args.quick,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "config": {
            "recipe": str(Path(args.recipe).relative_to(ROOT) if Path(args.recipe).is_relative_to(ROOT) else args.recipe),
            "image_tower": f"ViT embed {model.backbone.embed_dim}, depth {len(model.backbone.blocks)}, "
                           f"img {model_cfg.img_size}x{model_cfg.img_size}x{model_cfg.in_chans}, "
                           f"patch {model_cfg.patch_size}",
            "text_tower": f"width {model.cfg.text_width}, layers {model.cfg.text_layers}, "
                          f"context {model.cfg.text_context_length}",
            "batch_size": b,
            "distinct_captions_per_batch": len(set(captions)),
            "timed_steps_per_round": args.steps,
            "rounds": args.rounds,
            "step": "forward + backward + AdamW step + logit-scale clamp; random images, class-name captions",
        },
    }
    for name in VARIANTS:
        median, best = statistics.median(step_s[name]), min(step_s[name])
        result[name] = {
            "images_per_s": round(b / median, 2),
            "images_per_s_best_step": round(b / best, 2),
            "step_ms_median": round(1000 * median, 1),
            "timed_steps": len(step_s[name]),
        }
    a, c, i = result["every_caption_encoded"], result["clip_step"], result["image_tower_only"]
    result["speedup_dedup_over_every_caption"] = round(c["images_per_s"] / a["images_per_s"], 3)
    result["speedup_dedup_best_steps"] = round(c["images_per_s_best_step"] / a["images_per_s_best_step"], 3)
    result["clip_over_image_tower_only"] = round(c["images_per_s"] / i["images_per_s"], 3)
    result["clip_over_image_tower_only_best_steps"] = round(c["images_per_s_best_step"] / i["images_per_s_best_step"], 3)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
