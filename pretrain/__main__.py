"""`python -m pretrain RECIPE.yaml [section.key=value ...]` (also under `accelerate launch -m pretrain ...`).

    python -m pretrain recipes/mae_vit_tiny_fmnist.yaml run.out_dir=runs/mae optim.base_lr=3e-4
    python -m pretrain recipes/mae_vit_tiny_fmnist.yaml --print      # check + show the resolved recipe, run nothing
    python -m pretrain recipes/mae_vit_tiny_fmnist.yaml --print run.epochs=2   # flags go anywhere
    python -m pretrain export runs/mae --out exported/                # backbone -> safetensors + config.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pretrain.recipe import RecipeError, load_recipe


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain export", description="Export a run's backbone for timm.")
    p.add_argument("run", help="run folder, checkpoint folder, or exported backbone folder")
    p.add_argument("--out", required=True, help="folder for model.safetensors + config.json")
    a = p.parse_args(argv)
    from pretrain.backbone import data_stats, export_backbone
    from pretrain.restore import load_backbone_from

    model = load_backbone_from(a.run)
    path = export_backbone(model, a.out, *data_stats(model))  # the training normalisation goes along
    print(json.dumps({"exported": str(path)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        return _export(argv[1:])
    p = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=3e-4 run.out_dir=runs/x")
    p.add_argument("--print", action="store_true",
                   help="validate like a training run, print the resolved recipe and exit (anywhere on the line)")
    # Intermixed: flags may come anywhere, e.g. `recipe.yaml --print run.epochs=2` (plain parse_args stops the
    # overrides at the first flag and then refuses the rest as unrecognised).
    a = p.parse_intermixed_args(argv)
    try:
        recipe = load_recipe(a.recipe, a.overrides)
    except (RecipeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.print:
        print(f"# {recipe.auto_note}\n" if recipe.auto_note else "", end="")
        print(recipe.to_yaml())
        return 0
    from pretrain.checkpoint import CheckpointError
    from pretrain.launch import LaunchError
    from pretrain.trainer import RunInputError, TrainingDiverged, train

    try:
        result = train(recipe)
    except RunInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (LaunchError, TrainingDiverged, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.summary(), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
