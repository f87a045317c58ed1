"""MAE objective: masking, patchify, loss against hand computation, encoder compute, transform, PNG, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread
from PIL import Image
from sklearn.datasets import load_digits
from timm.optim import create_optimizer_v2

from pretrain.backbone import create_backbone
from pretrain.objectives import build_objective, known_objectives
from pretrain.objectives.mae import (
    MAE,
    masked_mse_loss,
    num_kept,
    patchify,
    pixel_targets,
    random_masking,
    unpatchify,
    unshuffle,
)
from pretrain.recipe import MAEConfig, ModelConfig, RecipeError, load_recipe
from pretrain.transforms import normalize_stats

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4", "model.pos_embed=sincos"]
TINY_DEC = ["objective.mae.decoder_embed_dim=32", "objective.mae.decoder_depth=1", "objective.mae.decoder_num_heads=2"]


def make_mae(img: int = 28, chans: int = 1, **mae_kw) -> MAE:
    torch.manual_seed(0)
    backbone = create_backbone(
        ModelConfig(img_size=img, patch_size=4, in_chans=chans, embed_dim=32, depth=2, num_heads=2, pos_embed="sincos")
    )
    cfg = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    cfg.update(mae_kw)
    return MAE(backbone, MAEConfig(**cfg))


def batch(b: int = 4, c: int = 1, size: int = 28, seed: int = 1) -> dict:
    return {"image": torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed))}


# --- patchify / masking ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chans", [1, 3])
def test_patchify_layout_and_round_trip(chans):
    x = torch.randn(2, chans, 8, 12)
    patches = patchify(x, 4)
    assert patches.shape == (2, 6, 16 * chans)
    # patch k = grid cell (k // 3, k % 3); its vector lists pixels row by row, channels innermost
    for k in (0, 4, 5):
        i, j = divmod(k, 3)
        expected = [x[1, ch, 4 * i + r, 4 * j + c] for r in range(4) for c in range(4) for ch in range(chans)]
        torch.testing.assert_close(patches[1, k], torch.stack(expected))
    torch.testing.assert_close(unpatchify(patches, 4, chans, (2, 3)), x)
    sq = torch.randn(3, chans, 16, 16)
    torch.testing.assert_close(unpatchify(patchify(sq, 4), 4, chans), sq)
    with pytest.raises(ValueError, match="multiple"):
        patchify(torch.randn(1, 1, 10, 8), 4)


@pytest.mark.parametrize("n,ratio,kept", [(49, 0.75, 12), (196, 0.75, 49), (14, 0.75, 3), (16, 0.5, 8), (10, 0.9, 0)])
def test_num_kept_is_the_papers_floor(n, ratio, kept):
    # MAE's random_masking: len_keep = int(L * (1 - mask_ratio)), a floor, not round() (14 * 0.25 = 3.5 -> 3);
    # float rounding counts too: 10 * (1 - 0.9) = 0.9999... -> 0, which random_masking refuses
    assert num_kept(n, ratio) == kept


def test_random_masking_keeps_exact_count_and_restores_order():
    torch.manual_seed(0)
    b, n = 8, 49
    ids_keep, mask, ids_restore = random_masking(b, n, 0.75)
    assert ids_keep.shape == (b, 12) and mask.shape == (b, n) and ids_restore.shape == (b, n)
    assert torch.all(mask.sum(1) == n - 12)
    for row in range(b):
        assert torch.all(mask[row, ids_keep[row]] == 0)  # kept patches are exactly the unmasked ones
        assert len(set(ids_keep[row].tolist())) == 12
    # ids_restore[i] is patch i's slot in the shuffled sequence [kept..., masked...]: a permutation in which
    # the kept patches hold slots 0..K-1 in ids_keep order and every masked patch a slot >= K
    assert torch.equal(ids_restore.sort(dim=1).values, torch.arange(n).expand(b, -1))
    assert torch.equal(torch.gather(ids_restore, 1, ids_keep), torch.arange(12).expand(b, -1))
    assert torch.equal(mask.bool(), ids_restore >= 12)
    assert len({tuple(r.tolist()) for r in mask}) == b  # every sample has its own mask
    with pytest.raises(ValueError, match="keeps no patch"):
        random_masking(2, 10, 0.95)


def test_masking_follows_the_global_rng():
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = random_masking(4, 49, 0.75)
    torch.set_rng_state(state)
    b = random_masking(4, 49, 0.75)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(random_masking(4, 49, 0.75)[1], a[1])


def test_unshuffle_puts_tokens_back_in_patch_order():
    torch.manual_seed(0)
    b, n, d = 3, 16, 2
    ids_keep, mask, ids_restore = random_masking(b, n, 0.75)
    kept = ids_keep.unsqueeze(-1).float().expand(-1, -1, d)  # each kept token carries its patch index
    token = torch.full((1, 1, d), -1.0)
    out = unshuffle(kept, token, ids_restore)
    assert out.shape == (b, n, d)
    expected = torch.where(mask.bool(), torch.tensor(-1.0), torch.arange(n).float().expand(b, -1))
    assert torch.equal(out[..., 0], expected) and torch.equal(out[..., 1], expected)


# --- loss ----------------------------------------------------------------------------------------------------------


def test_masked_mse_by_hand():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])
    target = torch.zeros(1, 3, 2)
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    # per-patch MSE: 2.5, 12.5, 0; masked patches 0 and 2 -> (2.5 + 0) / 2
    assert masked_mse_loss(pred, target, mask).item() == pytest.approx(1.25)


def test_norm_pix_target_by_hand():
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    t = pixel_targets(img, 2, norm_pix=True)
    var = 5.0 / 3.0  # unbiased, as MAE's target.var(dim=-1)
    expected = torch.tensor([(v - 2.5) / math.sqrt(var + 1e-6) for v in (1.0, 2.0, 3.0, 4.0)])
    torch.testing.assert_close(t[0, 0], expected)
    torch.testing.assert_close(pixel_targets(img, 2, norm_pix=False)[0, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # per-patch normalisation ignores brightness and contrast of each patch
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(pixel_targets(3.0 * x + 0.7, 4, True), pixel_targets(x, 4, True), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_forward_loss_equals_hand_computation(norm_pix):
    mae = make_mae(img=16, chans=3, norm_pix_loss=norm_pix).eval()
    images = batch(b=2, c=3, size=16)["image"]
    preds = []
    handle = mae.decoder_pred.register_forward_hook(lambda _m, _i, out: preds.append(out.detach()))
    torch.manual_seed(11)
    loss, metrics = mae({"image": images})
    handle.remove()
    torch.manual_seed(11)
    _, mask, _ = random_masking(2, 16, 0.75)  # the same draw the forward made
    pred = preds[0][:, 1:]  # drop the cls position
    assert pred.shape == (2, 16, 48)
    errors = []
    for b in range(2):
        for k in range(16):
            if mask[b, k] == 0:
                continue
            i, j = divmod(k, 4)
            vals = [images[b, ch, 4 * i + r, 4 * j + c].item() for r in range(4) for c in range(4) for ch in range(3)]
            if norm_pix:
                m = sum(vals) / len(vals)
                var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
                vals = [(v - m) / math.sqrt(var + 1e-6) for v in vals]
            errors.append(sum((p - v) ** 2 for p, v in zip(pred[b, k].tolist(), vals)) / len(vals))
    assert len(errors) == 2 * 12
    assert loss.item() == pytest.approx(sum(errors) / len(errors), rel=1e-5)
    assert metrics["loss"] == pytest.approx(loss.item())


def test_same_rng_state_same_loss():
    mae = make_mae().eval()
    b = batch()
    torch.manual_seed(5)
    a = mae(b)[0]
    torch.manual_seed(5)
    assert mae(b)[0].item() == a.item()
    assert mae(b)[0].item() != a.item()  # a new draw, a new mask


# --- encoder compute ---------------------------------------------------------------------------------------------


def count_tokens(module: torch.nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    return seen


def test_encoder_sees_only_visible_tokens():
    mae = make_mae()  # 28x28, patch 4: 49 patches, 12 kept at 0.75
    enc, dec = count_tokens(mae.backbone.blocks[0]), count_tokens(mae.decoder_blocks[0])
    loss, _ = mae(batch())
    assert enc == [1 + 12] and dec == [1 + 49]
    loss.backward()
    assert mae.mask_token.grad is not None and mae.mask_token.grad.abs().sum() > 0


def test_baseline_runs_mask_tokens_through_the_encoder():
    mae = make_mae(mask_tokens_in_encoder=True)
    enc, dec = count_tokens(mae.backbone.blocks[0]), count_tokens(mae.decoder_blocks[0])
    loss, _ = mae(batch())
    assert enc == [1 + 49] and dec == [1 + 49]
    loss.backward()
    assert mae.encoder_mask_token.grad.abs().sum() > 0
    assert mae.mask_token.grad is None  # the decoder's mask token is not used by the baseline
    assert "encoder_mask_token" in mae.no_weight_decay()


def test_no_weight_decay_and_frozen_pos_embeds():
    mae = make_mae()
    names = mae.no_weight_decay()
    assert {"backbone.pos_embed", "backbone.cls_token", "mask_token", "decoder_pos_embed"} <= names
    assert not mae.decoder_pos_embed.requires_grad and not mae.backbone.pos_embed.requires_grad
    opt = create_optimizer_v2(mae, "adamw", lr=1e-3, weight_decay=0.05)
    group_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(mae.named_parameters())
    assert group_of[id(params["mask_token"])] == 0.0 and group_of[id(params["backbone.cls_token"])] == 0.0
    assert group_of[id(params["decoder_blocks.0.attn.qkv.weight"])] == 0.05
    assert group_of[id(params["backbone.blocks.0.mlp.fc1.weight"])] == 0.05
    assert id(params["decoder_pos_embed"]) not in group_of and id(params["backbone.pos_embed"]) not in group_of


def test_decoder_pos_embed_is_sincos_with_zero_cls():
    mae = make_mae()
    pe = mae.decoder_pos_embed
    assert pe.shape == (1, 50, 32) and torch.all(pe[0, 0] == 0)
    # patch (h=0, w=1): sin(0)=0 for the h block, sin(1 * f_0) = sin(1) first in the w block
    assert pe[0, 2, 0].item() == pytest.approx(0.0) and pe[0, 2, 8].item() == pytest.approx(math.sin(1.0))


def test_bad_batches_are_clear_errors():
    mae = make_mae()
    with pytest.raises(ValueError, match="float tensor"):
        mae({"img": torch.zeros(1, 1, 28, 28)})
    with pytest.raises(ValueError, match="float tensor"):
        mae({"image": torch.zeros(1, 1, 28, 28, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        mae({"image": torch.zeros(1, 3, 28, 28)})
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        mae({"image": torch.zeros(1, 1, 16, 16)})


# --- transform ---------------------------------------------------------------------------------------------------


def test_train_transform_normalises_and_converts_channels():
    mean, std = normalize_stats(1)
    gray = make_mae().train_transform()
    out = gray(Image.new("L", (28, 28), 128))
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 28, 28), (128 / 255 - mean[0]) / std[0]))
    red = gray(Image.new("RGB", (20, 20), (255, 0, 0)))  # RGB into a gray model: PIL's L = 0.299 R -> 76
    assert red.shape == (1, 28, 28)
    torch.testing.assert_close(red, torch.full((1, 28, 28), (76 / 255 - mean[0]) / std[0]))
    rgb = make_mae(img=16, chans=3).train_transform()(Image.new("L", (8, 8), 200))
    mean3, std3 = normalize_stats(3)
    assert rgb.shape == (3, 16, 16)
    for c in range(3):
        torch.testing.assert_close(rgb[c], torch.full((16, 16), (200 / 255 - mean3[c]) / std3[c]))


def test_train_transform_crops_randomly_with_configured_scale():
    img = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    tf = make_mae(crop_scale=[0.2, 1.0], mean=[0.5], std=[0.5]).train_transform()
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(4)]
    assert all(o.shape == (1, 28, 28) for o in outs)
    assert not torch.equal(outs[0], outs[1])
    assert all(o.min() >= -1.0 - 1e-6 and o.max() <= 1.0 + 1e-6 for o in outs)  # mean/std 0.5 -> [-1, 1]
    # full-area crops, no flip: the image itself (only the aspect ratio jitter of RandomResizedCrop remains)
    exact = make_mae(crop_scale=[1.0, 1.0], hflip=False, mean=[0.5], std=[0.5]).train_transform()
    want = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255 * 2 - 1)[None]
    assert any(torch.allclose(exact(img), want, atol=1e-5) for _ in range(20))


def test_mae_config_validation():
    with pytest.raises(RecipeError, match="crop_scale"):
        load_recipe(None, ["objective.mae.crop_scale=[0.5,0.2]"])
    with pytest.raises(RecipeError, match=r"objective\.mae\.mean=\[0\.5\] / objective\.mae\.std=\[\]: must have equal"):
        load_recipe(None, ["objective.mae.mean=[0.5]"])
    with pytest.raises(ValueError, match="mean has 3 values for 1 channels"):
        make_mae(mean=[0.1, 0.2, 0.3], std=[1.0, 1.0, 1.0])


# --- registry, picture, learning -----------------------------------------------------------------------------


def test_registry_builds_mae_from_recipe():
    assert "mae" in known_objectives()
    recipe = load_recipe(None, ["model.img_size=16", "model.in_chans=1", *TINY, *TINY_DEC, "objective.mae.mask_ratio=0.5"])
    obj = build_objective(recipe)
    assert isinstance(obj, MAE) and obj.num_patches == 16 and obj.backbone.embed_dim == 32
    enc = count_tokens(obj.backbone.blocks[0])
    obj(batch(size=16))
    assert enc == [1 + 8]


@pytest.mark.parametrize("chans", [1, 3])
def test_visualize_writes_png_and_leaves_rng_alone(tmp_path, chans):
    mae = make_mae(img=16, chans=chans)
    torch.manual_seed(3)
    expected_next = torch.rand(3)
    torch.manual_seed(3)
    path = mae.visualize(batch(b=3, c=chans, size=16), tmp_path / "vis" / "recon.png")
    assert torch.equal(torch.rand(3), expected_next)  # training's RNG stream is untouched
    assert mae.training
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[:2] == (480, 480)  # 3 rows x 3 columns of 160 px
    assert [p.name for p in path.parent.iterdir()] == ["recon.png"]


def test_reconstruct_pastes_visible_patches_back():
    mae = make_mae(img=16, norm_pix_loss=True)
    images = batch(b=2, size=16)["image"]
    original, masked, recon = mae.reconstruct(images, seed=4)
    torch.manual_seed(4)
    _, mask, _ = random_masking(2, 16, 0.75)
    m = mask[:, :, None]
    torch.testing.assert_close(patchify(masked, 4), patchify(images, 4) * (1 - m))
    torch.testing.assert_close(patchify(recon, 4) * (1 - m), patchify(images, 4) * (1 - m))
    assert not torch.allclose(patchify(recon, 4) * m, patchify(images, 4) * m)
    assert torch.equal(original, images)


def digits_batch(n: int = 64) -> torch.Tensor:
    """Real images (scikit-learn's bundled 8x8 digits, no download) at 16x16, normalised."""
    x = torch.from_numpy(load_digits().images[:n]).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    return (x - x.mean()) / x.std()


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss():
    mae = make_mae(img=16, mask_ratio=0.5, norm_pix_loss=False)
    b = {"image": digits_batch()}

    def eval_loss() -> float:
        mae.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            losses = []
            for seed in range(4):  # the same four masks before and after
                torch.manual_seed(seed)
                losses.append(mae(b)[0].item())
        mae.train()
        return sum(losses) / len(losses)

    before = eval_loss()
    opt = create_optimizer_v2(mae, "adamw", lr=2e-3, weight_decay=0.05, betas=(0.9, 0.95))
    torch.manual_seed(0)
    for _ in range(40):
        loss, _ = mae(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    # predicting zeros (the mean pixel) everywhere scores the target's mean square: learning must beat that
    zeros = masked_mse_loss(torch.zeros(64, 16, 16), pixel_targets(b["image"], 4, False), torch.ones(64, 16)).item()
    assert math.isfinite(after) and after < 0.6 * before and after < 0.8 * zeros, (before, after, zeros)
