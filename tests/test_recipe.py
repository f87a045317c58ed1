"""Recipe schema: types, defaults, dotted overrides, and errors before any compute."""

from pathlib import Path

import pytest

from pretrain.recipe import Recipe, RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_types():
    r = load_recipe(None)
    assert isinstance(r, Recipe)
    assert r.objective.name == "mae" and r.objective.mae.mask_ratio == 0.75
    assert r.optim.betas == [0.9, 0.95]


def test_yaml_and_dotted_overrides(tmp_path):
    p = write(tmp_path, "optim:\n  base_lr: 1.0e-3\nmodel:\n  img_size: 28\n  patch_size: 4\n  in_chans: 1\n")
    r = load_recipe(p, ["optim.base_lr=3e-4", "objective.mae.mask_ratio=0.6", "run.trackers=[jsonl]"])
    assert r.optim.base_lr == pytest.approx(3e-4)
    assert r.objective.mae.mask_ratio == pytest.approx(0.6)
    assert r.model.img_size == 28 and r.run.trackers == ["jsonl"]


def test_unknown_key_lists_valid_keys(tmp_path):
    p = write(tmp_path, "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "base_lr" in msg and "weight_decay" in msg


def test_unknown_section_and_override(tmp_path):
    with pytest.raises(RecipeError, match="valid keys: .*'data'.*'optim'"):
        load_recipe(write(tmp_path, "optimiser:\n  lr: 1\n"))
    with pytest.raises(RecipeError, match="objective.mae.ratio.*mask_ratio"):
        load_recipe(None, ["objective.mae.ratio=0.5"])
    with pytest.raises(RecipeError, match="not of the form"):
        load_recipe(None, ["optim.base_lr"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("objective.mae.mask_ratio=1.0", "mask_ratio"),
        ("objective.mae.mask_ratio=0", "mask_ratio"),
        ("optim.base_lr=-0.1", "base_lr"),
        ("model.img_size=30", "not a multiple"),
        ("run.precision=fp8", "run.precision"),
        ("data.mode=random", "data.mode"),
        ("optim.accum_steps=0", "accum_steps"),
        ("objective.name=nope", "objective.name"),
    ],
)
def test_out_of_range_values_are_errors(override, fragment):
    with pytest.raises(RecipeError, match=fragment):
        load_recipe(None, [override])


def test_wrong_type_is_error(tmp_path):
    with pytest.raises(RecipeError, match="base_lr"):
        load_recipe(write(tmp_path, "optim:\n  base_lr: fast\n"))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    load_recipe(path)


def test_mae_paper_recipe_matches_the_paper():
    """He et al. 2022, ViT-B/16 pretraining: values a recipe must never drift from silently."""
    r = load_recipe(RECIPES / "mae_vit_base_in1k.yaml")
    assert r.model.name == "vit_base_patch16_224" and r.model.img_size == 224 and r.model.patch_size == 16
    assert r.model.pos_embed == "sincos"
    m = r.objective.mae
    assert (m.mask_ratio, m.norm_pix_loss) == (0.75, True)
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
    o = r.optim
    assert o.name == "adamw" and o.base_lr == pytest.approx(1.5e-4) and o.weight_decay == pytest.approx(0.05)
    assert o.betas == [0.9, 0.95] and o.warmup_epochs == 40
    assert r.run.epochs == 800
    # global batch 4096 on the 8-GPU launch config the recipe names
    assert r.data.batch_size * 8 * o.accum_steps == 4096
