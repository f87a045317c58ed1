"""Index shards with a backbone, extend the index, query it by image file and by key, through the CLI too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from downstream.__main__ import main
from downstream.features import extract_features
from downstream.retrieval import RetrievalError, RetrievalIndex
from downstream.search import add_to_index, build_index, evaluate_index, index_summary, query_index
from pretrain.backbone import create_backbone, export_backbone
from pretrain.recipe import ModelConfig
from pretrain.restore import load_backbone_from
from shards.tar import iter_tar_samples, open_shard

TINY = ModelConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def exported(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return export_backbone(create_backbone(TINY), folder, mean=[0.3], std=[0.3])


@pytest.fixture
def backbone(tmp_path: Path) -> Path:
    return exported(tmp_path / "backbone", 0)


def first_sample_png(shards: Path, out: Path) -> tuple[str, Path]:
    with open_shard(str(shards / "shard-000000.tar")) as f:
        key, files = next(iter_tar_samples(f))
    out.write_bytes(files["png"])
    return key, out


def test_build_query_by_image_and_key(digits_shards, backbone, tmp_path):
    index = build_index(backbone, str(digits_shards), tmp_path / "index")
    assert len(index) == 1797 and index.info["factory"] == "Flat"
    info = index_summary(tmp_path / "index")
    assert info["count"] == 1797 and info["labelled"] == 1797 and info["pooling"] == "cls"

    key, png = first_sample_png(digits_shards, tmp_path / "q.png")
    result = query_index(tmp_path / "index", images=[png], keys=[key], k=5, sheet=tmp_path / "sheet.png")
    by_image, by_key = result.hits
    assert by_image[0]["key"] == key and by_image[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert key not in [h["key"] for h in by_key] and len(by_key) == 5
    assert [h["key"] for h in by_key] == [h["key"] for h in by_image[1:5]] + [by_key[-1]["key"]]
    first = by_key[0]
    assert first["label_name"] in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert first["caption"].startswith("a handwritten digit") and first["shard"].endswith(".tar")
    assert Path(result.sheet).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The index's scores are cosine similarities of the backbone's features, best first.
    feats = extract_features(load_backbone_from(backbone), str(digits_shards))
    f = torch.nn.functional.normalize(feats.feats, dim=1)
    q = f[feats.keys.index(key)]
    sims = f @ q
    sims[feats.keys.index(key)] = -2
    top = torch.topk(sims, 5)
    assert [feats.keys[i] for i in top.indices.tolist()] == [h["key"] for h in by_key]
    np.testing.assert_allclose([h["score"] for h in by_key], top.values.numpy(), atol=1e-5)


def test_add_more_shards_and_refuse_duplicates(digits_shards, backbone, tmp_path):
    first_half = f"{digits_shards}/shard-{{000000..000001}}.tar"
    second_half = f"{digits_shards}/shard-{{000002..000003}}.tar"
    build_index(backbone, first_half, tmp_path / "index")
    assert len(RetrievalIndex.load(tmp_path / "index")) == 899
    index = add_to_index(tmp_path / "index", second_half)
    assert len(index) == 1797 and len(RetrievalIndex.load(tmp_path / "index")) == 1797
    assert index.info["sources"] == [first_half, second_half]
    assert RetrievalIndex.load(tmp_path / "index").rows_for([1796])[0]["label_name"] is not None
    with pytest.raises(RetrievalError, match="duplicate key"):
        add_to_index(tmp_path / "index", second_half)
    assert len(RetrievalIndex.load(tmp_path / "index")) == 1797  # nothing half-added


def test_another_checkpoint_is_refused(digits_shards, backbone, tmp_path):
    build_index(backbone, str(digits_shards), tmp_path / "index")
    other = exported(tmp_path / "other", 1)
    _, png = first_sample_png(digits_shards, tmp_path / "q.png")
    with pytest.raises(RetrievalError, match="fingerprint"):
        query_index(tmp_path / "index", images=[png], checkpoint=other)
    with pytest.raises(RetrievalError, match="fingerprint"):
        add_to_index(tmp_path / "index", str(digits_shards), checkpoint=other)


def test_cli_build_info_query_and_errors(digits_shards, backbone, tmp_path, capsys):
    index = tmp_path / "index"
    assert main(["index", "build", str(backbone), str(digits_shards), "--out", str(index), "--pooling", "mean"]) == 0
    assert main(["index", "info", str(index)]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["pooling"] == "mean"
    key, png = first_sample_png(digits_shards, tmp_path / "q.png")
    out = tmp_path / "q.json"
    assert main(["query", str(index), "--image", str(png), "--key", key, "-k", "3", "--json", str(out),
                 "--sheet", str(tmp_path / "s.png")]) == 0
    printed = capsys.readouterr().out
    assert f"query {png}" in printed and "contact sheet:" in printed
    payload = json.loads(out.read_text())
    assert [len(h) for h in payload["hits"]] == [3, 3] and payload["hits"][0][0]["key"] == key

    assert main(["query", str(index), "--key", "no-such-key"]) == 1
    assert "no-such-key" in capsys.readouterr().err
    assert main(["query", str(index), "--image", str(tmp_path / "missing.png")]) == 1
    assert "not found" in capsys.readouterr().err
    (index / "index.faiss").write_bytes((index / "index.faiss").read_bytes()[:100])  # truncate
    assert main(["query", str(index), "--key", key]) == 1
    assert "truncated or modified" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "nope"), str(digits_shards), "--out", str(tmp_path / "i2")]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_probe_and_knn(digits_shards, backbone, tmp_path, capsys):
    train = f"{digits_shards}/shard-{{000000..000002}}.tar"
    test = f"{digits_shards}/shard-000003.tar"
    out = tmp_path / "eval"
    assert main(["knn", str(backbone), train, test, "-k", "5", "--out", str(out)]) == 0
    result = json.loads((out / "knn.json").read_text())
    assert result["num_train"] == 1348 and result["num_test"] == 449 and result["settings"]["k"] == 5
    assert result["top1"] > 0.5  # even random ViT features separate digits far above chance (0.1)
    assert (out / "knn_confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["probe", str(backbone), train, test, "--epochs", "5", "--out", str(out)]) == 0
    assert "dino: top-1" in capsys.readouterr().out
    assert json.loads((out / "dino.json").read_text())["num_test"] == 449
    assert main(["probe", str(tmp_path / "missing"), train, test]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_finetune_refuses_clearly(digits_shards, tmp_path, capsys):
    assert main(["finetune", str(tmp_path / "missing"), str(digits_shards), str(digits_shards),
                 "--out", str(tmp_path / "ft")]) == 1
    assert "missing" in capsys.readouterr().err


def test_cli_attention_png(digits_shards, backbone, tmp_path):
    out = tmp_path / "att.png"
    assert main(["attention", str(backbone), str(digits_shards), "--out", str(out), "--images", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_index_eval_against_brute_force(digits_shards, backbone, tmp_path, capsys):
    train = f"{digits_shards}/shard-{{000000..000002}}.tar"
    test = f"{digits_shards}/shard-000003.tar"
    build_index(backbone, train, tmp_path / "index")
    result = evaluate_index(tmp_path / "index", test)
    model = load_backbone_from(backbone)
    a, b = extract_features(model, train), extract_features(model, test)
    sims = torch.nn.functional.normalize(b.feats, dim=1) @ torch.nn.functional.normalize(a.feats, dim=1).T
    top = a.labels[sims.topk(10, dim=1).indices]
    hits = top == b.labels[:, None]
    assert result["queries"] == 449 and result["indexed"] == 1348
    for k in (1, 5, 10):
        assert result["recall"][f"@{k}"] == pytest.approx(float(hits[:, :k].any(1).float().mean()))
    prec = hits.float().cumsum(1) / torch.arange(1, 11)
    n_rel = torch.bincount(a.labels, minlength=10)[b.labels].clamp(max=10).float()
    assert result["map@10"] == pytest.approx(float(((prec * hits).sum(1) / n_rel).mean()), abs=1e-6)
    assert main(["index", "eval", str(tmp_path / "index"), test]) == 0
    assert '"map@10"' in capsys.readouterr().out
