"""Attention maps: the recomputed CLS-to-patch attention equals timm's own (unfused) weights; PNGs for DINO,
MAE and exported backbones."""

from __future__ import annotations

import io

import pytest
import timm
import torch
from PIL import Image

from downstream.__main__ import main
from downstream.attention import attention_maps, first_images
from pretrain.attention_maps import attention_grid_png, cls_attention
from pretrain.backbone import export_backbone
from pretrain.recipe import load_recipe
from pretrain.trainer import Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(pretrained=False, num_classes=0, img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                num_heads=2, dynamic_img_size=True)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kw}).eval()


def timm_attention_weights(model, images) -> torch.Tensor:
    """The last block's softmax weights as timm's unfused path computes them (caught at its attn_drop)."""
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    caught = []
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: caught.append(o))
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        handle.remove()
        attn.fused_attn = True
    return caught[0]


@pytest.mark.parametrize("size", [16, 24])
def test_cls_attention_equals_timms_own_weights(size):
    model = vit()
    images = torch.randn(3, 1, size, size)
    maps = cls_attention(model, images)
    g = size // 4
    assert maps.shape == (3, 2, g, g)
    full = timm_attention_weights(model, images)  # (B, heads, N, N)
    torch.testing.assert_close(maps, full[:, :, 0, 1:].reshape(3, 2, g, g), rtol=1e-5, atol=1e-6)
    # the CLS token's own share is left out: a map sums to less than 1
    assert bool((maps.sum(dim=(-2, -1)) < 1).all()) and bool((maps >= 0).all())


def test_register_tokens_are_left_out():
    model = vit(reg_tokens=2, class_token=True)
    images = torch.randn(2, 1, 16, 16)
    maps = cls_attention(model, images)
    full = timm_attention_weights(model, images)
    torch.testing.assert_close(maps, full[:, :, 0, 3:].reshape(2, 2, 4, 4), rtol=1e-5, atol=1e-6)


def test_png_grid_is_a_valid_png_of_the_expected_size(tmp_path):
    model = vit()
    images = torch.randn(5, 1, 16, 16)
    path = attention_grid_png(model, images, tmp_path / "sub" / "attn.png", (0.5,), (0.25,), max_images=4)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    img = Image.open(io.BytesIO(data))
    img.verify()
    # 4 rows (max_images) x (image + 2 heads + mean) columns of 1.3 inch at 100 dpi
    assert Image.open(path).size == (round(4 * 1.3 * 100), round(4 * 1.3 * 100))
    assert not list(tmp_path.rglob("*.tmp"))
    rgb = vit(in_chans=3, num_heads=4)
    p3 = attention_grid_png(rgb, torch.randn(2, 3, 16, 16), tmp_path / "rgb.png", (0.5,) * 3, (0.25,) * 3)
    assert Image.open(p3).size == (round(6 * 1.3 * 100), round(2 * 1.3 * 100))


def test_attention_maps_for_an_mae_checkpoint_and_an_export(digits_shards, tmp_path):
    out = tmp_path / "mae"
    recipe = load_recipe(None, [
        "model.img_size=16", "model.patch_size=4", "model.in_chans=1", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "model.pos_embed=sincos", "objective.mae.decoder_embed_dim=32",
        "objective.mae.decoder_depth=1", "objective.mae.decoder_num_heads=2", "data.batch_size=32",
        "data.num_workers=0", "run.progress=false", "run.trackers=[jsonl]", "run.max_steps=2",
        "run.visualize=false", f"data.train={digits_shards}", f"run.out_dir={out}",
    ])
    result = Trainer(recipe).fit()
    for source in (result.checkpoint, out):
        png = attention_maps(source, digits_shards, tmp_path / f"{source.name}.png", n_images=3)
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert Image.open(png).size == (round(4 * 1.3 * 100), round(3 * 1.3 * 100))
    # an exported backbone of another image size, and the command line
    exported = export_backbone(vit(img_size=24), tmp_path / "export")
    assert first_images(vit(img_size=24), digits_shards, 2).shape == (2, 1, 24, 24)
    assert main(["attention", str(exported), str(digits_shards), "--out", str(tmp_path / "cli.png"),
                 "--images", "2", "--device", "cpu"]) == 0
    assert (tmp_path / "cli.png").read_bytes()[:8] == PNG_MAGIC
    assert main(["attention", str(tmp_path / "nothing"), str(digits_shards), "--out", str(tmp_path / "x.png")]) == 1
    assert not (tmp_path / "x.png").exists()
