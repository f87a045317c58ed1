"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

Two towers map images and captions into one embedding space; the loss is the symmetric cross-entropy of the
(scaled) cosine similarities of every image with every caption of the batch, the true pairs on the diagonal.

* Image tower: the project's timm ViT backbone (pooled as timm pools it) + a linear projection, which is
  exactly open_clip's `TimmModel` (`visual.trunk` + `visual.head.proj`), so the export loads in open_clip.
* Text tower: open_clip's `TextTransformer`, built by open_clip's own `_build_text_tower` from the same
  `CLIPTextCfg` dict the export writes; open_clip's BPE tokenizer (its vocabulary ships with the package).
* Loss: open_clip's `ClipLoss`. Features are all-gathered across ranks, so the negatives are the global batch.
  With `local_loss` + `gather_with_grad` (the defaults) each rank takes its rows against all columns and the
  DDP-averaged gradient is exactly the gradient of the global-batch loss.
* The learnable temperature starts at log(1/0.07) and is clamped after each step so exp(scale) <= 100.
* Captions: the shards' `.txt`, or for class-labelled sets one of `data.caption_templates` filled with the
  class name, the template drawn per sample from (seed, epoch, sample index): deterministic under resume
  and independent of ranks and workers.
* Gradient accumulation is refused (see `CLIPConfig.validate_recipe`): micro-batches contrasted separately
  would not see the global batch's negatives.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIPTextCfg, _build_text_tower
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pretrain.backbone import create_backbone
from pretrain.objectives import register
from pretrain.objectives.base import Objective
from pretrain.pooling import from_timm
from pretrain.recipe import CLIPConfig, RecipeError
from pretrain.transforms import crop_transform, resolve_stats
from shards.atomic import atomic_path
from shards.ownership import mark_output
from shards.tar import manifest_for

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer

    from pretrain.recipe import Recipe

# A few of CLIP's ImageNet prompts (Radford et al. 2021, notebooks/Prompt_Engineering_for_ImageNet.ipynb).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
)
CAPTION_MODES = ("auto", "captions", "classes")
OPEN_CLIP_CONFIG = "open_clip_config.json"  # the names open_clip's `create_model("local-dir:...")` looks for
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
IMAGE_TOWER_DIR = "image_tower"  # timm's hub-style config.json: `timm.create_model("local-dir:...")`
_TAG_TEMPLATE = 7  # keeps the template draw independent of other streams seeded from the same run seed


@functools.lru_cache(maxsize=8)
def get_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer (vocabulary read from the installed package; no network)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def template_index(seed: int, epoch: int, index: int, num_templates: int) -> int:
    """The template a sample gets in an epoch: a pure function of (seed, epoch, canonical sample index)."""
    digest = hashlib.blake2b(struct.pack("<4q", _TAG_TEMPLATE, seed, epoch, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_templates


def class_captions(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """[class][template] caption strings."""
    return [[t.format(c) for t in templates] for c in class_names]


def resolve_caption_source(recipe: Recipe) -> tuple[str, list[str]]:
    """(mode, class names) for a training recipe: `auto` picks .txt captions when the train manifest says every
    sample has one, else class names; class names come from `objective.clip.class_names` or the manifest."""
    cfg = recipe.objective.clip
    mode, names = cfg.captions, list(cfg.class_names)
    manifest = manifest_for(recipe.data.train) if recipe.data.train else None
    if mode == "auto" and manifest is not None:
        mode = "captions" if manifest.has_captions else "classes"
    if not names and manifest is not None:
        names = list(manifest.classes)
    if mode == "classes" and not names:
        raise RecipeError(
            f"objective.clip.captions=classes needs class names: data.train={recipe.data.train!r} has no manifest "
            "with classes; list them in objective.clip.class_names"
        )
    return mode, names


class CLIP(Objective):
    """CLIP on a timm ViT backbone. `forward(batch)` needs `batch["image"]` (B, C, H, W) and captions: the
    batch's `caption` strings, or `label` + `index` when captions are made from class names."""

    def __init__(
        self,
        backbone: VisionTransformer,
        cfg: CLIPConfig,
        *,
        captions: str = "captions",
        class_names: Sequence[str] = (),
        templates: Sequence[str] = (),
        seed: int = 0,
    ) -> None:
        super().__init__()
        cfg.validate()
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"CLIP needs a timm VisionTransformer backbone, got {type(backbone).__name__}")
        from_timm(backbone.global_pool)  # a pooling the house can name (features, zero-shot): token or avg
        if captions not in CAPTION_MODES:
            raise ValueError(f"captions={captions!r}: must be one of {list(CAPTION_MODES)}")
        templates = tuple(templates) or DEFAULT_TEMPLATES
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"caption templates need exactly one '{{}}' for the class name: {bad}")
        if captions == "classes" and not class_names:
            raise ValueError("captions='classes' needs class_names")
        self.cfg = cfg
        self.backbone = backbone
        self.captions_mode = captions
        self.class_names = list(class_names)
        self.templates = templates
        self.seed = seed
        self.epoch = 0
        self.in_chans: int = backbone.in_chans
        self.img_size: tuple[int, int] = tuple(backbone.patch_embed.img_size)

        self.mean, self.std = resolve_stats(cfg.mean, cfg.std, self.in_chans, "objective.clip.mean")

        tokenizer = get_tokenizer(cfg.text_context_length)
        if cfg.text_vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"objective.clip.text_vocab_size={cfg.text_vocab_size} is smaller than open_clip's tokenizer "
                f"vocabulary ({tokenizer.vocab_size} ids): token ids would fall outside the embedding table"
            )
        # open_clip's TimmModel head with proj='linear': dropout (0) + Linear(num_features, embed_dim).
        self.image_proj = nn.Linear(backbone.num_features, cfg.embed_dim, bias=cfg.proj_bias)
        self.text = _build_text_tower(cfg.embed_dim, CLIPTextCfg(**self.text_cfg()))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self._losses: dict[tuple[int, int], ClipLoss] = {}

    # --- the seam -------------------------------------------------------------------------------------------

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return {"captions": ("caption",), "classes": ("label",)}.get(self.captions_mode, ())

    def train_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> normalised float tensor (C, H, W): random resized crop (CLIP used a plain random square
        crop; `crop_scale` [1, 1] gives that), optional flip."""
        return crop_transform(self.img_size, self.in_chans, self.mean, self.std, crop_scale=self.cfg.crop_scale,
                              hflip=self.cfg.hflip)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        images = self._images(batch)
        captions = self.captions_for(batch)
        # Identical captions (class-name captions repeat a lot) go through the text tower once.
        unique = list(dict.fromkeys(captions))
        position = {c: i for i, c in enumerate(unique)}
        inverse = torch.tensor([position[c] for c in captions], device=images.device)
        text = self.encode_text(self.tokenize(unique).to(images.device))[inverse]
        image = self.encode_image(images)
        scale = self.logit_scale.exp()
        loss = self.clip_loss()(F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1), scale.float())
        return loss, {"loss": loss.detach(), "logit_scale": scale.detach()}  # tensors: read at log rows only

    def on_epoch_start(self, epoch: int, steps_per_epoch: int) -> None:
        self.epoch = epoch

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        # As open_clip's train loop: clamp after the update, so exp(logit_scale) <= max_logit_scale (100).
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))
        return {"logit_scale": self.logit_scale.detach().exp()}

    def no_weight_decay(self) -> set[str]:
        # logit_scale and every 1-d parameter are exempt anyway (timm's optimizer factory); as open_clip's
        # `no_weight_decay`, the text position embedding is too.
        return super().no_weight_decay() | {f"text.{n}" for n in self.text.no_weight_decay()}

    def on_train_end(self, out_dir: Path) -> list[Path]:
        return [export_open_clip(self, Path(out_dir) / "open_clip")]

    # --- the model ------------------------------------------------------------------------------------------

    def text_cfg(self) -> dict[str, Any]:
        """open_clip `CLIPTextCfg` fields (the export's `text_cfg`)."""
        clip = self.cfg
        return {
            "context_length": clip.text_context_length,
            "vocab_size": clip.text_vocab_size,
            "width": clip.text_width,
            "heads": clip.text_heads,
            "layers": clip.text_layers,
            "mlp_ratio": clip.text_mlp_ratio,
        }

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim): the backbone's pooled features (timm's head: pool + fc_norm), projected."""
        x = self.image_proj(self.backbone(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, context_length) token ids -> (B, embed_dim), as open_clip's `encode_text`."""
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return get_tokenizer(self.cfg.text_context_length)(list(captions))

    def clip_loss(self) -> ClipLoss:
        """open_clip's ClipLoss for the current process group (gathers features when there is more than one rank)."""
        if dist.is_available() and dist.is_initialized():
            where = (dist.get_rank(), dist.get_world_size())
        else:
            where = (0, 1)
        if where not in self._losses:
            self._losses[where] = ClipLoss(
                local_loss=self.cfg.local_loss,
                gather_with_grad=self.cfg.gather_with_grad,
                cache_labels=True,
                rank=where[0],
                world_size=where[1],
            )
        return self._losses[where]

    def captions_for(self, batch: dict[str, Any]) -> list[str]:
        """One caption per sample: the shard's text, or a template drawn for (seed, epoch, index) + class name."""
        n = len(batch["image"])
        given = list(batch.get("caption") or [""] * n)
        if self.captions_mode == "captions":
            missing = [k for k, c in zip(batch.get("key", range(n)), given) if not c]
            if missing:
                raise ValueError(f"CLIP with captions='captions' got samples without a caption: {missing[:5]}")
            return given
        # one host read each (a read per sample would stall a GPU n times)
        labels = batch["label"].tolist() if batch.get("label") is not None else None
        index = batch["index"].tolist() if batch.get("index") is not None else None
        out = []
        for i in range(n):
            if self.captions_mode == "auto" and given[i]:
                out.append(given[i])
                continue
            label = int(labels[i]) if labels is not None else -1
            if not 0 <= label < len(self.class_names):
                raise ValueError(
                    f"CLIP needs a caption or a class label in [0, {len(self.class_names)}) for every sample; "
                    f"sample {batch.get('key', ['?'] * n)[i]!r} has label {label} and no caption"
                )
            t = template_index(self.seed, self.epoch, int(index[i]) if index is not None else i, len(self.templates))
            out.append(self.templates[t].format(self.class_names[label]))
        return out

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch.get("image") if isinstance(batch, dict) else None
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError("CLIP expects batch['image'] as a float tensor (B, C, H, W)")
        if images.shape[1] != self.in_chans:
            raise ValueError(f"CLIP expects {self.in_chans}-channel images, got {tuple(images.shape)}")
        return images


# --- open_clip export -----------------------------------------------------------------------------------------


def open_clip_model_cfg(objective: CLIP, image_tower: str | Path) -> dict[str, Any]:
    """The `model_cfg` open_clip builds a `CustomTextCLIP` from: a timm vision tower read by timm from the
    `local-dir:` folder `image_tower` (the exact ViT: img/patch size, widths, channels), open_clip's text tower."""
    b = objective.backbone
    return {
        "embed_dim": objective.cfg.embed_dim,
        "custom_text": True,  # the text tower stays one module, `text.*` (CustomTextCLIP)
        "vision_cfg": {
            "timm_model_name": f"local-dir:{Path(image_tower).resolve()}",
            "timm_model_pretrained": False,
            "timm_pool": b.global_pool,
            "timm_proj": "linear",
            "timm_proj_bias": objective.cfg.proj_bias,
            "image_size": list(b.patch_embed.img_size),
        },
        "text_cfg": objective.text_cfg(),
    }


def open_clip_state_dict(objective: CLIP) -> dict[str, torch.Tensor]:
    """The objective's weights under open_clip's `CustomTextCLIP` names."""
    out: dict[str, torch.Tensor] = {}
    for k, v in objective.backbone.state_dict().items():
        out[f"visual.trunk.{k}"] = v
    for k, v in objective.image_proj.state_dict().items():
        out[f"visual.head.proj.{k}"] = v
    for k, v in objective.text.state_dict().items():
        out[f"text.{k}"] = v
    out["logit_scale"] = objective.logit_scale.data
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def export_open_clip(objective: CLIP, out_dir: str | Path) -> Path:
    """Write the whole model as an open_clip `local-dir:` folder; returns it.

        out_dir/open_clip_config.json       {"model_cfg": ..., "preprocess_cfg": ..., "vitssl": ...}
        out_dir/open_clip_model.safetensors weights under open_clip's names
        out_dir/image_tower/config.json     timm's hub-style config (architecture + model_args + pretrained_cfg)

    Load with `open_clip.create_model("local-dir:OUT_DIR")` (the config names the image tower by its absolute
    path; after moving the folder use `load_open_clip`). open_clip's image preprocessing is RGB-only: for a
    1-channel tower, feed tensors made with `pretrain.transforms.eval_transform` and the recorded mean/std.
    """
    objective = getattr(objective, "_orig_mod", objective)
    out = Path(out_dir)
    b = objective.backbone
    mean, std = objective.data_stats()
    h, w = b.patch_embed.img_size
    preprocess = {"size": [h, w], "interpolation": "bicubic", "resize_mode": "shortest"}
    if b.in_chans == 3:
        preprocess.update(mean=list(mean), std=list(std))
    config = {
        "model_cfg": open_clip_model_cfg(objective, out / IMAGE_TOWER_DIR),
        "preprocess_cfg": preprocess,
        "vitssl": {
            "format": "vitssl-clip/1",
            "in_chans": b.in_chans,
            "mean": list(mean),
            "std": list(std),
            "caption_templates": list(objective.templates),  # what zero-shot prompts default to
            "class_names": list(objective.class_names),
        },
    }
    with atomic_path(out) as tmp:
        (tmp / IMAGE_TOWER_DIR).mkdir(parents=True)
        mark_output(tmp, "open_clip")
        # timm's own writer: architecture + the factory's recorded kwargs, so timm rebuilds the exact ViT.
        save_config_for_hf(
            b, tmp / IMAGE_TOWER_DIR / "config.json",
            data_config={"input_size": (b.in_chans, h, w), "mean": tuple(mean), "std": tuple(std), "crop_pct": 1.0},
        )
        save_file(open_clip_state_dict(objective), str(tmp / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
        (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_open_clip(folder: str | Path, device: str | torch.device = "cpu"):
    """`open_clip.create_model` on an exported folder wherever it now lies (the image tower path is re-pointed)."""
    import open_clip

    folder = Path(folder).resolve()
    cfg_path = folder / OPEN_CLIP_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} is not an open_clip export: {OPEN_CLIP_CONFIG} is missing")
    try:
        vision = dict(json.loads(cfg_path.read_text())["model_cfg"]["vision_cfg"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path}: not an open_clip model config ({e})") from None
    vision["timm_model_name"] = f"local-dir:{folder / IMAGE_TOWER_DIR}"
    model = open_clip.create_model(f"local-dir:{folder}", vision_cfg=vision, device=device)
    return model.eval()


@register("clip")
def build(recipe: Recipe) -> CLIP:
    cfg = recipe.objective.clip
    cfg.validate_recipe(recipe)
    mode, names = resolve_caption_source(recipe)
    return CLIP(
        create_backbone(recipe.model),
        cfg,
        captions=mode,
        class_names=names,
        templates=recipe.data.caption_templates,
        seed=recipe.run.seed,
    )
