"""The backbone: always a timm `VisionTransformer`, never a fork.

* `create_backbone(cfg)` builds it by name (+ optional dimension overrides) with a dynamic image size,
  so crops of another resolution (DINO's local views) go through the same model.
* `forward_visible` runs the encoder on a subset of patch tokens (MAE: masked patches cost nothing);
  `forward_masked` runs every token with masked ones replaced by a mask token (MAE's baseline, SimMIM).
  Both are written against timm's own parts, so they follow timm's forward exactly.
* `export_backbone` / `load_backbone`: `model.safetensors` + `config.json`, where the config is the kwargs of
  `timm.create_model(**config)`, so an exported backbone loads without any code of this project.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.layers import build_sincos2d_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from pretrain.recipe import ModelConfig
from pretrain.transforms import normalize_stats
from shards.atomic import atomic_path, fsync_file
from shards.ownership import claim_output, mark_output

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def sincos_2d_pos_embed(grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, shape (1, num_prefix_tokens + H*W, dim); prefix rows are zero.

    Token i = h*W + w (row-major, as patches are flattened). Channel layout (timm's, each dim/4 wide):
    [sin(h*f), sin(w*f), cos(h*f), cos(w*f)] with f_k = 10000^(-k/(dim/4)), the frequencies MAE uses.
    """
    if dim % 4:
        raise ValueError(f"sin-cos 2-D position embedding needs embed_dim divisible by 4, got {dim}")
    grid = build_sincos2d_pos_embed(list(grid_size), dim=dim)
    return torch.cat([torch.zeros(num_prefix_tokens, dim), grid], dim=0).unsqueeze(0)


def create_backbone(cfg: ModelConfig, device: torch.device | str | None = None) -> VisionTransformer:
    """Build the timm ViT the recipe's `model` section describes (random init; never downloads weights)."""
    cfg.validate()
    kwargs: dict[str, Any] = dict(
        pretrained=False,
        num_classes=0,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        drop_path_rate=cfg.drop_path_rate,
        dynamic_img_size=True,
    )
    for key in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
        if getattr(cfg, key):
            kwargs[key] = getattr(cfg, key)
    try:
        model = timm.create_model(cfg.name, device=device, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ValueError(f"model.name={cfg.name!r}: {e}") from None
    except TypeError as e:  # a non-ViT architecture rejects the ViT kwargs
        raise ValueError(f"model.name={cfg.name!r} is not a timm VisionTransformer ({e})") from None
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"model.name={cfg.name!r} builds a {type(model).__name__}, not a timm VisionTransformer"
        )
    if cfg.pos_embed == "sincos":
        if model.pos_embed is None:
            raise ValueError(f"model.name={cfg.name!r} has no absolute position embedding to make sin-cos")
        n_prefix = model.pos_embed.shape[1] - model.patch_embed.num_patches
        fixed = sincos_2d_pos_embed(model.patch_embed.grid_size, model.embed_dim, n_prefix)
        with torch.no_grad():
            model.pos_embed.copy_(fixed)
        model.pos_embed.requires_grad_(False)  # fixed, as in MAE
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # torch.compile wraps the module; its weights and config are the original's.
    return getattr(model, "_orig_mod", model)


def backbone_config(model_or_cfg: VisionTransformer | ModelConfig) -> dict[str, Any]:
    """Kwargs such that `timm.create_model(**config)` rebuilds the same architecture (JSON-serialisable).

    Training-only settings (drop_path_rate, grad checkpointing) are left out: they change no weight.
    """
    if isinstance(model_or_cfg, ModelConfig):
        model = create_backbone(model_or_cfg, device="meta")  # shapes only, no memory, no init cost
    else:
        model = _unwrap(model_or_cfg)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise ValueError("model has no pretrained_cfg['architecture']: build it with timm.create_model")
    embed_dim = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features if len(model.blocks) else 4 * embed_dim
    mlp_ratio = hidden / embed_dim
    if int(embed_dim * mlp_ratio) != hidden:  # timm floors dim * ratio; guard against float round-down
        mlp_ratio = (hidden + 0.5) / embed_dim
    return {
        "model_name": name,
        "pretrained": False,
        "num_classes": model.num_classes,
        "global_pool": model.global_pool,
        "img_size": list(model.patch_embed.img_size),
        "patch_size": list(model.patch_embed.patch_size),
        "in_chans": model.in_chans,
        "embed_dim": embed_dim,
        "depth": len(model.blocks),
        "num_heads": model.blocks[0].attn.num_heads if len(model.blocks) else 1,
        "mlp_ratio": mlp_ratio,
        "dynamic_img_size": bool(model.dynamic_img_size),
    }


def _run_blocks(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    if model.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
        x = checkpoint_seq(model.blocks, x)
    else:
        x = model.blocks(x)
    return model.norm(x)


def num_patches(model: VisionTransformer, images: torch.Tensor) -> int:
    """Patch tokens this model makes of `images` (B, C, H, W) (H, W may differ from img_size)."""
    gh, gw = model.patch_embed.dynamic_feat_size(images.shape[-2:])
    return gh * gw


def forward_visible(
    model: VisionTransformer, images: torch.Tensor, ids_keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Encode only the patches `ids_keep` (B, K) (row-major patch indices) of `images` (B, C, H, W).

    Returns (B, num_prefix_tokens + K, D) after the final norm: prefix tokens (cls, registers) first, then the
    kept patches in `ids_keep` order. Dropped patches never reach a block. `ids_keep=None` keeps all patches
    and equals `model.forward_features(images)`.
    """
    x = model._pos_embed(model.patch_embed(images))  # (B, P + N, D): pos embed added, prefix tokens prepended
    if ids_keep is not None:
        p = model.num_prefix_tokens
        if ids_keep.dim() != 2 or ids_keep.shape[0] != x.shape[0]:
            raise ValueError(f"ids_keep must be (B={x.shape[0]}, K), got {tuple(ids_keep.shape)}")
        n = x.shape[1] - p
        # Checked on the CPU only: reading ids_keep back from a GPU would stall it every step (and CUDA's gather
        # asserts on an index out of range anyway).
        if ids_keep.device.type == "cpu" and ids_keep.numel() and (int(ids_keep.min()) < 0 or int(ids_keep.max()) >= n):
            raise ValueError(f"ids_keep must index the {n} patches, got values outside [0, {n})")
        patches = torch.gather(x[:, p:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :p], patches], dim=1)
    return _run_blocks(model, x)


def forward_masked(
    model: VisionTransformer, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """Encode every patch, the masked ones (`mask` (B, N), 1 = masked) replaced by `mask_token` (1, 1, D).

    The replacement happens before the position embedding is added, so a mask token still knows its place.
    Returns (B, num_prefix_tokens + N, D).
    """
    x = model.patch_embed(images)  # (B, H', W', D) with dynamic_img_size, else (B, N, D)
    b, d = x.shape[0], x.shape[-1]
    if mask.shape != (b, x[0, ..., 0].numel()):
        raise ValueError(f"mask must be (B={b}, N={x[0, ..., 0].numel()}), got {tuple(mask.shape)}")
    w = mask.to(x.dtype).reshape(*x.shape[:-1], 1)
    x = x * (1 - w) + mask_token.reshape(1, *([1] * (x.dim() - 2)), d).to(x.dtype) * w
    return _run_blocks(model, model._pos_embed(x))


def fingerprint(model: VisionTransformer) -> str:
    """A short stable hash of the backbone's architecture config and weights (16 hex chars)."""
    model = _unwrap(model)
    h = hashlib.sha256(json.dumps(backbone_config(model), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def with_data_stats(
    config: dict[str, Any],
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
) -> dict[str, Any]:
    """`config` plus timm's `pretrained_cfg_overlay`: input size and, when given, the training normalisation,
    so `timm.data.resolve_model_data_config` on the rebuilt model (and `data_stats`) give the right values."""
    config = dict(config)
    overlay: dict[str, Any] = {"input_size": [config["in_chans"], *config["img_size"]]}
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None and std is not None:
        if not len(mean) == len(std) == config["in_chans"]:
            raise ValueError(f"mean/std need {config['in_chans']} values, got {mean}/{std}")
        overlay.update(mean=[float(m) for m in mean], std=[float(v) for v in std])
    config["pretrained_cfg_overlay"] = overlay
    return config


def data_stats(model: VisionTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a backbone was trained with, as recorded in its config; the house default otherwise."""
    model = _unwrap(model)
    in_chans = model.patch_embed.proj.in_channels
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is not None and std is not None and len(mean) == len(std) == in_chans:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    return normalize_stats(in_chans)


def export_backbone(
    model: VisionTransformer,
    out_dir: str | Path,
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the folder `out_dir` with `model.safetensors` and `config.json` (built under a temporary name and
    renamed when complete); return `out_dir`. An existing `out_dir` is replaced only when it is an earlier
    export and `overwrite` is given: a folder of someone else's weights is never written into.

    The config carries timm's `pretrained_cfg_overlay` with the input size and, when given, the normalisation
    the backbone was trained with, so `timm.data.resolve_model_data_config(model)` on the rebuilt model is right.
    """
    model = _unwrap(model)
    out = Path(out_dir)
    claim_output(out, "backbone", overwrite=overwrite)
    config = with_data_stats(backbone_config(model), mean, std)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        mark_output(tmp, "backbone")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "fingerprint": fingerprint(model)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            fsync_file(tmp / name)
    return out


# The keys of a backbone config that may reach `timm.create_model`: what `backbone_config` writes, plus the
# architecture kwargs of timm's VisionTransformer. A config file is data from wherever the export came from, so
# anything that makes timm read or fetch files (`checkpoint_path`, `pretrained`, `pretrained_cfg`, `cache_dir`,
# hub / local-dir model names) or swap in code is refused rather than passed on.
ARCH_KEYS: frozenset[str] = frozenset({
    # written by backbone_config()
    "num_classes", "global_pool", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "dynamic_img_size",
    # other VisionTransformer architecture kwargs (plain values, no layer classes)
    "class_token", "no_embed_class", "reg_tokens", "pos_embed", "qkv_bias", "qk_norm", "proj_bias", "init_values",
    "pre_norm", "final_norm", "fc_norm", "dynamic_img_pad", "pool_include_prefix",
})
# Read by us (`with_data_stats` writes them): the input size and normalisation, given to timm as a fresh overlay.
DATA_STATS_KEY = "pretrained_cfg_overlay"
DATA_STATS_FIELDS: frozenset[str] = frozenset({"input_size", "mean", "std"})
ALLOWED_CONFIG_KEYS: tuple[str, ...] = tuple(sorted({"model_name", "pretrained", DATA_STATS_KEY, *ARCH_KEYS}))


def _data_stats_overlay(overlay: Any, source: str) -> dict[str, list[float]]:
    """The validated `pretrained_cfg_overlay` of a config: only numeric input_size/mean/std lists."""
    if not isinstance(overlay, dict):
        raise ValueError(f"{source}: {DATA_STATS_KEY} must be a JSON object with {sorted(DATA_STATS_FIELDS)}")
    out: dict[str, list[float]] = {}
    for key, value in overlay.items():
        if key not in DATA_STATS_FIELDS:
            raise ValueError(f"{source}: key {DATA_STATS_KEY}.{key} is not allowed in a backbone config; "
                             f"allowed: {sorted(DATA_STATS_FIELDS)}")
        ok = isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if not ok:
            raise ValueError(f"{source}: {DATA_STATS_KEY}.{key}={value!r}: must be a list of numbers")
        out[key] = list(value)
    return out


def model_from_config(config: Any, source: str | Path = "backbone config") -> VisionTransformer:
    """`timm.create_model` from a backbone config (what `backbone_config` / `with_data_stats` write), letting only
    architecture keys through: never weights from elsewhere (`pretrained`, `checkpoint_path`, ...), never a download.

    `source` names the file in errors. Raises ValueError for a refused key, a bad value or a non-ViT result.
    """
    if not isinstance(config, dict) or not isinstance(config.get("model_name"), str):
        raise ValueError(f"{source}: not a backbone config (a JSON object with 'model_name' is expected)")
    for key in config:
        if key not in ALLOWED_CONFIG_KEYS:
            raise ValueError(
                f"{source}: key {key!r} is not allowed in a backbone config (only architecture keys reach "
                f"timm.create_model); allowed keys: {list(ALLOWED_CONFIG_KEYS)}"
            )
    if config.get("pretrained", False) is not False:
        raise ValueError(f"{source}: key 'pretrained'={config['pretrained']!r} is refused: an exported backbone's "
                         "weights are its model.safetensors, never downloaded ones (write false or leave it out)")
    name = config["model_name"]
    if not timm.is_model(name):  # also refuses hf-hub: / local-dir: sources, which read configs from elsewhere
        raise ValueError(f"{source}: model_name={name!r} is not a model in timm's registry, so timm.create_model "
                         "cannot build it here (hub and local-dir sources are not loaded from a backbone config)")
    kwargs = {k: v for k, v in config.items() if k in ARCH_KEYS}
    if DATA_STATS_KEY in config:
        kwargs[DATA_STATS_KEY] = _data_stats_overlay(config[DATA_STATS_KEY], str(source))
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"{source}: timm.create_model(**config) failed: {e}") from None
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{source}: builds a {type(model).__name__}, not a timm VisionTransformer")
    return model


def load_backbone(path: str | Path) -> VisionTransformer:
    """Rebuild an exported backbone from a folder (or a file in it) with safetensors + JSON only, no pickle."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"backbone file missing: {p}")
    try:
        config = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: not a JSON backbone config ({e})") from None
    model = model_from_config(config, cfg_path)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{weights_path}: not a readable safetensors file (truncated or foreign?): {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        detail = f"missing {missing[:5]}, unexpected {unexpected[:5]}" if missing or unexpected else str(e)
        raise ValueError(f"{weights_path}: weights do not fit the backbone in {cfg_path.name}: {detail}") from None
    return model
