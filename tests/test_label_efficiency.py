"""Label efficiency on the digits' raw pixels: subsets, the numbers against brute force, the report and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from downstream.label_efficiency import few_shot_subsets, label_efficiency
from downstream.probe import held_out_split

PNG = b"\x89PNG\r\n\x1a\n"
SHOTS = (1, 10)
SEEDS = 3
# A short probe keeps the test fast; the protocol (grid, held-out selection, refit) is the default one.
PROBE = {"min_steps": 200, "epochs": 20}


@pytest.fixture(scope="module")
def digits():
    """Raw pixels / 16, split 70/30 (stratified, seeded) into train and evaluation rows."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    train, test = held_out_split(y, 0.3, seed=0)
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="module")
def result(digits):
    return label_efficiency(*digits, shots=SHOTS, seeds=SEEDS, methods=("linear", "knn"), probe_kwargs=PROBE)


def test_subsets_hold_k_rows_per_class_are_seeded_nested_and_from_train_only(digits):
    train_y = digits[1]
    subsets = few_shot_subsets(train_y, (1, 5, 10), seed=3)
    for k, idx in subsets.items():
        assert len(idx) == len(set(idx.tolist())) == 10 * k
        assert torch.bincount(train_y[idx], minlength=10).tolist() == [k] * 10
        assert int(idx.max()) < len(train_y)  # indices into the train rows given, nothing else
    assert set(subsets[1].tolist()) <= set(subsets[5].tolist()) <= set(subsets[10].tolist())
    again, other = few_shot_subsets(train_y, (10,), seed=3), few_shot_subsets(train_y, (10,), seed=4)
    assert torch.equal(again[10], subsets[10]) and not torch.equal(other[10], subsets[10])
    smallest = int(torch.bincount(train_y).min())
    with pytest.raises(ValueError, match=f"fewer than {smallest + 1} labels per class"):
        few_shot_subsets(train_y, (smallest + 1,), seed=0)


def test_more_labels_help_and_seeds_differ(result, digits):
    assert result.shots == list(SHOTS) and result.seeds == [0, 1, 2] and result.num_test == len(digits[3])
    for method in ("linear", "knn"):
        one, ten = result.row(method, 1), result.row(method, 10)
        assert len(one["top1"]) == SEEDS and one["num_train"] == 10 and ten["num_train"] == 100
        assert 0.3 < one["top1_mean"] < ten["top1_mean"] <= 1.0, (method, one, ten)
        assert ten["top1_mean"] > 0.85
        for row in (one, ten):
            assert row["top1_std"] > 0  # different subsets, different numbers
            assert row["top1_mean"] == pytest.approx(np.mean(row["top1"]))
            assert row["top1_std"] == pytest.approx(np.std(row["top1"], ddof=1))
    # The probe chose its hyper-parameters on held-out rows of the 10-shot subsets; 1-shot has none to hold out.
    assert all(c["on_held_out"] for c in result.row("linear", 10)["chosen"])
    assert not any(c["on_held_out"] for c in result.row("linear", 1)["chosen"])


def brute_force_knn_top1(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    """DINO's weighted vote with a full cosine-similarity matrix and torch.topk."""
    sims = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).t()
    top, idx = sims.topk(min(k, len(train_x)), dim=1)
    votes = torch.zeros(len(test_x), num_classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
    return float((votes.argmax(1) == test_y).float().mean())


def test_knn_numbers_equal_brute_force_on_the_same_subsets(result, digits):
    train_x, train_y, test_x, test_y = digits
    for k in SHOTS:
        expected = [
            brute_force_knn_top1(train_x[idx], train_y[idx], test_x, test_y, 20, 0.07, 10)
            for idx in (few_shot_subsets(train_y, SHOTS, seed)[k] for seed in range(SEEDS))
        ]
        assert result.row("knn", k)["top1"] == pytest.approx(expected, abs=1e-9)


def test_report_json_png_and_table(result, tmp_path):
    paths = result.save(tmp_path / "le")
    data = json.loads(paths["json"].read_text())
    assert data == json.loads(result.to_json())
    assert {(r["method"], r["shots"]) for r in data["rows"]} == {(m, k) for m in ("linear", "knn") for k in SHOTS}
    assert paths["png"].read_bytes()[:8] == PNG
    assert sorted(p.name for p in (tmp_path / "le").iterdir()) == ["label_efficiency.json", "label_efficiency.png"]
    table = result.table()
    assert "labels/class" in table and f"{result.row('knn', 10)['top1_mean']:.3f}" in table
    with pytest.raises(ValueError, match="methods"):
        label_efficiency(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), torch.zeros(2, 2), torch.tensor([0, 1]),
                         methods=("svm",))


def test_cli_label_efficiency(digits_shards, tmp_path, capsys):
    from downstream.__main__ import main
    from pretrain.backbone import create_backbone, export_backbone
    from pretrain.recipe import ModelConfig

    torch.manual_seed(0)
    backbone = create_backbone(ModelConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                                           num_heads=2, mlp_ratio=2.0))
    export_backbone(backbone, tmp_path / "export")
    out = tmp_path / "report"
    code = main(["label-efficiency", str(tmp_path / "export"), str(digits_shards), str(digits_shards),
                 "--shots", "1,3", "--seeds", "2", "--methods", "knn,centre", "--pooling", "mean", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    data = json.loads((out / "label_efficiency.json").read_text())
    assert data["shots"] == [1, 3] and data["seeds"] == [0, 1] and data["methods"] == ["knn", "centre"]
    assert data["settings"]["features"]["pooling"] == "mean" and data["classes"][0] == "zero"
    assert (out / "label_efficiency.png").read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "labels/class" in printed and "k-NN (k=20, T=0.07), 3 labels/class" in printed
    assert main(["label-efficiency", str(tmp_path / "export"), str(digits_shards), str(digits_shards),
                 "--shots", "1,900", "--pooling", "mean", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out)]) == 1  # a class has fewer rows than asked: a clear error, exit 1
