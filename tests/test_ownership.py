"""No command removes or replaces anything it did not write: every writer refuses a folder of other files, another
kind's output and its own inputs by name, and replaces its own output only when told to (--overwrite)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from downstream.__main__ import main as downstream_main
from downstream.demo import main as demo_main
from pretrain.__main__ import main as pretrain_main
from pretrain.backbone import create_backbone, export_backbone
from pretrain.recipe import ModelConfig
from pretrain.trainer import RunInputError, Trainer
from shards.__main__ import main as shards_main
from shards.atomic import atomic_path
from shards.export import export_folder
from shards.manifest import load_manifest
from shards.ownership import MARKER_NAME, OutputExistsError, claim_output, mark_output, marked_kind
from tests.helpers import params, tiny_recipe

TINY = ModelConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def user_folder(path: Path) -> Path:
    """A folder of someone's own files, which no command may touch."""
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("precious")
    return path


def untouched(path: Path) -> bool:
    return sorted(p.name for p in path.iterdir()) == ["thesis.tex"] and (path / "thesis.tex").read_text() == "precious"


def image_folder(root: Path, n: int) -> Path:
    for i in range(n):
        (root / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), color=i * 5).save(root / ("a" if i % 2 else "b") / f"img{i:03d}.png")
    return root


# --- the rule ------------------------------------------------------------------------------------


def test_claim_output_answers_by_marker(tmp_path):
    assert claim_output(tmp_path / "absent", "index") == "new"
    (tmp_path / "empty").mkdir()
    assert claim_output(tmp_path / "empty", "index") == "new"
    with pytest.raises(OutputExistsError, match="vitssl did not write"):
        claim_output(user_folder(tmp_path / "mine"), "index", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        claim_output(tmp_path / "file", "index", overwrite=True)
    ours = tmp_path / "ours"
    ours.mkdir()
    mark_output(ours, "shards")
    (ours / "shard-000000.tar").write_bytes(b"")
    assert marked_kind(ours) == "shards"
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        claim_output(ours, "shards")
    assert claim_output(ours, "shards", overwrite=True) == "replace"
    assert claim_output(ours, "shards", resume=True) == "resume"
    with pytest.raises(OutputExistsError, match="vitssl shards output, not a index"):
        claim_output(ours, "index", overwrite=True)
    (ours / MARKER_NAME).write_text('{"written_by": "someone else", "kind": "shards"}')
    with pytest.raises(OutputExistsError, match="did not write"):
        claim_output(ours, "shards", overwrite=True)


def test_atomic_folder_never_replaces_an_unmarked_folder(tmp_path):
    """The backstop under every folder writer: even a caller that forgot to ask cannot remove a user's folder."""
    mine = user_folder(tmp_path / "mine")
    with pytest.raises(OutputExistsError, match="refusing to replace"), atomic_path(mine) as tmp:
        tmp.mkdir()
        mark_output(tmp, "index")
    assert untouched(mine)
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # the staged folder is gone too
    for kind in ("index", "index"):  # the same kind replaces its own
        with atomic_path(tmp_path / "ours") as tmp:
            tmp.mkdir()
            mark_output(tmp, kind)
            (tmp / "v").write_text(kind)
    with pytest.raises(OutputExistsError), atomic_path(tmp_path / "ours") as tmp:  # another kind does not
        tmp.mkdir()
        mark_output(tmp, "shards")
    assert marked_kind(tmp_path / "ours") == "index"


# --- shards write ---------------------------------------------------------------------------------


def test_shards_write_refuses_user_folders_inputs_and_its_own_set_without_overwrite(tmp_path, capsys):
    photos = image_folder(tmp_path / "photos", 50)
    before = sorted(p.relative_to(photos) for p in photos.rglob("*"))
    for out in (photos, photos / "shards"):  # --out equal to the input, or inside it
        assert shards_main(["write", "folder", str(photos), "--out", str(out)]) == 2
        assert "overlaps the input" in capsys.readouterr().err
    assert sorted(p.relative_to(photos) for p in photos.rglob("*")) == before

    mine = user_folder(tmp_path / "mine")
    assert shards_main(["write", "folder", str(photos), "--out", str(mine)]) == 2
    assert "vitssl did not write" in capsys.readouterr().err and untouched(mine)

    out = tmp_path / "set"
    assert shards_main(["write", "folder", str(photos), "--out", str(out)]) == 0
    assert load_manifest(out).total == 50 and marked_kind(out) == "shards"
    capsys.readouterr()
    few = image_folder(tmp_path / "few", 30)
    assert shards_main(["write", "folder", str(few), "--out", str(out)]) == 2  # the 50-sample set stays
    assert "pass --overwrite" in capsys.readouterr().err and load_manifest(out).total == 50
    assert shards_main(["write", "folder", str(few), "--out", str(out), "--overwrite"]) == 0
    assert "replaced the earlier set of 50 samples" in capsys.readouterr().out
    assert load_manifest(out).total == 30


def test_shards_write_split_checks_both_sets_before_reading(tmp_path, capsys):
    out = tmp_path / "out"
    user_folder(out / "val")
    assert shards_main(["write", "digits", "--out", str(out), "--val-fraction", "0.2"]) == 2
    assert "vitssl did not write" in capsys.readouterr().err
    assert untouched(out / "val") and not (out / "train").exists()


# --- shards export --------------------------------------------------------------------------------


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4), color=value).save(buf, format="PNG")
    return buf.getvalue()


def test_export_never_writes_a_file_twice(digits_shards, tmp_path, capsys):
    shard = digits_shards / "shard-000000.tar"
    out = tmp_path / "twice"
    assert shards_main(["export", f"{shard},{shard}", "--out", str(out)]) == 0  # the same shard named twice
    said = capsys.readouterr().out
    written = [p for p in out.rglob("*.png")]
    assert len(written) == 450 and "wrote 450 images" in said and "(repeated key) 450" in said

    # Keys that read the same once slashes become underscores are two files, not one.
    tar = _tar(tmp_path / "keys.tar", {"d/0001.png": _png(10), "d/0001.cls": b"0",
                                       "d_0001.png": _png(200), "d_0001.cls": b"0"})
    counts = export_folder(str(tar), tmp_path / "keys")
    files = sorted((tmp_path / "keys" / "0").iterdir())
    assert counts == {"0": 2} and len(files) == 2
    assert sorted(Image.open(f).getpixel((0, 0)) for f in files) == [10, 200]


def test_export_refuses_user_folders_and_replaces_its_own_only_with_overwrite(digits_shards, tmp_path, capsys):
    mine = user_folder(tmp_path / "mine")
    assert shards_main(["export", str(digits_shards), "--out", str(mine)]) == 2 and untouched(mine)
    assert shards_main(["export", str(digits_shards), "--out", str(digits_shards / "x")]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    out = tmp_path / "images"
    assert shards_main(["export", str(digits_shards / "shard-000001.tar"), "--out", str(out)]) == 0
    assert shards_main(["export", str(digits_shards / "shard-000000.tar"), "--out", str(out)]) == 2
    assert len(list(out.rglob("*.png"))) == 449
    assert shards_main(["export", str(digits_shards / "shard-000000.tar"), "--out", str(out), "--overwrite"]) == 0
    assert len(list(out.rglob("*.png"))) == 450


# --- index build / add ----------------------------------------------------------------------------


@pytest.fixture
def backbone(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return export_backbone(create_backbone(TINY), tmp_path / "backbone", mean=[0.3], std=[0.3])


def test_index_build_never_deletes_its_input_or_a_user_folder(digits_shards, backbone, tmp_path, capsys):
    shards_before = sorted(p.name for p in digits_shards.iterdir())
    for out in (digits_shards, digits_shards / "index"):
        assert downstream_main(["index", "build", str(backbone), str(digits_shards), "--out", str(out)]) == 1
        assert "overlaps the input" in capsys.readouterr().err
    assert sorted(p.name for p in digits_shards.iterdir()) == shards_before and load_manifest(digits_shards).total
    mine = user_folder(tmp_path / "mine")
    assert downstream_main(["index", "build", str(backbone), str(digits_shards), "--out", str(mine)]) == 1
    assert "vitssl did not write" in capsys.readouterr().err and untouched(mine)
    assert downstream_main(["index", "build", str(backbone), str(digits_shards), "--out", str(backbone)]) == 1
    assert "vitssl backbone output, not a index" in capsys.readouterr().err
    assert (backbone / "model.safetensors").is_file()

    index = tmp_path / "index"
    shard = str(digits_shards / "shard-000000.tar")
    assert downstream_main(["index", "build", str(backbone), shard, "--out", str(index)]) == 0
    assert downstream_main(["index", "build", str(backbone), str(digits_shards), "--out", str(index)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert json.loads((index / "info.json").read_text())["count"] == 450
    assert downstream_main(["index", "build", str(backbone), str(digits_shards), "--out", str(index),
                            "--overwrite"]) == 0
    assert json.loads((index / "info.json").read_text())["count"] == 1797
    assert marked_kind(index) == "index"


# --- pretrain export and run folders --------------------------------------------------------------


def test_pretrain_export_never_writes_into_someone_elses_model_folder(backbone, tmp_path, capsys):
    theirs = tmp_path / "their-model"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"their weights")
    (theirs / "config.json").write_text("{}")
    assert pretrain_main(["export", str(backbone), "--out", str(theirs)]) != 0
    assert "vitssl did not write" in capsys.readouterr().err
    assert (theirs / "model.safetensors").read_bytes() == b"their weights"

    assert pretrain_main(["export", str(backbone), "--out", str(backbone)]) != 0  # --out equal to its input
    assert "pass --overwrite" in capsys.readouterr().err and (backbone / "model.safetensors").is_file()
    out = tmp_path / "exported"
    assert pretrain_main(["export", str(backbone), "--out", str(out)]) == 0
    weights = params(out)
    assert pretrain_main(["export", str(backbone), "--out", str(out)]) != 0
    assert "pass --overwrite" in capsys.readouterr().err
    assert pretrain_main(["export", str(backbone), "--out", str(out), "--overwrite"]) == 0
    again = params(out)  # compared as tensors: safetensors writes its metadata map in no fixed order
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    assert marked_kind(out) == "backbone"


def test_a_run_never_writes_into_a_folder_of_other_files(digits_shards, tmp_path):
    mine = user_folder(tmp_path / "mine")
    with pytest.raises(RunInputError, match="run.out_dir: .*vitssl did not write"):
        Trainer(tiny_recipe(digits_shards, mine))
    assert untouched(mine)
    with pytest.raises(RunInputError, match="run.out_dir: .*vitssl shards output, not a run"):  # its own input
        Trainer(tiny_recipe(digits_shards, digits_shards))


def test_demo_fresh_deletes_only_a_demo_folder(tmp_path, capsys):
    mine = user_folder(tmp_path / "mine")
    assert demo_main(["--out", str(mine), "--fresh"]) == 2
    assert "vitssl did not write" in capsys.readouterr().err and untouched(mine)
