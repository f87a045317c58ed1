"""DINO: self-distillation with no labels (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers").

A student (backbone + DINO head) is trained to match a teacher on different views of the same image. The
teacher is an exponential moving average of the student (no gradient; momentum from 0.996 to 1 on a cosine
over the run). Each image gives 2 global crops and N local crops (`pretrain.multicrop`); the teacher sees
only the global crops, the student every crop, and the loss is the cross-entropy between the teacher's
centred, sharpened output on each global crop and the student's output on every *other* crop. Centring
(subtracting a momentum average of the teacher outputs, averaged over all ranks) keeps one dimension from
dominating; sharpening (teacher temperature 0.04 -> 0.07 < student 0.1) keeps the output from going uniform.

Local crops of another resolution go through the same timm backbone (`dynamic_img_size=True`: the position
embedding is interpolated to the crop's patch grid); crops of one resolution share one forward pass, as in
DINO's `MultiCropWrapper`.

`self.backbone` is the *teacher's* backbone: DINO evaluates and releases the teacher, so that is what the
trainer exports and what `load_backbone_from(checkpoint)` returns. The student's is `self.student_backbone`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from pretrain.attention_maps import attention_grid_png
from pretrain.augment import BatchedMultiCrop, sample_seeds
from pretrain.backbone import create_backbone
from pretrain.monitors import CollapseMonitor
from pretrain.monitors import entropy as mean_entropy
from pretrain.multicrop import MultiCropTransform, decode_transform
from pretrain.objectives import register
from pretrain.objectives.base import Objective
from pretrain.recipe import DINOConfig
from pretrain.schedule import cosine_value
from pretrain.transforms import resolve_stats

if TYPE_CHECKING:
    from pretrain.recipe import Recipe

N_GLOBAL = 2  # DINO's two global crops; the teacher sees these only


# ----------------------------------------------------------------------------------------------- schedules


def teacher_momentum_at(step: int, total_steps: int, base: float) -> float:
    """Cosine from `base` (step 0) to 1 (step `total_steps`), DINO's `momentum_schedule[step]`."""
    return cosine_value(base, 1.0, step, total_steps)


def teacher_temp_at(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """DINO's per-epoch schedule: `linspace(warmup_temp, temp, warmup_epochs)[epoch]`, then `temp`."""
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)


# ----------------------------------------------------------------------------------------------- head + loss


class DINOHead(nn.Module):
    """MLP (`layers` Linear layers, GELU between) -> L2-normalise the bottleneck -> weight-normalised Linear.

    `norm_last_layer` fixes the last layer's weight-norm gain at 1, so its rows stay unit vectors (the
    prototypes); the paper finds it more stable. Weight norm is torch's parametrization: the state dict holds
    `last_layer.parametrizations.weight.original0` (gain g, (out_dim, 1)) and `...original1` (direction v).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        layers = max(layers, 1)
        if layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            mods: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(layers - 2):
                mods += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            mods.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*mods)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher outputs of each global view and the student outputs of
    every other view, averaged over the (view, other view) pairs; updates the centre after each call.

    Inputs are view-major: `student_out` (V*B, K) with the global views first, `teacher_out` (G*B, K).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float, n_global: int = N_GLOBAL
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if teacher_out.shape[0] % n_global or student_out.shape[0] % (teacher_out.shape[0] // n_global):
            raise ValueError(f"teacher ({teacher_out.shape[0]} rows) and student ({student_out.shape[0]} rows) "
                             f"outputs are not whole views of one batch with {n_global} global views")
        batch = teacher_out.shape[0] // n_global
        n_views = student_out.shape[0] // batch
        if n_views < 2:
            raise ValueError("DINO needs at least two views: no (teacher view, other student view) pair exists")
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).view(n_views, batch, -1)
        teacher_p = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach()
        # Cross-entropy of every (teacher view g, student view v) pair, averaged over the batch: (G, V).
        pair_ce = -torch.einsum("gbk,vbk->gv", teacher_p.view(n_global, batch, -1), student_logp) / batch
        others = ~torch.eye(n_global, n_views, dtype=torch.bool, device=pair_ce.device)  # never a view with itself
        loss = pair_ce[others].mean()
        self.update_center(teacher_out)
        entropy = mean_entropy(teacher_p)  # every view has the same batch: the mean of the per-view means
        # Each teacher view enters the same number of pairs, so the mean KL is the mean CE minus the mean entropy.
        # Tensors, not floats: the trainer reads them once per log row, not once per step (a host read stalls a GPU).
        return loss, {"teacher_entropy": entropy, "st_kl": loss.detach() - entropy}

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean of the teacher outputs over the global batch (all ranks)."""
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor([float(teacher_out.shape[0])], device=batch_sum.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        batch_center = batch_sum / count
        # A non-finite step (skipped by the trainer) must not poison the centre; the same on every rank. Chosen
        # on the device (torch.where), not by reading the flag back: a host read would stall a GPU every step.
        updated = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(torch.where(torch.isfinite(batch_center).all(), updated, self.center))


# ----------------------------------------------------------------------------------------------- objective


def _embed(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled embedding (CLS token after the final norm for a standard ViT)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _multicrop_embed(model: VisionTransformer, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Embed view-major: consecutive views of one resolution go through the backbone in one forward."""
    out, i = [], 0
    while i < len(views):
        j = i
        while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
            j += 1
        out.append(_embed(model, torch.cat(list(views[i:j]))))
        i = j
    return torch.cat(out)


class DINO(Objective):
    """DINO on a timm ViT; `forward(batch)` needs `batch["image"]` as the list of views `MultiCropTransform` makes
    (collated: a list of (B, C, H, W) tensors, the 2 global crops first)."""

    def __init__(self, backbone: VisionTransformer, cfg: DINOConfig, seed: int = 0, log_every: int = 1) -> None:
        super().__init__()
        cfg.validate()
        self.log_every = max(1, log_every)  # the trainer's run.log_every: when the collapse monitor measures
        self._teacher_emb: torch.Tensor | None = None
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"DINO needs a timm VisionTransformer backbone, got {type(backbone).__name__}")
        if not backbone.dynamic_img_size:
            raise ValueError("DINO needs a backbone built with dynamic_img_size=True (local crops of another size "
                             "share it); pretrain.backbone.create_backbone builds it so")
        if getattr(backbone, "cls_token", None) is None:
            raise ValueError("DINO needs a ViT with a CLS token")
        self.cfg = cfg
        pe = backbone.patch_embed
        self.in_chans: int = backbone.in_chans
        self.patch_size: int = pe.patch_size[0]
        self.global_size: int = cfg.global_crop_size or pe.img_size[0]
        for what, size in (("global_crop_size", self.global_size), ("local_crop_size", cfg.local_crop_size)):
            if size % self.patch_size:
                raise ValueError(f"objective.dino.{what}={size} is not a multiple of the patch size {self.patch_size}")

        self.mean, self.std = resolve_stats(cfg.mean, cfg.std, self.in_chans, "objective.dino.mean")

        def head() -> DINOHead:
            return DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                            cfg.norm_last_layer)

        self.student_backbone = backbone
        self.student_head = head()
        # The teacher starts as an exact copy of the student and never gets a gradient.
        self.backbone = copy.deepcopy(backbone)
        self.teacher_head = head()
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for p in self._teacher_params():
            p.requires_grad_(False)
        self.loss_fn = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        self.monitor = CollapseMonitor(cfg.collapse_warn_std, cfg.collapse_warn_every)
        self.uniform_entropy = math.log(cfg.out_dim)  # ln K: the entropy of uniform outputs
        self.epoch = 0
        self.seed = seed  # the run's seed: with the epoch and each sample's index, the seed of its batched views
        self.augment = BatchedMultiCrop(**self._view_args()) if cfg.augment == "batched" else None
        self.backbone.eval()
        self.teacher_head.eval()

    # --- the seam -------------------------------------------------------------------------------------------

    def train_transform(self) -> Callable[[Any], list[torch.Tensor] | torch.Tensor]:
        """augment=pil: the views, made per sample in the workers; batched: the decoded image only (uint8, the
        global crop size), the views are made in `forward` on the batch."""
        if self.augment is not None:
            return decode_transform(self.global_size, self.in_chans)
        return MultiCropTransform(**self._view_args())

    def _view_args(self) -> dict[str, Any]:
        dino = self.cfg
        return dict(
            in_chans=self.in_chans, mean=self.mean, std=self.std, global_size=self.global_size,
            global_scale=dino.global_crops_scale, local_number=dino.local_crops_number,
            local_size=dino.local_crop_size, local_scale=dino.local_crops_scale, blur_prob=dino.blur_prob,
            solarize_prob=dino.solarize_prob, hflip=dino.hflip, color_jitter_prob=dino.color_jitter_prob,
            color_jitter=tuple(dino.color_jitter), grayscale_prob=dino.grayscale_prob,
        )

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        views = self._views(batch)
        temp = self.teacher_temp()
        with torch.no_grad():
            teacher_emb = _multicrop_embed(self.backbone, views[:N_GLOBAL])
            teacher_out = self.teacher_head(teacher_emb)
        student_out = self.student_head(_multicrop_embed(self.student_backbone, views))
        loss, stats = self.loss_fn(student_out, teacher_out, temp)
        self._teacher_emb = teacher_emb.detach()  # measured by the collapse monitor at logged steps only
        metrics = {"loss": loss.detach(), **stats, "teacher_temp": temp,
                   # What the collapse alarms (pretrain.evaluate) compare with: a teacher whose outputs went uniform
                   # has entropy ln K, and the loss (cross-entropy to it) is then at least ln K.
                   "loss_ceiling": self.uniform_entropy, "teacher_entropy_ceiling": self.uniform_entropy}
        return loss, metrics

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if self.epoch < self.cfg.freeze_last_layer:
            for p in self.student_head.last_layer.parameters():
                p.grad = None  # the optimizer skips a parameter without a gradient

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        # `step` updates are done; the one just done had index step - 1 (DINO's `momentum_schedule[it]`).
        m = teacher_momentum_at(step - 1, total_steps, self.cfg.momentum_teacher)
        self.update_teacher(m)
        out: dict[str, Any] = {"teacher_momentum": m}
        # The embedding's std and effective rank (an SVD, and host reads) where the trainer writes a log row.
        if self._teacher_emb is not None and (step % self.log_every == 0 or step == total_steps):
            out.update(self.monitor.measure(self._teacher_emb))
            self.monitor.check(step)
        return out

    def on_epoch_start(self, epoch: int, steps_per_epoch: int) -> None:
        self.epoch = epoch

    def no_weight_decay(self) -> set[str]:
        return {f"student_backbone.{n}" for n in getattr(self.student_backbone, "no_weight_decay", set)()}

    def visualize(self, batch: dict[str, Any], path: Path, max_images: int = 8) -> Path:
        """PNG grid of the teacher's last-block CLS-to-patch attention per head (the paper's Fig. 1 and 3)."""
        images = batch["image"] if isinstance(batch, dict) else None
        if isinstance(images, list):
            images = images[0]
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("DINO.visualize expects batch['image'] as a (B, C, H, W) tensor or a list of views")
        return attention_grid_png(self.backbone, images, path, self.mean, self.std, max_images=max_images)

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.backbone.eval()  # the teacher never drops paths or tokens
        self.teacher_head.eval()
        return self

    # --- the method -----------------------------------------------------------------------------------------

    def teacher_temp(self) -> float:
        dino = self.cfg
        return teacher_temp_at(self.epoch, dino.warmup_teacher_temp, dino.teacher_temp,
                               dino.warmup_teacher_temp_epochs)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        teacher, student = [], []
        for t_mod, s_mod in ((self.backbone, self.student_backbone), (self.teacher_head, self.student_head)):
            t_named, s_named = list(t_mod.named_parameters()), list(s_mod.named_parameters())
            if [n for n, _ in t_named] != [n for n, _ in s_named]:
                raise RuntimeError("teacher and student parameters no longer correspond")
            teacher += [p for _, p in t_named]
            student += [p.detach() for _, p in s_named]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    # --- helpers --------------------------------------------------------------------------------------------

    def _teacher_params(self):
        yield from self.backbone.parameters()
        yield from self.teacher_head.parameters()

    def _views(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        views = batch.get("image") if isinstance(batch, dict) else None
        if self.augment is not None and isinstance(views, torch.Tensor):
            index = batch.get("index")
            if not isinstance(index, torch.Tensor) or index.shape != (views.shape[0],):
                raise ValueError("objective.dino.augment=batched needs batch['index'] (B,), each sample's index "
                                 "in its shard set (ShardStream yields it): it seeds the sample's views")
            views = self.augment(views, sample_seeds(self.seed, self.epoch, index.cpu()))
        expected = N_GLOBAL + self.cfg.local_crops_number
        if not isinstance(views, (list, tuple)) or not all(isinstance(v, torch.Tensor) for v in views):
            raise ValueError("DINO expects batch['image'] as a list of view tensors (the multi-crop transform's "
                             f"output, collated): {N_GLOBAL} global + {self.cfg.local_crops_number} local crops")
        if len(views) != expected:
            raise ValueError(f"DINO expects {expected} views ({N_GLOBAL} global + {self.cfg.local_crops_number} "
                             f"local), got {len(views)}")
        for i, v in enumerate(views):
            size = self.global_size if i < N_GLOBAL else self.cfg.local_crop_size
            if v.dim() != 4 or not v.is_floating_point() or tuple(v.shape[1:]) != (self.in_chans, size, size):
                raise ValueError(f"view {i} must be a float ({views[0].shape[0]}, {self.in_chans}, {size}, {size}) "
                                 f"tensor, got {tuple(v.shape)} {v.dtype}")
        return list(views)


@register("dino")
def build(recipe: Recipe) -> DINO:
    return DINO(create_backbone(recipe.model), recipe.objective.dino, seed=recipe.run.seed,
                log_every=recipe.run.log_every)
