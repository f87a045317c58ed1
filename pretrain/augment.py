"""DINO's multi-crop views made on a batch of tensors, on the training device: workers only decode.

`BatchedMultiCrop` takes decoded images (B, C, H, W) in [0, 1] (uint8 is scaled) and per-sample seeds (B,), and
returns `[global_1, global_2, local_1, ..., local_N]`, each (B, C, size, size) normalised, as
`pretrain.multicrop.MultiCropTransform` does one PIL image at a time:

    global 1:  random resized crop (global_scale) - flip - colour - blur (p=1.0)
    global 2:  random resized crop (global_scale) - flip - colour - blur (p=0.1) - solarize (p=0.2)
    local:     random resized crop (local_scale)  - flip - colour - blur (p=0.5)
    colour:    brightness, contrast (0.4), saturation (0.2), hue (0.1) jitter (color_jitter) with p=0.8, then grayscale p=0.2

Every random draw of a sample comes from a generator seeded by that sample's seed alone (on the CPU, a few dozen
numbers a sample), so a sample's views do not depend on the batch it sits in, the device or the number of ranks:
exact resume holds when the seed is a function of (run seed, epoch, sample index) (`sample_seeds`).

The pixel work is batched: all crops of a view in one `torchvision.ops.roi_align` (crop + resize; bilinear, with
as many samples per output pixel as the reduction needs, so a downscale is averaged, not aliased; the PIL path is
bicubic), flips by
`torch.where`, colour as tensor arithmetic with per-sample factors (the formulas of torchvision's
`adjust_brightness/contrast/saturation/hue`, applied in that fixed order), blur as one grouped separable
convolution with a per-sample Gaussian kernel (reflect padding, kernel size as `blur_kernel_size`), solarize as
`torch.where(x >= 0.5, 1 - x, x)`. tests/test_augment.py holds each step to torchvision's functional op on the
same sample with the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from pretrain.multicrop import MultiCropSpec, blur_kernel_size

_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes before it falls back to a centre crop
_LOG_RATIO = (torch.log(torch.tensor(3 / 4)).item(), torch.log(torch.tensor(4 / 3)).item())
_SIGMA = (0.1, 2.0)  # DINO's GaussianBlur sigma range


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_MIX = tuple(_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def sample_seeds(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """One 63-bit seed per sample from (run seed, epoch, sample index): a different view every epoch, the same
    after a resume. A multiplicative hash (splitmix64's constants, int64 arithmetic wrapping), so neighbouring
    indexes get unrelated seeds."""
    x = index.to(torch.int64) * _MIX[0] + _signed(((seed * 1_000_003 + epoch) * _MIX[1]) % (1 << 64))
    x = x ^ (x >> 31)
    x = x * _MIX[2]
    return (x ^ (x >> 29)) & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class ViewSpec:
    size: int
    scale: tuple[float, float]
    blur_prob: float
    solarize_prob: float = 0.0


@dataclass
class ViewParams:
    """What a view draws for each sample (B rows), on the CPU."""

    boxes: torch.Tensor  # (B, 4) x1, y1, x2, y2 in pixels of the source image
    flip: torch.Tensor  # (B,) bool
    jitter: torch.Tensor  # (B,) bool: colour jitter applied
    factors: torch.Tensor  # (B, 4) brightness, contrast, saturation, hue
    gray: torch.Tensor  # (B,) bool
    blur: torch.Tensor  # (B,) bool
    sigma: torch.Tensor  # (B,)
    solarize: torch.Tensor  # (B,) bool


def _crop_box(g: torch.Generator, height: int, width: int, scale: tuple[float, float]) -> list[float]:
    """torchvision's RandomResizedCrop.get_params, with continuous (sub-pixel) box edges."""
    area = height * width
    for _ in range(_CROP_TRIES):
        u = torch.rand(4, generator=g).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        ratio = float(torch.exp(torch.tensor(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u[1])))
        w, h = (target * ratio) ** 0.5, (target / ratio) ** 0.5
        if 0 < w <= width and 0 < h <= height:
            x1, y1 = u[2] * (width - w), u[3] * (height - h)
            return [x1, y1, x1 + w, y1 + h]
    # fallback: the whole image cropped to the nearest allowed ratio, centred (as torchvision)
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, width / (3 / 4)
    elif ratio > 4 / 3:
        w, h = height * (4 / 3), height
    else:
        w, h = width, height
    x1, y1 = (width - w) / 2, (height - h) / 2
    return [x1, y1, x1 + w, y1 + h]


def _factor(strength: float, u: float) -> float:
    """A jitter factor as ColorJitter draws it, uniform on [max(0, 1 - strength), 1 + strength], from u in [0, 1)."""
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u


class BatchedMultiCrop:
    """Decoded images (B, C, H, W) + per-sample seeds (B,) -> [global_1, global_2, local_1..N] (B, C, s, s)."""

    def __init__(self, **settings: Any) -> None:
        """`settings`: the fields of `pretrain.multicrop.MultiCropSpec` (the per-sample path takes the same)."""
        spec = MultiCropSpec(**settings)
        self.in_chans = spec.in_chans
        self.mean, self.std = tuple(float(m) for m in spec.mean), tuple(float(s) for s in spec.std)
        gs = (float(spec.global_scale[0]), float(spec.global_scale[1]))
        ls = (float(spec.local_scale[0]), float(spec.local_scale[1]))
        blur = [float(b) for b in spec.blur_prob]
        self.views = [ViewSpec(spec.global_size, gs, blur[0]),
                      ViewSpec(spec.global_size, gs, blur[1], float(spec.solarize_prob)),
                      *(ViewSpec(spec.local_size, ls, blur[2]) for _ in range(spec.local_number))]
        self.hflip = spec.hflip
        self.color_jitter_prob = float(spec.color_jitter_prob)
        self.jitter = tuple(float(j) for j in spec.color_jitter)  # brightness, contrast, saturation, hue
        self.grayscale_prob = float(spec.grayscale_prob) if spec.in_chans == 3 else 0.0
        self.sizes = spec.sizes

    def __repr__(self) -> str:
        return f"BatchedMultiCrop(sizes={self.sizes})"

    # --- parameters (CPU, per sample) --------------------------------------------------------------------------

    def draw(self, seeds: torch.Tensor, height: int, width: int) -> list[ViewParams]:
        """Every view's parameters for every sample; sample i's come from `seeds[i]` alone."""
        rows: list[list[tuple]] = [[] for _ in self.views]
        for seed in seeds.tolist():
            g = torch.Generator().manual_seed(int(seed))
            for v, spec in enumerate(self.views):
                box = _crop_box(g, height, width, spec.scale)
                u = torch.rand(8, generator=g).tolist()
                b, c, s = (_factor(j, x) for j, x in zip(self.jitter[:3], u[2:5]))
                h = self.jitter[3] * (2 * u[5] - 1)
                sigma = _SIGMA[0] + (_SIGMA[1] - _SIGMA[0]) * u[6]
                rows[v].append((box, self.hflip and u[0] < 0.5, u[1] < self.color_jitter_prob, (b, c, s, h),
                                u[7] < self.grayscale_prob, bool(torch.rand(1, generator=g) < spec.blur_prob), sigma,
                                bool(torch.rand(1, generator=g) < spec.solarize_prob)))
        out = []
        for r in rows:
            box, flip, jit, fac, gray, blur, sigma, sol = zip(*r)
            out.append(ViewParams(torch.tensor(box, dtype=torch.float32), torch.tensor(flip), torch.tensor(jit),
                                  torch.tensor(fac, dtype=torch.float32), torch.tensor(gray), torch.tensor(blur),
                                  torch.tensor(sigma, dtype=torch.float32), torch.tensor(sol)))
        return out

    # --- pixels (batched, on the images' device) --------------------------------------------------------------

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor) -> list[torch.Tensor]:
        x = self._check(images, seeds)
        params = self.draw(seeds, x.shape[-2], x.shape[-1])
        return [self.view(x, spec, p) for spec, p in zip(self.views, params)]

    def view(self, x: torch.Tensor, spec: ViewSpec, p: ViewParams) -> torch.Tensor:
        dev = x.device
        out = crop_resize(x, p.boxes.to(dev), spec.size)
        out = torch.where(_rows(p.flip, dev), out.flip(-1), out)
        out = torch.where(_rows(p.jitter, dev), color_jitter(out, p.factors.to(dev)), out)
        if self.in_chans == 3 and bool(p.gray.any()):
            out = torch.where(_rows(p.gray, dev), rgb_to_gray(out).expand_as(out), out)
        if bool(p.blur.any()):
            out = torch.where(_rows(p.blur, dev), gaussian_blur(out, p.sigma.to(dev), blur_kernel_size(spec.size)), out)
        if bool(p.solarize.any()):
            out = torch.where(_rows(p.solarize, dev), torch.where(out >= 0.5, 1.0 - out, out), out)
        mean = torch.tensor(self.mean, device=dev, dtype=out.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=dev, dtype=out.dtype).view(1, -1, 1, 1)
        return (out - mean) / std

    def _check(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != self.in_chans:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got {shape}")
        if not isinstance(seeds, torch.Tensor) or seeds.shape != (images.shape[0],):
            raise ValueError(f"expected one seed per image ({images.shape[0]},), got "
                             f"{tuple(seeds.shape) if isinstance(seeds, torch.Tensor) else seeds!r}")
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
        return images.float()


def _rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    return mask.to(device).view(-1, 1, 1, 1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each sample's box (x1, y1, x2, y2 in pixels) resized to size x size in one roi_align: bilinear, with
    ceil(box / size) samples per output pixel and axis (sampling_ratio=0), so an enlargement is plain bilinear
    and a reduction averages what it drops."""
    index = torch.arange(len(x), device=x.device, dtype=x.dtype).unsqueeze(1)
    return roi_align(x, torch.cat([index, boxes.to(x.dtype)], dim=1), output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=0, aligned=True)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision: (B, 1, H, W) for 3 channels; the image itself for 1."""
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast (both channels counts), then saturation and hue (3 channels), per-sample factors
    (B, 4); torchvision's formulas, clamped to [0, 1] after each step as it does."""
    f = factors.to(x.dtype)
    x = (x * f[:, 0].view(-1, 1, 1, 1)).clamp(0, 1)
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    c = f[:, 1].view(-1, 1, 1, 1)
    x = (c * x + (1 - c) * mean).clamp(0, 1)
    if x.shape[1] == 3:
        s = f[:, 2].view(-1, 1, 1, 1)
        x = (s * x + (1 - s) * rgb_to_gray(x)).clamp(0, 1)
        x = adjust_hue(x, f[:, 3])
    return x


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's hue by shift (B,) in [-0.5, 0.5] turns, through HSV as torchvision does."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.to(x.dtype).view(-1, 1, 1), 1.0)
    v = maxc
    i = torch.floor(h * 6.0)
    frac = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * frac)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - frac))).clamp(0, 1)
    mask = i.unsqueeze(1) == torch.arange(6, device=x.device).view(-1, 1, 1)  # (B, 6, H, W)
    a1 = torch.stack((v, q, p, p, t, v), dim=1)
    a2 = torch.stack((t, v, v, q, p, p), dim=1)
    a3 = torch.stack((p, p, t, v, v, q), dim=1)
    stacked = torch.stack((a1, a2, a3), dim=1)  # (B, 3, 6, H, W)
    return (stacked * mask.unsqueeze(1).to(x.dtype)).sum(dim=2)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (B,), reflect padding: one grouped conv per axis."""
    b, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.to(x.dtype).view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k)
    pad = kernel_size // 2
    flat = x.reshape(1, b * c, h, w)
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, k.view(b * c, 1, 1, kernel_size), groups=b * c)
    flat = F.conv2d(flat, k.view(b * c, 1, kernel_size, 1), groups=b * c)
    return flat.view(b, c, h, w)
