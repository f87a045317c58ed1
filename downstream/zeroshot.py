"""CLIP downstream: zero-shot classification and image<->text retrieval.

Zero-shot (Radford et al. 2021, sec. 3.1.4): every class name is put into every template, the normalised text
embeddings are averaged per class and normalised again (open_clip's `build_zero_shot_classifier`); an image is
assigned the class whose embedding has the largest cosine similarity with its own.

Retrieval: image->text and text->image recall@k over a held-out caption shard set, by exact search. A caption
string that several images share (class-like captions) is one text whose ground truth is all those images, so
recall@k is "a correct item among the top k" in both directions; with unique captions it is the usual metric.

Images are embedded through `downstream.features.extract_features` (batched, exactly once across ranks,
cached by backbone fingerprint): the backbone's pooled features, then the CLIP image head.

    result = zeroshot("runs/clip-fmnist", "data/fmnist/val")            # run folder, checkpoint or export
    result = zeroshot(run, retrieval_shards="data/captions/val")         # recall@1/5/10 only
    print(json.dumps(result.to_dict()))
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import nn

from downstream.features import FeatureError, Features, extract_features
from downstream.metrics import classification_metrics, recall_at_k
from downstream.retrieval import exact_search
from pretrain.checkpoint import latest_checkpoint, load_model_state, read_trainer_state
from pretrain.objectives.clip import (
    CLIP,
    DEFAULT_TEMPLATES,
    IMAGE_TOWER_DIR,
    OPEN_CLIP_CONFIG,
    get_tokenizer,
    load_open_clip,
)
from pretrain.pooling import from_timm
from pretrain.recipe import CLIPConfig
from pretrain.restore import load_backbone_from

__all__ = [
    "ClipTowers",
    "RetrievalResult",
    "ZeroShotResult",
    "image_text_recall",
    "load_clip",
    "zeroshot",
    "zeroshot_classifier",
]



class ZeroShotError(ValueError):
    pass


@dataclass
class ClipTowers:
    """The two towers of a trained CLIP, as downstream code uses them."""

    backbone: nn.Module  # timm ViT; its pretrained_cfg carries the training mean/std (features read them)
    image_head: nn.Module  # pooled backbone features -> joint embedding (fc_norm + projection)
    text_model: Any  # has open_clip's `encode_text(tokens, normalize=...)`
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    templates: list[str]  # the prompts training used (defaults for zero-shot)
    class_names: list[str]  # the classes training used, when it used class names
    source: str  # what was loaded

    @property
    def pooling(self) -> str:
        # extract_features pooling that reproduces the timm ViT's own global pool (before fc_norm)
        try:
            return from_timm(self.backbone.global_pool)
        except ValueError as e:
            raise ZeroShotError(f"the image tower's pooling: {e}") from None

    def to(self, device: torch.device | str) -> ClipTowers:
        for m in (self.backbone, self.image_head, self.text_model):
            m.to(device).eval()
        return self

    @torch.no_grad()
    def embed_images(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, D) pooled backbone features -> (N, E) normalised image embeddings."""
        device = next(self.image_head.parameters()).device
        out = [self.image_head(chunk.to(device)).float() for chunk in pooled.split(4096)]
        return F.normalize(torch.cat(out), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(T,) strings -> (T, E) normalised text embeddings."""
        device = next(self.image_head.parameters()).device
        out = []
        for i in range(0, len(captions), batch_size):
            tokens = self.tokenizer(list(captions[i : i + batch_size])).to(device)
            out.append(self.text_model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out) if out else torch.empty(0)


def _find_export(p: Path) -> Path | None:
    for d in (p, p / "open_clip"):
        if (d / OPEN_CLIP_CONFIG).is_file():
            return d
    return None


def load_clip(path: str | Path) -> ClipTowers:
    """A trained CLIP from a run folder, an open_clip export folder, or a training checkpoint (eval mode, CPU).

    A run folder's `open_clip/` export is preferred (it is the final model); without one its newest checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no CLIP run, checkpoint or export at {p}")
    export = _find_export(p)
    if export is not None:
        model = load_open_clip(export)
        extra = json.loads((export / OPEN_CLIP_CONFIG).read_text()).get("vitssl", {})
        text_cfg = json.loads((export / OPEN_CLIP_CONFIG).read_text())["model_cfg"]["text_cfg"]
        trunk = model.visual.trunk
        return ClipTowers(
            backbone=trunk,
            image_head=nn.Sequential(trunk.fc_norm, model.visual.head),
            text_model=model,
            tokenizer=get_tokenizer(int(text_cfg.get("context_length", 77))),
            templates=list(extra.get("caption_templates") or DEFAULT_TEMPLATES),
            class_names=list(extra.get("class_names") or []),
            source=str(export),
        )
    return _load_from_checkpoint(p)


def _load_from_checkpoint(p: Path) -> ClipTowers:
    ckpt = p if (p / "trainer_state.json").is_file() else latest_checkpoint(p)
    if ckpt is None:
        raise FileNotFoundError(
            f"{p} holds no CLIP model: expected an open_clip export ({OPEN_CLIP_CONFIG}, {IMAGE_TOWER_DIR}/), "
            "a run folder, or a checkpoint folder (trainer_state.json)"
        )
    _, meta = read_trainer_state(ckpt)
    recipe = meta.get("recipe") or {}
    name = recipe.get("objective", {}).get("name")
    if name != "clip":
        raise ZeroShotError(f"{ckpt} was trained with objective {name!r}, not clip: it has no text tower")
    cfg = CLIPConfig(**recipe["objective"]["clip"])
    objective = CLIP(
        load_backbone_from(ckpt),  # carries the training mean/std in its pretrained_cfg
        cfg,
        captions="captions",
        class_names=cfg.class_names,
        templates=recipe.get("data", {}).get("caption_templates") or (),
    )
    objective.load_state_dict(load_model_state(ckpt), strict=True)
    objective.eval()
    return ClipTowers(
        backbone=objective.backbone,
        image_head=nn.Sequential(objective.backbone.fc_norm, objective.image_proj),
        text_model=objective,
        tokenizer=get_tokenizer(cfg.text_context_length),
        templates=list(objective.templates),
        class_names=list(objective.class_names),
        source=str(ckpt),
    )


# --- the pieces ---------------------------------------------------------------------------------------------


def zeroshot_classifier(clip: ClipTowers, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(E, C): per class, the normalised mean of its templates' normalised text embeddings."""
    if not class_names:
        raise ZeroShotError("zero-shot needs class names")
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ZeroShotError(f"templates need exactly one '{{}}' for the class name; got {list(templates)}")
    device = next(clip.image_head.parameters()).device
    weights = build_zero_shot_classifier(
        clip.text_model, clip.tokenizer, list(class_names), list(templates), num_classes_per_batch=32, device=device
    )
    return weights.float().cpu()


def image_text_recall(
    image_embeds: torch.Tensor | np.ndarray,
    text_embeds: torch.Tensor | np.ndarray,
    image_text: torch.Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float | None]]:
    """Recall@k both ways with normalised embeddings; `image_text[i]` is the row of image i's caption in
    `text_embeds`. Image->text: image i's caption among the top k texts. Text->image: any image of that caption
    among the top k images. A k larger than the candidates gives None."""
    images = np.ascontiguousarray(np.asarray(image_embeds, dtype=np.float32))
    texts = np.ascontiguousarray(np.asarray(text_embeds, dtype=np.float32))
    truth = np.asarray(image_text, dtype=np.int64).reshape(-1)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ZeroShotError(f"embeddings must be (N, E) and (T, E), got {images.shape} and {texts.shape}")
    if truth.shape[0] != images.shape[0] or truth.min() < 0 or truth.max() >= texts.shape[0]:
        raise ZeroShotError(f"image_text must give each of the {images.shape[0]} images a text row in [0, {texts.shape[0]})")

    def both(n_candidates: int, query_labels: np.ndarray, retrieved: Callable[[int], np.ndarray]):
        fit = [k for k in ks if k <= n_candidates]
        got = recall_at_k(query_labels, retrieved(max(fit)), fit) if fit else {}
        return {f"R@{k}": got.get(k) for k in ks}

    def i2t(k: int) -> np.ndarray:
        return exact_search(texts, images, k)[1]

    def t2i(k: int) -> np.ndarray:
        return truth[exact_search(images, texts, k)[1]]  # the caption row of each retrieved image

    return {
        "image_to_text": both(texts.shape[0], truth, i2t),
        "text_to_image": both(images.shape[0], np.arange(texts.shape[0]), t2i),
    }


# --- the one-call entry -------------------------------------------------------------------------------------


@dataclass
class RetrievalResult:
    shards: str
    num_images: int
    num_texts: int  # distinct captions
    image_to_text: dict[str, float | None]
    text_to_image: dict[str, float | None]


@dataclass
class ZeroShotResult:
    checkpoint: str
    shards: str | None = None
    num_samples: int = 0
    classes: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    top1: float | None = None
    top5: float | None = None
    per_class_accuracy: list[float | None] = field(default_factory=list)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    retrieval: RetrievalResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _embed(clip: ClipTowers, shards: str, **kw: Any) -> tuple[Features, torch.Tensor]:
    feats = extract_features(clip.backbone, str(shards), pooling=clip.pooling, **kw)
    return feats, clip.embed_images(feats.feats)


def zeroshot(
    checkpoint_path: str | Path,
    shards: str | Path | None = None,
    templates: Sequence[str] | None = None,
    *,
    retrieval_shards: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator=None,
    precision: str = "no",
    cache_dir: str | Path | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> ZeroShotResult:
    """Zero-shot top-1/top-5 on the labelled shard set `shards` and/or recall@k on the caption shard set
    `retrieval_shards`, for the CLIP at `checkpoint_path` (run folder, open_clip export or checkpoint).

    Class names: `class_names`, else the shard set's manifest classes. Templates: `templates`, else the ones
    the run trained with, else CLIP's default prompts. Images are embedded by `extract_features` (ranks of
    `accelerator`, `precision`, feature cache in `cache_dir`).
    """
    if shards is None and retrieval_shards is None:
        raise ZeroShotError("give labelled shards for zero-shot classification and/or retrieval_shards")
    clip = load_clip(checkpoint_path)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    clip.to(device)
    kw = dict(batch_size=batch_size, num_workers=num_workers, accelerator=accelerator, precision=precision,
              cache_dir=cache_dir)
    result = ZeroShotResult(checkpoint=clip.source)

    if shards is not None:
        feats, image = _embed(clip, str(shards), require_labels=True, **kw)
        names = list(class_names or feats.classes)
        if not names:
            raise ZeroShotError(f"{shards} records no class names in its manifest: pass class_names")
        top = int(feats.labels.max())
        if top >= len(names):
            raise ZeroShotError(f"{shards} has label {top} but only {len(names)} class names {names}")
        prompts = list(templates or clip.templates or DEFAULT_TEMPLATES)
        scores = image @ zeroshot_classifier(clip, names, prompts)
        m = classification_metrics(scores, feats.labels, len(names))
        result.shards, result.num_samples, result.classes, result.templates = str(shards), len(feats.labels), names, prompts
        result.top1, result.top5, result.per_class_accuracy = m["top1"], m["top5"], m["per_class_accuracy"]
        result.confusion_matrix = m["confusion_matrix"].tolist()

    if retrieval_shards is not None:
        feats, image = _embed(clip, str(retrieval_shards), **kw)
        missing = [k for k, c in zip(feats.keys, feats.captions) if not c]
        if missing:
            raise FeatureError(f"{retrieval_shards}: samples without a caption (.txt): {missing[:5]}")
        unique = list(dict.fromkeys(feats.captions))
        row = {c: i for i, c in enumerate(unique)}
        text = clip.embed_texts(unique)
        recall = image_text_recall(image, text, [row[c] for c in feats.captions], ks)
        result.retrieval = RetrievalResult(
            str(retrieval_shards), len(feats.captions), len(unique), recall["image_to_text"], recall["text_to_image"]
        )
    return result
