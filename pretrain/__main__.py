"""`python -m pretrain RECIPE.yaml [section.key=value ...]` (also under `accelerate launch -m pretrain ...`).

    python -m pretrain recipes/mae_vit_tiny_fmnist.yaml run.out_dir=runs/mae optim.base_lr=3e-4
    python -m pretrain recipes/mae_vit_tiny_fmnist.yaml --print      # check + show the resolved recipe, run nothing
    python -m pretrain recipes/mae_vit_tiny_fmnist.yaml --print run.epochs=2   # flags go anywhere
    python -m pretrain export runs/mae --out exported/                # backbone -> safetensors + config.json
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from pretrain.recipe import RecipeError, load_recipe


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain export", description="Export a run's backbone for timm.")
    p.add_argument("run", help="run folder, checkpoint folder, or exported backbone folder")
    p.add_argument("--out", required=True, help="folder for model.safetensors + config.json (a new or empty one)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    a = p.parse_args(argv)
    from pretrain.backbone import data_stats, export_backbone
    from pretrain.restore import load_backbone_from

    model = load_backbone_from(a.run)
    path = export_backbone(model, a.out, *data_stats(model), overwrite=a.overwrite)  # with the training normalisation
    print(json.dumps({"exported": str(path)}))
    return 0


def _one_line(e: BaseException) -> str:
    """An error's message on one line (a DataLoader worker's re-raised error carries its traceback: its last line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    return lines[-1] if "Traceback" in str(e) else lines[0]


# What to do about a failed read or write, by cause; the default fits the rest.
_OS_FIX = {
    errno.ENOSPC: "free space there or set run.out_dir to a larger disk",
    errno.EDQUOT: "free space there or set run.out_dir to a larger disk",
    errno.EACCES: "make it writable or set run.out_dir elsewhere",
    errno.EPERM: "make it writable or set run.out_dir elsewhere",
    errno.EROFS: "set run.out_dir to a writable disk",
}


def _os_error_line(e: OSError, out_dir: str, resumes: bool) -> str:
    """`error: PATH: no space left on device (ENOSPC); free space ... and relaunch`: the path (the run folder when
    the error names none), the cause in words, errno's name and what to do."""
    path = e.filename or out_dir
    cause = e.strerror or _one_line(e)
    name = f" ({errno.errorcode[e.errno]})" if e.errno in errno.errorcode else ""
    then = "relaunch: it resumes from the last complete checkpoint" if resumes else "relaunch"
    return f"error: {path}: {cause[:1].lower()}{cause[1:]}{name}; {_OS_FIX.get(e.errno, 'fix that')} and {then}"


def _export_one_line(argv: list[str]) -> int:
    """`export`, its refusals (a refused config, a damaged checkpoint, an unwritable --out) as one line."""
    from pretrain.checkpoint import CheckpointError

    try:
        return _export(argv)
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {_one_line(e)}",
              file=sys.stderr)
        return 1
    except (CheckpointError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _train(recipe) -> int:
    from pretrain.checkpoint import CheckpointError, as_os_error
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
    except Exception as e:  # a disk that filled, a folder that became unwritable: the path and the cause, one line
        err = as_os_error(e, recipe.run.out_dir)
        if err is None:
            raise
        print(_os_error_line(err, recipe.run.out_dir, recipe.run.resume == "auto"), file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.summary(), allow_nan=False))
    return 0


def _print(recipe) -> int:
    from pretrain.trainer import RunInputError, check_inputs

    try:  # the shard sets too, as a training run checks them before any compute
        check_inputs(recipe)
    except RunInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {recipe.auto_note}\n" if recipe.auto_note else "", end="")
    print(recipe.to_yaml())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        return _export_one_line(argv[1:])
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
    except OSError as e:  # a recipe that cannot be read (permissions, a damaged disk)
        print(f"error: {e.filename or a.recipe}: {e.strerror or _one_line(e)}", file=sys.stderr)
        return 2
    return _print(recipe) if a.print else _train(recipe)


if __name__ == "__main__":
    sys.exit(main())
