"""Recipe schema: types, defaults, dotted overrides, and errors before any compute."""

import re
from pathlib import Path

import pytest
import yaml

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
def test_every_shipped_recipe_loads(path, request):
    """As shipped; a recipe with `auto` values reads them off its training data, here the digits."""
    auto = re.search(r"^\s+(in_chans|img_size|local_crop_size|mean|std):\s*auto\b", path.read_text(), re.M)
    load_recipe(path, [f"data.train={request.getfixturevalue('digits_shards')}"] if auto else [])


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


# --- every range and geometry check names the full key and the value given -----------------------------------

DINO = ["objective.name=dino"]
CLIP = ["objective.name=clip"]
SUP = ["objective.name=supervised"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["run.checkpoint_every_steps=-5"], "run.checkpoint_every_steps=-5: must be >= 0"),
        (["run.checkpoint_every_minutes=-1"], "run.checkpoint_every_minutes=-1"),
        (["run.keep_last=0"], "run.keep_last=0: must be >= 1"),
        (["run.max_steps=-1"], "run.max_steps=-1"),
        (["run.max_minutes=-2"], "run.max_minutes=-2"),
        (["run.max_minutes=inf"], "run.max_minutes=inf: must be a finite number"),
        (["run.log_every=0"], "run.log_every=0"),
        (["run.nonfinite_patience=0"], "run.nonfinite_patience=0"),
        (["run.seed=-1"], "run.seed=-1: must be in [0, "),
        (["run.out_dir=''"], "run.out_dir='': must name a folder"),
        (["data.epoch_samples=-1"], "data.epoch_samples=-1: must be >= 0"),
        (["data.shuffle_buffer=-1"], "data.shuffle_buffer=-1: must be >= 0"),
        (["data.mode=resampled"], "data.epoch_samples=0: data.mode='resampled' needs"),
        (["model.img_size=0"], "model.img_size=0: must be > 0"),
        (["model.patch_size=0"], "model.patch_size=0: must be > 0"),
        (["model.img_size=30"], "model.img_size=30 is not a multiple of model.patch_size=16: images must tile into "
                                "whole patches, e.g. model.img_size=16 or 32"),
        (["model.embed_dim=-8"], "model.embed_dim=-8: must be >= 0"),
        (["model.depth=-1"], "model.depth=-1"),
        (["model.num_heads=-2"], "model.num_heads=-2"),
        (["model.mlp_ratio=-1"], "model.mlp_ratio=-1"),
        (["model.drop_path_rate=1.5"], "model.drop_path_rate=1.5: must be in [0, 1)"),
        (["model.embed_dim=30", "model.num_heads=3", "model.pos_embed=sincos"], "model.embed_dim=30: model.pos_embed"),
        (["objective.mae.decoder_embed_dim=0"], "objective.mae.decoder_embed_dim=0: must be > 0"),
        (["objective.mae.decoder_depth=0"], "objective.mae.decoder_depth=0: must be >= 1"),
        (["objective.mae.decoder_num_heads=0"], "objective.mae.decoder_num_heads=0"),
        (["objective.mae.decoder_embed_dim=30", "objective.mae.decoder_num_heads=4"],
         "objective.mae.decoder_embed_dim=30 is not divisible by objective.mae.decoder_num_heads=4"),
        # 16x16 images in 8x8 patches: 4 patches, and int(4 x 0.2) = 0 stay visible
        (["model.img_size=16", "model.patch_size=8", "objective.mae.mask_ratio=0.8"],
         "objective.mae.mask_ratio=0.8: keeps int(4 x (1 - 0.8)) = 0"),
        (["model.in_chans=1", "objective.mae.mean=[0.1,0.2,0.3]", "objective.mae.std=[1.0,1.0,1.0]"],
         "objective.mae.mean=[0.1,0.2,0.3]: 3 values for model.in_chans=1"),
        ([*DINO, "objective.dino.freeze_last_layer=-1"], "objective.dino.freeze_last_layer=-1: must be >= 0"),
        ([*DINO, "objective.dino.momentum_teacher=1.5"], "objective.dino.momentum_teacher=1.5: must be in [0, 1]"),
        ([*DINO, "objective.dino.center_momentum=1.0"], "objective.dino.center_momentum=1: must be in [0, 1)"),
        ([*DINO, "objective.dino.global_crop_size=-16"], "objective.dino.global_crop_size=-16: must be >= 0"),
        ([*DINO, "objective.dino.local_crops_number=-1"], "objective.dino.local_crops_number=-1: must be >= 0"),
        ([*DINO, "objective.dino.local_crop_size=0"], "objective.dino.local_crop_size=0: must be > 0"),
        ([*DINO, "objective.dino.warmup_teacher_temp_epochs=-1"], "objective.dino.warmup_teacher_temp_epochs=-1"),
        ([*DINO, "objective.dino.collapse_warn_every=0"], "objective.dino.collapse_warn_every=0"),
        ([*DINO, "objective.dino.collapse_warn_std=-1"], "objective.dino.collapse_warn_std=-1"),
        ([*CLIP, "objective.clip.text_context_length=2"], "objective.clip.text_context_length=2: must be >= 3"),
        ([*CLIP, "objective.clip.text_mlp_ratio=0"], "objective.clip.text_mlp_ratio=0"),
        ([*CLIP, "objective.clip.text_vocab_size=100"], "objective.clip.text_vocab_size=100 is smaller"),
        ([*SUP, "objective.supervised.num_classes=1"], "objective.supervised.num_classes=1: must be >= 2"),
        ([*SUP, "objective.supervised.label_smoothing=1.0"], "objective.supervised.label_smoothing=1: must be in [0, 1)"),
        ([*SUP, "objective.supervised.mixup=-1"], "objective.supervised.mixup=-1"),
        ([*SUP, "objective.supervised.cutmix=-1"], "objective.supervised.cutmix=-1"),
        ([*SUP, "objective.supervised.mixup_prob=2"], "objective.supervised.mixup_prob=2"),
        (["optim.momentum=1.5"], "optim.momentum=1.5: must be in [0, 1)"),
        (["optim.warmup_epochs=-1"], "optim.warmup_epochs=-1: must be >= 0"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps=-1: must be >= 0"),
        (["optim.eps=0"], "optim.eps=0"),
        (["optim.clip_grad=-1"], "optim.clip_grad=-1"),
        (["optim.layer_decay=2"], "optim.layer_decay=2"),
        (["optim.weight_decay_end=-0.5"], "optim.weight_decay_end=-0.5: must be >= 0, or -1"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_bad_values_name_full_key_value_and_bound(overrides, fragment):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, overrides)
    assert fragment in str(e.value)


def test_dino_crops_must_tile_into_patches_at_load():
    base = [*DINO, "model.img_size=28", "model.patch_size=7"]
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [*base, "objective.dino.local_crop_size=16"])
    msg = str(e.value)
    assert "objective.dino.local_crop_size=16 is not a multiple" in msg and "model.patch_size=7" in msg
    assert "14 or 21" in msg  # what would be allowed
    with pytest.raises(RecipeError, match=r"objective.dino.global_crop_size=30 is not a multiple.*patch_size=7"):
        load_recipe(None, [*base, "objective.dino.local_crop_size=14", "objective.dino.global_crop_size=30"])
    r = load_recipe(None, [*base, "objective.dino.local_crop_size=14"])  # global 0 = model.img_size = 28
    assert (r.objective.dino.global_crop_size, r.objective.dino.local_crop_size) == (0, 14)
    # no local crops: their size is never used, so it is not checked
    assert load_recipe(None, [*base, "objective.dino.local_crops_number=0"]).objective.dino.local_crop_size == 96


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.betas=abc", "optim.betas='abc': expected a list of 2 floats, e.g. optim.betas=[0.9,0.95]"),
        ("optim.betas=[0.9,x]", "optim.betas=[0.9,'x']: expected a list of 2 floats"),
        ("optim.betas={a: 1}", "optim.betas={'a': 1}: expected a list of 2 floats"),
        ("optim.base_lr=fast", "optim.base_lr='fast': expected a number, e.g. optim.base_lr=0.00015"),
        ("data.batch_size=1.5", "data.batch_size=1.5: expected an integer, e.g. data.batch_size=64"),
        ("run.cpu=maybe", "run.cpu='maybe': expected true or false, e.g. run.cpu=false"),
        ("data.train=[1]", "data.train=[1]: expected a string, e.g. data.train=data/fmnist/train"),
        ("model.img_size=null", "model.img_size=null: expected an integer, e.g. model.img_size=224"),
        ("objective.mae.mean=x", "objective.mae.mean='x': expected a list of floats, e.g. objective.mae.mean=[0.485"),
        ("optim=5", "optim=5: expected a section"),
    ],
)
def test_type_errors_name_key_value_type_and_example(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [override])
    assert message in str(e.value)


def test_type_error_in_yaml_names_file_key_and_value(tmp_path):
    p = write(tmp_path, "optim:\n  betas: [0.9, high]\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}: optim.betas=[0.9,'high']: expected a list of 2 floats, e.g.")


def test_string_fields_keep_yaml_words(tmp_path):
    # YAML reads an unquoted `no` as false; on the command line a string field keeps the text typed
    r = load_recipe(None, ["run.precision=no", "data.train=123", "run.resume=never"])
    assert (r.run.precision, r.data.train, r.run.resume) == ("no", "123", "never")
    # in a file the word is gone by the time we see it: say so, and how to quote it
    with pytest.raises(RecipeError, match=r"run.precision=false: expected a string.*quote it, e.g. precision: \"no\""):
        load_recipe(write(tmp_path, "run:\n  precision: no\n"))


def test_empty_yaml_section_means_defaults(tmp_path):
    r = load_recipe(write(tmp_path, "objective:\n  name: mae\n  mae:\n    # nothing set\n"))
    assert r.objective.mae.mask_ratio == 0.75


@pytest.mark.parametrize("given", ["data.val=null", "data.val="])
def test_data_val_null_or_empty_means_no_validation_set(given):
    for overrides in ([given], ["data.val=''"], ["data.val=data/x/val", given]):  # '' keeps working too
        assert load_recipe(None, overrides).data.val == ""  # one normalised value for every reader
    assert load_recipe(None, [given, "data.val=data/x/val"]).data.val == "data/x/val"


def test_data_val_null_in_yaml(tmp_path):
    assert load_recipe(write(tmp_path, "data:\n  val: null\n")).data.val == ""
    assert load_recipe(write(tmp_path, "data:\n  val:\n")).data.val == ""


def test_allow_pipe_key_defaults_off():
    assert load_recipe(None).data.allow_pipe is False
    assert load_recipe(None, ["data.allow_pipe=true"]).data.allow_pipe is True


# --- the command line ----------------------------------------------------------------------------------------


def test_print_flag_anywhere(capsys, digits_shards):
    from pretrain.__main__ import main

    recipe = str(RECIPES / "quickstart_mae_digits.yaml")
    data = [f"data.train={digits_shards}", "data.val=null"]  # --print checks the shard sets as a run does
    for argv in ([recipe, "--print", "run.epochs=2"], ["--print", recipe, "run.epochs=2"], [recipe, "run.epochs=2", "--print"]):
        assert main([*argv, *data]) == 0, argv
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["run"]["epochs"] == 2 and printed["model"]["img_size"] == 16


def test_print_runs_the_full_validation(capsys):
    from pretrain.__main__ import main

    recipe = str(RECIPES / "dino_vit_tiny_fmnist.yaml")
    assert main([recipe, "--print", "objective.dino.local_crop_size=16"]) == 2
    err = capsys.readouterr().err
    assert "objective.dino.local_crop_size=16 is not a multiple" in err and "model.patch_size=7" in err


@pytest.mark.parametrize("key", ["data.train", "data.val"])
def test_print_checks_the_shard_sets_like_a_training_run(capsys, digits_shards, tmp_path, key):
    """`--print` says it validates like a training run: a shard set that cannot be read fails it too."""
    from pretrain.__main__ import main

    data = {"data.train": str(digits_shards), "data.val": "null", key: str(tmp_path / "nowhere")}
    assert main([str(RECIPES / "quickstart_mae_digits.yaml"), "--print", *(f"{k}={v}" for k, v in data.items())]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith(f"error: {key}='{tmp_path}/nowhere' cannot be read")


@pytest.mark.parametrize(("content", "said"), [
    (b"data: [\n  train: x\n", "not valid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'"),
    (b"data: {train: *x}\n", "not valid YAML at line 1, column 15: found undefined alias 'x'"),
    (b"run: !!python/object/apply:os.system [ls]\n",
     "not valid YAML at line 1, column 6: could not determine a constructor for the tag"),
    (b"\xff\xfe\x00data", "not a text file (byte 0 is not UTF-8); a recipe is a YAML file"),
])
def test_a_recipe_file_that_is_not_yaml_is_one_named_error(tmp_path, content, said):
    """Not YAMLError or UnicodeDecodeError tracebacks: the file, where the parser stopped, and why."""
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: {said}") and "\n" not in str(caught.value)
