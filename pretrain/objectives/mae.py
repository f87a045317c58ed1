"""Masked autoencoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Each image loses a random `mask_ratio` of its patches; the encoder (the timm backbone) sees only the visible
ones; a light decoder gets the encoded tokens plus a learned mask token at every masked position, each with a
fixed sin-cos position embedding, and predicts the pixels of every patch. The loss is the MSE on masked patches
only, against per-patch normalised pixels when `norm_pix_loss`.

`mask_tokens_in_encoder=True` is the paper's baseline (Table 1c, "encoder w/ [M]"): every token, mask tokens
included, goes through the encoder and the decoder. Same loss, several times the encoder compute.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from pretrain.backbone import create_backbone, forward_masked, forward_visible, sincos_2d_pos_embed
from pretrain.objectives import register
from pretrain.objectives.base import Objective
from pretrain.recipe import MAEConfig
from pretrain.transforms import crop_transform, resolve_stats
from shards.atomic import atomic_path

if TYPE_CHECKING:
    from pretrain.recipe import Recipe

NORM_PIX_EPS = 1e-6  # as in MAE: (x - mean) / sqrt(var + eps), var unbiased


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major, each patch's pixels in (row, col, channel) order."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int, channels: int, grid_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, p*p*C) -> (B, C, H, W); `grid_size` (h, w) defaults to a square grid."""
    b, n, d = patches.shape
    p = patch_size
    if d != p * p * channels:
        raise ValueError(f"patch dim {d} != patch_size^2 * channels = {p * p * channels}")
    if grid_size is None:
        side = round(n**0.5)
        grid_size = (side, side)
    gh, gw = grid_size
    if gh * gw != n:
        raise ValueError(f"{n} patches do not fill a {gh}x{gw} grid")
    x = patches.reshape(b, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample: `int(N * (1 - mask_ratio))`, exactly as MAE's `random_masking` (floor)."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    batch_size: int, num_patches: int, mask_ratio: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise (drawn from the global torch RNG).

    Returns `ids_keep` (B, K) patch indices to encode, `mask` (B, N) float with 1 = masked in patch order,
    and `ids_restore` (B, N) that puts [kept tokens, mask tokens] back into patch order.
    """
    keep = num_kept(num_patches, mask_ratio)
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of {num_patches}")
    noise = torch.rand(batch_size, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :keep], mask, ids_restore


def unshuffle(kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """(B, K, D) tokens of the kept patches + a (1, 1, D) mask token -> (B, N, D) in patch order."""
    b, k, d = kept.shape
    fill = mask_token.to(kept.dtype).expand(b, ids_restore.shape[1] - k, d)
    seq = torch.cat([kept, fill], dim=1)  # [kept..., mask tokens...] in shuffled order
    return torch.gather(seq, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """Per-patch pixel targets (B, N, p*p*C), normalised by each patch's own mean and std when `norm_pix`."""
    target = patchify(images.float(), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
    return target


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error."""
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def _init_decoder_weights(m: nn.Module) -> None:
    # MAE's init: xavier-uniform linears with zero bias, unit LayerNorms.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class MAE(Objective):
    """MAE on a timm ViT backbone; `forward(batch)` needs `batch["image"]` as a float (B, C, H, W) tensor."""

    def __init__(self, backbone: VisionTransformer, cfg: MAEConfig) -> None:
        super().__init__()
        cfg.validate()
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"MAE needs a timm VisionTransformer backbone, got {type(backbone).__name__}")
        self.backbone = backbone
        self.cfg = cfg
        pe = backbone.patch_embed
        if pe.patch_size[0] != pe.patch_size[1]:
            raise ValueError(f"MAE needs square patches, got {pe.patch_size}")
        self.patch_size: int = pe.patch_size[0]
        self.in_chans: int = backbone.in_chans
        self.img_size: tuple[int, int] = tuple(pe.img_size)
        self.grid_size: tuple[int, int] = tuple(pe.grid_size)
        self.num_patches: int = self.grid_size[0] * self.grid_size[1]
        self.num_prefix: int = backbone.num_prefix_tokens
        if num_kept(self.num_patches, cfg.mask_ratio) < 1:
            raise ValueError(f"mask_ratio={cfg.mask_ratio} keeps no patch of {self.num_patches}")

        self.mean, self.std = resolve_stats(cfg.mean, cfg.std, self.in_chans, "objective.mae.mean")

        d, dd = backbone.embed_dim, cfg.decoder_embed_dim
        if cfg.mask_tokens_in_encoder:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, d))
            nn.init.normal_(self.encoder_mask_token, std=0.02)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d_pos_embed(self.grid_size, dd, self.num_prefix), requires_grad=False
        )
        self.decoder_blocks = nn.Sequential(
            *[Block(dd, cfg.decoder_num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=LayerNorm)
              for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = LayerNorm(dd)
        self.decoder_pred = nn.Linear(dd, self.patch_size**2 * self.in_chans)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_init_decoder_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    # --- the seam -------------------------------------------------------------------------------------------

    def train_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image (any mode) -> normalised float tensor (C, H, W) at the backbone's img_size."""
        return crop_transform(self.img_size, self.in_chans, self.mean, self.std, crop_scale=self.cfg.crop_scale,
                              hflip=self.cfg.hflip)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        images = self._images(batch)
        pred, mask = self.predict(images)
        loss = masked_mse_loss(pred, pixel_targets(images, self.patch_size, self.cfg.norm_pix_loss), mask)
        return loss, {"loss": loss.detach()}  # a tensor: read at log rows only

    def no_weight_decay(self) -> set[str]:
        names = super().no_weight_decay() | {"mask_token", "decoder_pos_embed"}
        if self.cfg.mask_tokens_in_encoder:
            names.add("encoder_mask_token")
        return names

    def visualize(self, batch: dict[str, Any], path: Path, max_images: int = 8) -> Path:
        """PNG grid, one row per image: original | masked input | reconstruction (visible patches pasted back)."""
        from matplotlib.figure import Figure  # not pyplot: no global state, safe off the main thread

        images = self._images(batch)[:max_images]
        original, masked, recon = (self._to_display(x) for x in self.reconstruct(images))
        n, c = original.shape[0], original.shape[1]
        fig = Figure(figsize=(3 * 1.6, n * 1.6), dpi=100)
        axes = fig.subplots(n, 3, squeeze=False)
        for i in range(n):
            for j, (title, x) in enumerate((("original", original), ("masked", masked), ("reconstruction", recon))):
                ax = axes[i][j]
                img = x[i, 0] if c == 1 else x[i].permute(1, 2, 0)
                ax.imshow(img.numpy(), cmap="gray" if c == 1 else None, vmin=0.0, vmax=1.0)
                ax.set_axis_off()
                if i == 0:
                    ax.set_title(title, fontsize=8)
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        return path

    # --- the method -----------------------------------------------------------------------------------------

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, encode, decode. Returns predicted patches (B, N, p*p*C) and the mask (B, N), 1 = masked."""
        b, n, p = images.shape[0], self.num_patches, self.num_prefix
        ids_keep, mask, ids_restore = random_masking(b, n, self.cfg.mask_ratio, images.device)
        if self.cfg.mask_tokens_in_encoder:
            x = self.decoder_embed(forward_masked(self.backbone, images, mask, self.encoder_mask_token))
        else:
            x = self.decoder_embed(forward_visible(self.backbone, images, ids_keep))  # (B, P + K, Dd)
            x = torch.cat([x[:, :p], unshuffle(x[:, p:], self.mask_token, ids_restore)], dim=1)
        x = x + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, p:], mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(original, masked input, reconstruction) in the model's normalised pixel space, (B, C, H, W) each.

        The mask is drawn from `seed` without touching the global RNG stream (training stays reproducible).
        Masked patches are 0 (the dataset mean) in the masked input. With `norm_pix_loss` the prediction is
        mapped back to pixels with each patch's true mean and std: structure predicted, tone borrowed.
        """
        was_training = self.training
        self.eval()
        devices = [images.device.index or 0] if images.is_cuda else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                pred, mask = self.predict(images)
        finally:
            self.train(was_training)
        pred = pred.float()
        target = patchify(images.float(), self.patch_size)
        if self.cfg.norm_pix_loss:
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + NORM_PIX_EPS).sqrt() + target.mean(dim=-1, keepdim=True)
        m = mask.unsqueeze(-1)
        masked = unpatchify(target * (1 - m), self.patch_size, self.in_chans, self.grid_size)
        recon = unpatchify(pred * m + target * (1 - m), self.patch_size, self.in_chans, self.grid_size)
        return images.float(), masked, recon

    # --- helpers --------------------------------------------------------------------------------------------

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch.get("image") if isinstance(batch, dict) else None
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError("MAE expects batch['image'] as a float tensor (B, C, H, W)")
        if images.shape[1] != self.in_chans or tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(
                f"MAE expects images (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(images.shape)}"
            )
        return images

    def _to_display(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0, 1).cpu()


@register("mae")
def build(recipe: Recipe) -> MAE:
    return MAE(create_backbone(recipe.model), recipe.objective.mae)
