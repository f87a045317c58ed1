"""Batched multi-crop views (pretrain.augment): each step equals torchvision's functional op on the same sample
with the same parameters; a sample's views depend on its seed alone; the crop boxes follow RandomResizedCrop's
distribution."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ROOT
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from pretrain.augment import (
    BatchedMultiCrop,
    ViewParams,
    ViewSpec,
    adjust_hue,
    color_jitter,
    crop_resize,
    gaussian_blur,
    sample_seeds,
)
from pretrain.objectives import build_objective
from pretrain.objectives.dino import DINO
from pretrain.recipe import RecipeError, load_recipe

RECIPE_DINO = ROOT / "recipes" / "dino_vit_tiny_fmnist.yaml"


def images(b=6, c=3, h=28, w=28, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_full_box_at_the_same_size_is_the_identity_and_a_box_is_a_crop():
    x = images()
    full = torch.tensor([[0.0, 0.0, 28.0, 28.0]]).repeat(len(x), 1)
    torch.testing.assert_close(crop_resize(x, full, 28), x, atol=1e-6, rtol=0)
    # An integer box at its own size is exactly the slice; at half size, the 2x2 means (bilinear at pixel centres).
    box = torch.tensor([[4.0, 6.0, 20.0, 22.0]]).repeat(len(x), 1)
    torch.testing.assert_close(crop_resize(x, box, 16), x[:, :, 6:22, 4:20], atol=1e-6, rtol=0)
    torch.testing.assert_close(crop_resize(x, box, 8), F_avg2(x[:, :, 6:22, 4:20]), atol=1e-6, rtol=0)


def F_avg2(x):
    return torch.nn.functional.avg_pool2d(x, 2)


@pytest.mark.parametrize("channels", [1, 3])
def test_colour_jitter_equals_torchvisions_ops_in_order(channels):
    x = images(c=channels)
    g = torch.Generator().manual_seed(1)
    factors = torch.stack([0.6 + 0.8 * torch.rand(6, generator=g), 0.6 + 0.8 * torch.rand(6, generator=g),
                           0.8 + 0.4 * torch.rand(6, generator=g), -0.1 + 0.2 * torch.rand(6, generator=g)], dim=1)
    got = color_jitter(x, factors)
    for i in range(len(x)):
        b, c, s, h = factors[i].tolist()
        ref = TF.adjust_contrast(TF.adjust_brightness(x[i], b), c)
        if channels == 3:
            ref = TF.adjust_hue(TF.adjust_saturation(ref, s), h)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=0)


def test_hue_rotation_equals_torchvision_and_a_full_turn_is_the_identity():
    x = images()
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.3, 0.5])
    got = adjust_hue(x, shifts)
    for i, shift in enumerate(shifts.tolist()):
        torch.testing.assert_close(got[i], TF.adjust_hue(x[i], shift), atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(6)), x, atol=1e-5, rtol=0)


def test_blur_equals_torchvision_per_sample_sigma():
    x = images(c=3, h=20, w=24)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    got = gaussian_blur(x, sigma, 5)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(got[i], TF.gaussian_blur(x[i], [5, 5], [s, s]), atol=1e-5, rtol=0)


def fixed(b, **kw) -> ViewParams:
    base = dict(boxes=torch.tensor([[0.0, 0.0, 28.0, 28.0]]).repeat(b, 1), flip=torch.zeros(b, dtype=torch.bool),
                jitter=torch.zeros(b, dtype=torch.bool), factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(b, 1),
                gray=torch.zeros(b, dtype=torch.bool), blur=torch.zeros(b, dtype=torch.bool), sigma=torch.ones(b),
                solarize=torch.zeros(b, dtype=torch.bool))
    return ViewParams(**{**base, **kw})


def test_a_view_applies_each_step_only_to_the_samples_that_drew_it():
    aug = BatchedMultiCrop(in_chans=3, mean=[0.5] * 3, std=[0.25] * 3, global_size=28, local_number=0)
    x = images()
    mask = torch.tensor([True, False, True, False, False, True])
    spec = ViewSpec(28, (1.0, 1.0), 1.0)
    for step, expected in (
        ("flip", lambda v: v.flip(-1)),
        ("gray", lambda v: TF.rgb_to_grayscale(v, num_output_channels=3)),
        ("solarize", lambda v: TF.solarize(v, 0.5)),
    ):
        out = aug.view(x, spec, fixed(6, **{step: mask})) * 0.25 + 0.5
        for i in range(6):
            torch.testing.assert_close(out[i], expected(x[i]) if mask[i] else x[i], atol=1e-5, rtol=0,
                                       msg=f"{step} sample {i}")
    out = aug.view(x, spec, fixed(6, blur=mask, sigma=torch.full((6,), 1.3))) * 0.25 + 0.5
    k = 3  # blur_kernel_size(28)
    for i in range(6):
        ref = TF.gaussian_blur(x[i], [k, k], [1.3, 1.3]) if mask[i] else x[i]
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_views_depend_on_each_samples_seed_alone_and_are_reproducible():
    aug = BatchedMultiCrop(in_chans=1, mean=[0.3], std=[0.3], global_size=28, local_number=3, local_size=14)
    x = images(b=8, c=1)
    seeds = sample_seeds(0, 2, torch.arange(8))
    views = aug(x, seeds)
    assert [tuple(v.shape) for v in views] == [(8, 1, 28, 28)] * 2 + [(8, 1, 14, 14)] * 3
    again = aug(x, seeds)
    for a, b in zip(views, again):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Samples 5, 2 in a batch of their own (another order, another size) get the same views as in the batch of 8.
    pick = torch.tensor([5, 2])
    alone = aug(x[pick], seeds[pick])
    for a, b in zip(views, alone):
        torch.testing.assert_close(a[pick], b, atol=1e-6, rtol=0)
    # Another epoch, other views; uint8 input is scaled as float input.
    other = aug(x, sample_seeds(0, 3, torch.arange(8)))
    assert not torch.equal(other[0], views[0])
    as_uint8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(aug(as_uint8, seeds)[0], aug(as_uint8.float() / 255, seeds)[0])


def test_seeds_differ_across_samples_epochs_and_runs():
    idx = torch.arange(10_000)
    s = sample_seeds(0, 0, idx)
    assert len(set(s.tolist())) == 10_000 and bool((s >= 0).all())
    assert not set(s.tolist()) & set(sample_seeds(0, 1, idx).tolist())
    assert not set(s.tolist()) & set(sample_seeds(1, 0, idx).tolist())


def test_crop_boxes_follow_random_resized_crop():
    """Area fraction in the scale range, aspect ratio in [3/4, 4/3], box inside the image; flips, jitter, blur,
    solarize drawn at their probabilities (4,000 samples: within 4 standard errors)."""
    aug = BatchedMultiCrop(in_chans=3, mean=[0.5] * 3, std=[0.5] * 3, global_size=28, local_number=1, local_size=14,
                           local_scale=(0.05, 0.4))
    n = 4000
    params = aug.draw(sample_seeds(0, 0, torch.arange(n)), 28, 28)
    for spec, p in zip(aug.views, params):
        w, h = p.boxes[:, 2] - p.boxes[:, 0], p.boxes[:, 3] - p.boxes[:, 1]
        area = w * h / (28 * 28)
        assert bool((area >= spec.scale[0] - 1e-5).all()) and bool((area <= spec.scale[1] + 1e-5).all())
        ratio = w / h
        assert bool((ratio >= 0.75 - 1e-5).all()) and bool((ratio <= 4 / 3 + 1e-5).all())
        assert bool((p.boxes[:, :2] >= 0).all()) and bool((p.boxes[:, 2:] <= 28 + 1e-4).all())
        for mask, prob in ((p.flip, 0.5), (p.jitter, 0.8), (p.gray, 0.2), (p.blur, spec.blur_prob),
                           (p.solarize, spec.solarize_prob)):
            se = math.sqrt(max(prob * (1 - prob), 1e-12) / n)
            assert abs(float(mask.float().mean()) - prob) <= 4 * se + 1e-9, (spec, prob)
        assert bool((p.sigma >= 0.1).all()) and bool((p.sigma <= 2.0).all())
        assert bool((p.factors[:, 0] >= 0.6).all()) and bool((p.factors[:, 0] <= 1.4).all())


def test_colour_jitter_strengths_are_drawn_as_colorjitter_and_set_by_the_recipe():
    """objective.dino.color_jitter reaches both paths; factors are uniform on ColorJitter's ranges (brightness
    1.5: [0, 2.5]; hue 0.5: any rotation), and out-of-range strengths are refused."""
    strengths = (1.5, 0.0, 0.5, 0.5)
    aug = BatchedMultiCrop(in_chans=3, mean=[0.5] * 3, std=[0.5] * 3, global_size=28, local_number=0,
                           color_jitter=strengths)
    f = aug.draw(sample_seeds(0, 0, torch.arange(4000)), 28, 28)[0].factors
    for column, (lo, hi) in enumerate(((0.0, 2.5), (1.0, 1.0), (0.5, 1.5), (-0.5, 0.5))):
        assert float(f[:, column].min()) >= lo - 1e-6 and float(f[:, column].max()) <= hi + 1e-6
        if hi > lo:  # spread over the whole range: within 2% of each end, mean at the middle
            assert float(f[:, column].min()) < lo + 0.02 * (hi - lo) and float(f[:, column].max()) > hi - 0.02 * (hi - lo)
            assert abs(float(f[:, column].mean()) - (lo + hi) / 2) < 0.03 * (hi - lo)
    r = load_recipe(RECIPE_DINO, ["model.in_chans=3", "objective.dino.color_jitter=[0.4,0.4,0.8,0.5]",
                                  "objective.dino.mean=[0.5,0.5,0.5]", "objective.dino.std=[0.2,0.2,0.2]"])
    for mode in ("pil", "batched"):
        r.objective.dino.augment = mode
        dino = build_objective(r)
        if mode == "batched":
            assert dino.augment.jitter == (0.4, 0.4, 0.8, 0.5)
        else:
            jitter = next(t for t in dino.train_transform().global_1.transforms if type(t).__name__ == "RandomApply")
            assert jitter.transforms[0].hue == (-0.5, 0.5) and jitter.transforms[0].saturation == pytest.approx((0.2, 1.8))
    with pytest.raises(RecipeError, match="color_jitter"):
        load_recipe(RECIPE_DINO, ["objective.dino.color_jitter=[0.4,0.4,0.2,0.6]"])
    with pytest.raises(ValueError, match="color_jitter"):
        BatchedMultiCrop(in_chans=3, mean=[0.5] * 3, std=[0.5] * 3, global_size=28, color_jitter=(0.4, -1, 0, 0))


def test_bad_input_is_named():
    aug = BatchedMultiCrop(in_chans=3, mean=[0.5] * 3, std=[0.5] * 3, global_size=28, local_number=0)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        aug(torch.rand(2, 1, 28, 28), torch.arange(2))
    with pytest.raises(ValueError, match="one seed per image"):
        aug(torch.rand(2, 3, 28, 28), torch.arange(3))
    with pytest.raises(ValueError, match="uint8 or float"):
        aug(torch.zeros(2, 3, 28, 28, dtype=torch.int32), torch.arange(2))
    with pytest.raises(ValueError, match="in_chans=2"):
        BatchedMultiCrop(in_chans=2, mean=[0.5] * 2, std=[0.5] * 2, global_size=28)


def test_dino_with_batched_views_takes_decoded_images_and_their_indexes():
    """objective.dino.augment=batched: the worker transform only decodes (uint8 at the global crop size); forward
    makes the views from the batch and each sample's index; a missing index or an unknown mode is named."""
    tiny = ["model.img_size=16", "model.patch_size=4", "model.in_chans=1", "model.embed_dim=32", "model.depth=1",
            "model.num_heads=2", "objective.name=dino", "objective.dino.out_dim=64", "objective.dino.hidden_dim=32",
            "objective.dino.bottleneck_dim=16", "objective.dino.local_crops_number=2", "objective.dino.local_crop_size=8",
            "run.seed=3"]
    obj = build_objective(load_recipe(None, [*tiny, "objective.dino.augment=batched"]))
    assert isinstance(obj, DINO) and obj.seed == 3
    decoded = obj.train_transform()(Image.new("L", (40, 30), 200))
    assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == (1, 16, 16)
    batch = {"image": (torch.rand(4, 1, 16, 16) * 255).to(torch.uint8), "index": torch.arange(4)}
    loss, metrics = obj(batch)
    assert torch.isfinite(loss) and metrics["loss"] == pytest.approx(float(loss))
    views = obj._views(batch)
    assert [tuple(v.shape) for v in views] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 2
    expected = obj.augment(batch["image"], sample_seeds(3, 0, torch.arange(4)))
    torch.testing.assert_close(views[0], expected[0])
    with pytest.raises(ValueError, match=r"needs batch\['index'\]"):
        obj({"image": batch["image"]})
    with pytest.raises(RecipeError, match=r"objective.dino.augment='gpu': must be one of \['pil', 'batched'\]"):
        load_recipe(None, [*tiny, "objective.dino.augment=gpu"])
