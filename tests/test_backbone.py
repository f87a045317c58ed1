"""The timm ViT backbone: factory, sin-cos position embedding, visible-token forward, export/load, fingerprint."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import resolve_model_data_config
from timm.models.vision_transformer import VisionTransformer

from pretrain.backbone import (
    ALLOWED_CONFIG_KEYS,
    CONFIG_FILE,
    WEIGHTS_FILE,
    backbone_config,
    create_backbone,
    export_backbone,
    fingerprint,
    forward_masked,
    forward_visible,
    load_backbone,
    model_from_config,
    sincos_2d_pos_embed,
)
from pretrain.recipe import ModelConfig, RecipeError
from shards.ownership import MARKER_NAME


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, pos_embed="sincos")
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def model() -> VisionTransformer:
    torch.manual_seed(0)
    return create_backbone(tiny_cfg()).eval()


def images(b: int = 3, c: int = 1, size: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def tokens_into_first_block(model: VisionTransformer) -> tuple[list[int], object]:
    seen: list[int] = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    return seen, handle


# --- factory ---------------------------------------------------------------------------------------------------


def test_create_backbone_dims_and_flags(model):
    assert isinstance(model, VisionTransformer)
    assert model.embed_dim == 32 and len(model.blocks) == 2 and model.blocks[0].attn.num_heads == 2
    assert model.patch_embed.img_size == (28, 28) and model.patch_embed.patch_size == (4, 4)
    assert model.in_chans == 1 and model.num_classes == 0 and isinstance(model.head, torch.nn.Identity)
    assert model.dynamic_img_size
    assert all(blk.attn.fused_attn for blk in model.blocks)  # scaled_dot_product_attention stays on
    assert model(images()).shape == (3, 32)  # cls token features


def test_mlp_ratio_and_name_defaults():
    m = create_backbone(tiny_cfg(mlp_ratio=2.0))
    assert m.blocks[0].mlp.fc1.out_features == 64
    default = create_backbone(ModelConfig(img_size=32, patch_size=16))  # vit_tiny's own 192-d, 12 blocks
    assert default.embed_dim == 192 and len(default.blocks) == 12 and default.in_chans == 3


def test_sincos_pos_embed_is_frozen_and_correct(model):
    pe = model.pos_embed
    assert not pe.requires_grad
    assert torch.all(pe[0, 0] == 0)  # cls position
    dim, grid_w, quarter = 32, 7, 8
    freqs = [10000 ** (-k / quarter) for k in range(quarter)]
    for h, w in [(0, 0), (0, 1), (3, 5), (6, 6), (2, 0)]:
        expected = (
            [math.sin(h * f) for f in freqs]
            + [math.sin(w * f) for f in freqs]
            + [math.cos(h * f) for f in freqs]
            + [math.cos(w * f) for f in freqs]
        )
        got = pe[0, 1 + h * grid_w + w]
        assert got.shape == (dim,)
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)
    # a step of AdamW leaves it untouched: it is not a trainable parameter
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = pe.detach().clone()
    model.train()(images()).sum().backward()
    opt.step()
    assert pe.grad is None and torch.equal(pe, before)


def test_learned_pos_embed_keeps_timm_init():
    torch.manual_seed(0)
    m = create_backbone(tiny_cfg(pos_embed="learn"))
    assert m.pos_embed.requires_grad
    assert 0.005 < m.pos_embed.std().item() < 0.05  # timm's trunc_normal(std=0.02), not sin-cos (std ~0.7)


def test_sincos_needs_dim_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        create_backbone(tiny_cfg(embed_dim=30, num_heads=3))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed((2, 2), 6)


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="no_such_vit"):
        create_backbone(tiny_cfg(name="no_such_vit"))
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        create_backbone(tiny_cfg(name="resnet18", pos_embed="learn"))
    with pytest.raises(RecipeError, match="multiple"):
        create_backbone(tiny_cfg(img_size=30))


def test_grad_checkpointing_gives_same_values_and_grads():
    torch.manual_seed(0)
    plain = create_backbone(tiny_cfg())
    ckpt = create_backbone(tiny_cfg(grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x = images()
    ids = torch.tensor([[0, 5, 9], [1, 2, 3], [48, 20, 7]])
    out_p, out_c = forward_visible(plain, x, ids), forward_visible(ckpt, x, ids)
    torch.testing.assert_close(out_p, out_c)
    out_p.square().sum().backward()
    out_c.square().sum().backward()
    torch.testing.assert_close(plain.blocks[0].attn.qkv.weight.grad, ckpt.blocks[0].attn.qkv.weight.grad)


# --- visible-token forward ---------------------------------------------------------------------------------


def test_forward_visible_all_tokens_equals_forward_features(model):
    x = images()
    torch.testing.assert_close(forward_visible(model, x), model.forward_features(x))
    all_ids = torch.arange(49).expand(3, -1)
    torch.testing.assert_close(forward_visible(model, x, all_ids), model.forward_features(x))


def test_masked_patches_get_no_encoder_compute(model):
    seen, handle = tokens_into_first_block(model)
    ids = torch.stack([torch.randperm(49)[:12] for _ in range(3)])
    out = forward_visible(model, images(), ids)
    handle.remove()
    assert seen == [1 + 12]  # cls + the 12 kept patches, nothing else entered the blocks
    assert out.shape == (3, 13, 32)


def test_dropped_patches_do_not_influence_output(model):
    x = images(b=2)
    ids = torch.tensor([[0, 1, 2, 10], [48, 47, 30, 8]])
    out = forward_visible(model, x, ids)
    x2 = x.clone()
    x2[0, :, 0:4, 12:16] += 5.0  # patch (0, 3) = index 3: not kept by sample 0
    x2[1, :, 0:4, 0:4] -= 5.0  # patch 0: not kept by sample 1
    torch.testing.assert_close(forward_visible(model, x2, ids), out)
    x3 = x.clone()
    x3[0, :, 0:4, 8:12] += 5.0  # patch (0, 2) = index 2: kept by sample 0
    out3 = forward_visible(model, x3, ids)
    assert not torch.allclose(out3[0], out[0])
    torch.testing.assert_close(out3[1], out[1])


def test_token_order_follows_ids_keep(model):
    # attention is permutation-equivariant: permuting ids_keep permutes the patch outputs, cls unchanged
    x = images(b=1)
    ids = torch.tensor([[3, 17, 40, 22]])
    perm = torch.tensor([2, 0, 3, 1])
    a = forward_visible(model, x, ids)
    b = forward_visible(model, x, ids[:, perm])
    torch.testing.assert_close(b[:, 1:], a[:, 1:][:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[:, 0], a[:, 0], atol=1e-5, rtol=1e-5)


def test_forward_visible_other_resolution(model):
    # dynamic_img_size: a 16x16 crop (4x4 patches) through the same 28x28 model, pos embed resampled by timm
    x = images(b=2, size=16)
    torch.testing.assert_close(forward_visible(model, x), model.forward_features(x))
    seen, handle = tokens_into_first_block(model)
    out = forward_visible(model, x, torch.tensor([[0, 15, 5], [1, 2, 3]]))
    handle.remove()
    assert out.shape == (2, 4, 32) and seen == [4]


def test_forward_visible_rejects_bad_ids(model):
    with pytest.raises(ValueError, match="outside"):
        forward_visible(model, images(b=1), torch.tensor([[0, 49]]))
    with pytest.raises(ValueError, match="ids_keep must be"):
        forward_visible(model, images(b=2), torch.tensor([[0, 1]]))


def test_forward_masked_runs_every_token_and_hides_masked_pixels(model):
    x = images(b=2)
    mask = torch.zeros(2, 49)
    token = torch.randn(1, 1, 32)
    torch.testing.assert_close(forward_masked(model, x, mask, token), model.forward_features(x))
    mask[:, ::2] = 1
    seen, handle = tokens_into_first_block(model)
    out = forward_masked(model, x, mask, token)
    handle.remove()
    assert seen == [50] and out.shape == (2, 50, 32)
    x2 = x.clone()
    x2[:, :, 0:4, 0:4] += 3.0  # patch 0 is masked: its pixels must not matter
    torch.testing.assert_close(forward_masked(model, x2, mask, token), out)
    with pytest.raises(ValueError, match="mask must be"):
        forward_masked(model, x, mask[:, :10], token)


# --- config, export, load, fingerprint ---------------------------------------------------------------------------


def test_backbone_config_from_cfg_equals_from_model(model):
    cfg = backbone_config(model)
    assert cfg == backbone_config(tiny_cfg())
    assert json.loads(json.dumps(cfg)) == cfg
    rebuilt = timm.create_model(**cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_export_then_rebuild_with_plain_timm(model, tmp_path):
    out = export_backbone(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, MARKER_NAME])  # no leftovers
    # only timm + safetensors + json: no code of this project
    config = json.loads((out / CONFIG_FILE).read_text())
    plain = timm.create_model(**config)
    plain.load_state_dict(load_file(out / WEIGHTS_FILE), strict=True)
    plain.eval()
    x = images()
    torch.testing.assert_close(plain(x), model(x), atol=0, rtol=0)
    torch.testing.assert_close(plain(images(size=16)), model(images(size=16)), atol=0, rtol=0)
    loaded = load_backbone(out)
    torch.testing.assert_close(loaded.eval()(x), model(x), atol=0, rtol=0)
    assert fingerprint(loaded) == fingerprint(model)
    assert load_backbone(out / WEIGHTS_FILE).embed_dim == 32  # a file in the folder works too


def test_export_records_input_size_and_normalisation(model, tmp_path):
    out = export_backbone(model, tmp_path / "e", mean=[0.286], std=[0.353])
    data_cfg = resolve_model_data_config(timm.create_model(**json.loads((out / CONFIG_FILE).read_text())))
    assert tuple(data_cfg["input_size"]) == (1, 28, 28)
    assert list(data_cfg["mean"]) == [0.286] and list(data_cfg["std"]) == [0.353]
    assert resolve_model_data_config(load_backbone(out))["mean"] == data_cfg["mean"]
    with pytest.raises(ValueError, match="mean/std need 1 values"):
        export_backbone(model, tmp_path / "bad", mean=[0.1, 0.2, 0.3], std=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="both mean and std"):
        export_backbone(model, tmp_path / "bad", mean=[0.1])


def test_fingerprint_is_stable_and_sensitive(model):
    fp = fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(model) == fp
    torch.manual_seed(0)
    assert fingerprint(create_backbone(tiny_cfg())) == fp  # same seed, same weights
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[0] += 1e-3
    assert fingerprint(model) != fp
    torch.manual_seed(0)
    assert fingerprint(create_backbone(tiny_cfg(mlp_ratio=2.0))) != fp


def test_load_missing_files(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_backbone(tmp_path / "nowhere")
    out = export_backbone(model, tmp_path / "e")
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_backbone(out)


def test_load_truncated_weights(model, tmp_path):
    out = export_backbone(model, tmp_path / "e")
    data = (out / WEIGHTS_FILE).read_bytes()
    (out / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=WEIGHTS_FILE):
        load_backbone(out)


def test_load_foreign_files(model, tmp_path):
    out = export_backbone(model, tmp_path / "e")
    (out / WEIGHTS_FILE).write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(ValueError, match=WEIGHTS_FILE):
        load_backbone(out)
    # a valid safetensors file of some other network
    save_file({"conv.weight": torch.zeros(3, 3)}, out / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="missing") as e:
        load_backbone(out)
    assert WEIGHTS_FILE in str(e.value)
    # weights of a deeper backbone with the same names
    export_backbone(create_backbone(tiny_cfg(depth=3)), tmp_path / "deeper")
    (out / WEIGHTS_FILE).write_bytes((tmp_path / "deeper" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="unexpected"):
        load_backbone(out)


def test_load_bad_config(model, tmp_path):
    out = export_backbone(model, tmp_path / "e")
    (out / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=CONFIG_FILE):
        load_backbone(out)
    (out / CONFIG_FILE).write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="model_name"):
        load_backbone(out)
    (out / CONFIG_FILE).write_text(json.dumps({"model_name": "no_such_vit"}))
    with pytest.raises(ValueError, match="create_model"):
        load_backbone(out)
    (out / CONFIG_FILE).write_text(json.dumps({"model_name": "resnet18", "pretrained": False}))
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        load_backbone(out)


# An exported config.json is untrusted input: only architecture keys may reach timm.create_model.
@pytest.mark.parametrize(
    "extra, key",
    [
        ({"checkpoint_path": "/etc/other_weights.pth"}, "checkpoint_path"),
        ({"pretrained": True}, "pretrained"),
        ({"pretrained_cfg": {"file": "/tmp/x.pth"}}, "pretrained_cfg"),
        ({"cache_dir": "/tmp"}, "cache_dir"),
        ({"pretrained_cfg_overlay": {"input_size": [1, 28, 28], "url": "http://x"}}, "pretrained_cfg_overlay.url"),
    ],
)
def test_load_refuses_non_architecture_keys(model, tmp_path, extra, key):
    out = export_backbone(model, tmp_path / "e", mean=[0.286], std=[0.353])
    config = json.loads((out / CONFIG_FILE).read_text())
    if "pretrained_cfg_overlay" in extra:  # a foreign field inside the data-statistics overlay
        config["pretrained_cfg_overlay"].update(extra["pretrained_cfg_overlay"])
    else:
        config.update(extra)
    (out / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        load_backbone(out)
    msg = str(e.value)
    assert key in msg and CONFIG_FILE in msg
    if key != "pretrained" and "." not in key:
        assert "allowed keys" in msg and "embed_dim" in msg  # says what would have been accepted


def test_load_refuses_hub_and_path_model_names(tmp_path):
    for name in ("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "local-dir:/tmp/elsewhere"):
        with pytest.raises(ValueError, match="not a model in timm's registry"):
            model_from_config({"model_name": name}, tmp_path / CONFIG_FILE)


def test_export_writes_only_allowed_keys_and_round_trips(model, tmp_path):
    out = export_backbone(model, tmp_path / "e", mean=[0.286], std=[0.353])
    config = json.loads((out / CONFIG_FILE).read_text())
    assert set(config) <= set(ALLOWED_CONFIG_KEYS) and config["pretrained"] is False
    loaded = load_backbone(out).eval()
    torch.testing.assert_close(loaded(images()), model(images()), atol=0, rtol=0)
    assert list(resolve_model_data_config(loaded)["mean"]) == [0.286]
