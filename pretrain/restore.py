"""Get a trained backbone back from whatever a user points at: a run folder, a checkpoint, or an export.

    runs/mae/                      -> runs/mae/backbone/ if exported, else its newest checkpoint
    runs/mae/checkpoints/step_N/   -> the `backbone.*` weights of the objective + backbone_config.json
    exported/                      -> model.safetensors + config.json (what `export_backbone` writes)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.backbone import load_backbone, model_from_config
from pretrain.checkpoint import CheckpointError, latest_checkpoint, load_model_state


def resolve_weights_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint, run or exported backbone at {p}")
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if (p / "backbone_config.json").is_file():
        return p
    if (p / "backbone" / "config.json").is_file():
        return p / "backbone"
    ckpt = latest_checkpoint(p)
    if ckpt is not None:
        return ckpt
    raise FileNotFoundError(
        f"{p} holds no backbone: expected an exported backbone (config.json + model.safetensors), "
        f"a checkpoint (backbone_config.json + model.safetensors) or a run folder with either"
    )


def load_backbone_from(path: str | Path) -> torch.nn.Module:
    """A timm VisionTransformer with the trained weights, in eval mode."""
    d = resolve_weights_dir(path)
    if (d / "config.json").is_file():
        model = load_backbone(d)
    else:
        try:
            config = json.loads((d / "backbone_config.json").read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{d / 'backbone_config.json'} is corrupt: {e}") from e
        try:  # only architecture keys reach timm: never `pretrained`, a checkpoint path or a hub name
            model = model_from_config(config, d / "backbone_config.json")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        state = load_model_state(d)
        sub = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        if not sub:
            raise CheckpointError(f"{d / 'model.safetensors'} has no backbone.* weights")
        missing, unexpected = model.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{d} does not match its backbone_config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
