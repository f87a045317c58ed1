"""Heads: the math on hand-computed values, then each one learning a separable toy problem."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.heads import (
    ClassCentreHead,
    CosineClassifier,
    TripletLoss,
    batch_hard_mining,
    pairwise_distances,
)


def blobs(n_per_class: int, classes: int, dim: int, seed: int, nuisance_std: float = 0.0):
    """Class means on a circle of radius 3 in the first two dims (std 0.3 there); the other dims are pure noise
    of std `nuisance_std`, so raw features are only separable once those dims are ignored."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(classes) * (2 * math.pi / classes)
    means = torch.zeros(classes, dim)
    means[:, 0], means[:, 1] = 3 * angles.cos(), 3 * angles.sin()
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = means[y] + 0.3 * torch.randn(len(y), dim, generator=g)
    if dim > 2:
        x[:, 2:] = nuisance_std * torch.randn(len(y), dim - 2, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


# ------------------------------------------------------------------------------------------- cosine classifier


def test_cosine_classifier_is_scale_times_cosine():
    torch.manual_seed(0)
    head = CosineClassifier(3, 4, scale=10.0)
    x = torch.tensor([[3.0, 0.0, 4.0], [0.0, -2.0, 0.0]])
    w = head.weight.detach()
    expected = torch.stack([torch.stack([10.0 * (xi @ wj) / (xi.norm() * wj.norm()) for wj in w]) for xi in x])
    torch.testing.assert_close(head(x), expected)
    torch.testing.assert_close(head(7.5 * x), head(x))  # the feature norm does not matter
    assert head(torch.randn(64, 3)).abs().max() <= 10.0 + 1e-5
    # Fixed scale: a buffer (checkpointed, not trained); learned scale: a parameter starting at the given value.
    assert "log_scale" in dict(head.named_buffers()) and "log_scale" not in dict(head.named_parameters())
    learned = CosineClassifier(3, 4, scale=10.0, learn_scale=True)
    assert "log_scale" in dict(learned.named_parameters())
    assert float(learned.scale.detach()) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="scale"):
        CosineClassifier(3, 4, scale=0.0)


@pytest.mark.parametrize("learn_scale", [False, True])
def test_cosine_classifier_learns_blobs(learn_scale):
    torch.manual_seed(0)
    x, y = blobs(200, 4, 2, seed=1)
    xt, yt = blobs(100, 4, 2, seed=2)
    head = CosineClassifier(2, 4, scale=8.0, learn_scale=learn_scale)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for step in range(200):
        idx = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = F.cross_entropy(head(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = float((head(xt).argmax(1) == yt).float().mean())
    assert acc >= 0.99, acc
    if learn_scale:
        assert float(head.scale.detach()) > 8.0  # separable data: a sharper softmax lowers the loss


# ------------------------------------------------------------------------------------------- class-centre head


def test_class_centre_update_rule_by_hand():
    head = ClassCentreHead(2, 3, momentum=0.5)
    # Class 0: [3, 4] and [0, 2] -> normalised [0.6, 0.8] and [0, 1] -> mean [0.3, 0.9] -> first centre.
    # Class 1: [-5, 0] -> [-1, 0]. Class 2: absent.
    head.update(torch.tensor([[3.0, 4.0], [0.0, 2.0], [-5.0, 0.0]]), torch.tensor([0, 0, 1]))
    c0 = torch.tensor([0.3, 0.9]) / math.sqrt(0.9)
    torch.testing.assert_close(head.centres[0], c0)
    torch.testing.assert_close(head.centres[1], torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(head.centres[2], torch.zeros(2))
    assert head.seen.tolist() == [True, True, False]
    # Second batch, class 0 only: c0 <- normalize(0.5 * c0 + 0.5 * [1, 0]); class 1 untouched.
    head.update(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    blended = 0.5 * c0 + 0.5 * torch.tensor([1.0, 0.0])
    torch.testing.assert_close(head.centres[0], blended / blended.norm())
    torch.testing.assert_close(head.centres[1], torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(head.centres.norm(dim=1)[:2], torch.ones(2))
    # Prediction: cosine to each centre, -inf for an unseen class.
    sims = head(torch.tensor([[0.0, -3.0]]))
    torch.testing.assert_close(sims[0, :2], torch.stack([-head.centres[0, 1], torch.tensor(0.0)]))
    assert sims[0, 2] == float("-inf")
    assert head.predict(torch.tensor([[-1.0, 0.1]])).tolist() == [1]


def test_class_centre_buffers_checkpoint_and_loss():
    head = ClassCentreHead(2, 2, momentum=0.9)
    head.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    restored = ClassCentreHead(2, 2, momentum=0.9)
    restored.load_state_dict(head.state_dict())
    assert set(head.state_dict()) == {"centres", "seen"}
    torch.testing.assert_close(restored.centres, head.centres)
    # Centre loss = mean of 1 - cos(x, c_y): here cos are 1/sqrt(2) and 0.
    x = torch.tensor([[1.0, 1.0], [3.0, 0.0]], requires_grad=True)
    loss = head.centre_loss(x, torch.tensor([0, 1]))
    assert float(loss.detach()) == pytest.approx(((1 - 1 / math.sqrt(2)) + 1.0) / 2)
    loss.backward()
    assert x.grad is not None and head.centres.grad is None
    with pytest.raises(ValueError, match="labels must be in"):
        head.update(torch.zeros(1, 2), torch.tensor([2]))
    with pytest.raises(RuntimeError, match="no centres yet"):
        ClassCentreHead(2, 2).predict(torch.zeros(1, 2))


def test_class_centre_head_learns_blobs_with_an_encoder():
    """EMA centres of raw blobs, then an encoder trained with cross-entropy + centre loss on blobs whose raw
    features are swamped by nuisance dims: nearest-centre accuracy ~1 only after learning."""
    torch.manual_seed(0)
    x, y = blobs(100, 5, 8, seed=3)
    xt, yt = blobs(100, 5, 8, seed=4)
    raw = ClassCentreHead(8, 5, momentum=0.9)
    for step in range(100):
        idx = torch.arange(step * 50, step * 50 + 50) % len(x)
        raw.update(x[idx], y[idx])
    assert float((raw.predict(xt) == yt).float().mean()) >= 0.99
    true_dirs = F.normalize(torch.stack([x[y == c].mean(0) for c in range(5)]), dim=1)
    assert float((raw.centres * true_dirs).sum(1).min()) > 0.99

    x, y = blobs(100, 5, 8, seed=5, nuisance_std=4.0)
    xt, yt = blobs(100, 5, 8, seed=6, nuisance_std=4.0)
    encoder = torch.nn.Linear(8, 16)
    classifier = CosineClassifier(16, 5, scale=10.0)
    centres = ClassCentreHead(16, 5, momentum=0.9)
    with torch.no_grad():
        centres.update(encoder(x), y)
    before = float((centres.predict(encoder(xt)) == yt).float().mean())
    opt = torch.optim.Adam([*encoder.parameters(), *classifier.parameters()], lr=0.02)
    losses = []
    for step in range(300):
        idx = torch.arange(step * 50, step * 50 + 50) % len(x)
        z = encoder(x[idx])
        closs = centres.centre_loss(z, y[idx])
        loss = F.cross_entropy(classifier(z), y[idx]) + 0.5 * closs
        opt.zero_grad()
        loss.backward()
        opt.step()
        centres.update(z.detach(), y[idx])
        losses.append(float(closs.detach()))
    after = float((centres.predict(encoder(xt)) == yt).float().mean())
    assert before < 0.8 and after >= 0.99, (before, after)
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])


# ------------------------------------------------------------------------------------------------ triplet loss


def test_batch_hard_mining_on_a_constructed_batch():
    points = torch.tensor([0.0, 1.0, 5.0, 2.5, 6.0, 10.0, 20.0]).unsqueeze(1)
    labels = torch.tensor([0, 0, 1, 0, 1, 1, 2])
    dist = pairwise_distances(points)
    torch.testing.assert_close(dist, (points - points.t()).abs(), atol=1e-5, rtol=0)
    pos, neg, valid = batch_hard_mining(dist, labels)
    # anchor:         0  1  2  3  4  5  (6 is alone in its class)
    assert pos[:6].tolist() == [3, 3, 5, 0, 5, 2]
    assert neg[:6].tolist() == [2, 2, 3, 2, 3, 3]
    assert neg[6].item() == 5  # nearest other-class sample to 20 is 10
    assert valid.tolist() == [True] * 6 + [False]


def test_triplet_loss_value_by_hand():
    # Unit vectors at 0 and 30 degrees (class 0), 90 and 180 degrees (class 1), given at other norms:
    # the loss normalises. Chord length between angles a, b: 2 sin(|a - b| / 2).
    deg = torch.tensor([0.0, 30.0, 90.0, 180.0]) * math.pi / 180
    x = torch.stack([deg.cos(), deg.sin()], dim=1) * torch.tensor([[2.0], [0.5], [3.0], [1.0]])
    labels = torch.tensor([0, 0, 1, 1])

    def chord(a):
        return 2 * math.sin(math.radians(a) / 2)

    margin = 0.5
    # (hardest positive, hardest negative) per anchor, as angle differences
    pairs = [(30, 90), (30, 60), (90, 60), (90, 150)]
    expected = sum(max(0.0, chord(p) - chord(n) + margin) for p, n in pairs) / 4
    assert float(TripletLoss(margin)(x, labels)) == pytest.approx(expected, abs=1e-5)
    # One class only: no valid triplet, a zero loss that still backpropagates.
    z = torch.randn(4, 2, requires_grad=True)
    loss = TripletLoss(0.2)(z, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and z.grad is not None


def test_triplet_loss_learns_blobs():
    torch.manual_seed(0)
    x, y = blobs(100, 4, 8, seed=7, nuisance_std=4.0)
    xt, yt = blobs(100, 4, 8, seed=8, nuisance_std=4.0)
    encoder = torch.nn.Linear(8, 8)

    def nn_accuracy() -> float:
        with torch.no_grad():
            a, b = F.normalize(encoder(xt), dim=1), F.normalize(encoder(x), dim=1)
            return float((y[(a @ b.t()).argmax(1)] == yt).float().mean())

    before = nn_accuracy()
    criterion = TripletLoss(margin=0.3)
    opt = torch.optim.Adam(encoder.parameters(), lr=0.02)
    losses = []
    for step in range(300):
        idx = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = criterion(encoder(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    after = nn_accuracy()
    assert before < 0.8 and after >= 0.99, (before, after)
    assert sum(losses[-20:]) < 0.25 * sum(losses[:20])


# ------------------------------------------------------------------------------ heads as probes (probe --head)


@pytest.fixture(scope="module")
def digits_pixels():
    """scikit-learn's digits, raw pixels / 16, split 70/30 (stratified, seeded) into train and test rows."""
    from sklearn.datasets import load_digits

    from downstream.probe import held_out_split

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    train, test = held_out_split(y, 0.3, seed=0)
    return x[train], y[train], x[test], y[test]


def test_centre_head_is_the_nearest_class_mean_by_cosine(digits_pixels):
    from downstream.probe import probe_features

    train_x, train_y, test_x, test_y = digits_pixels
    r = probe_features(*digits_pixels, head="centre")
    # Brute force: each class's mean of unit-length train rows, renormalised; a test row takes the most similar.
    unit = F.normalize(train_x, dim=1)
    centres = F.normalize(torch.stack([unit[train_y == c].mean(0) for c in range(10)]), dim=1)
    expected = (F.normalize(test_x, dim=1) @ centres.t()).argmax(1)
    assert r.protocol == "centre" and r.selection.startswith("none")
    assert r.top1 == pytest.approx(float((expected == test_y).float().mean()))
    assert r.confusion_matrix == torch.bincount(test_y * 10 + expected, minlength=100).view(10, 10).tolist()
    assert 0.85 < r.top1 < 1.0
    torch.testing.assert_close(r.classifier.centres, centres)
    assert isinstance(r.classifier, ClassCentreHead)


def test_cosine_head_trained_on_frozen_features(digits_pixels):
    from downstream.probe import probe_features

    test_x, test_y = digits_pixels[2], digits_pixels[3]
    r = probe_features(*digits_pixels, head="cosine", min_steps=300, epochs=20)
    assert r.protocol == "cosine" and isinstance(r.classifier, CosineClassifier)
    assert r.top1 > 0.93, r.top1
    with torch.no_grad():
        assert float((r.classifier(test_x).argmax(1) == test_y).float().mean()) == pytest.approx(r.top1)
    assert r.settings["chosen_on_held_out"]["held_out_rows"] > 0 and "held-out train rows" in r.selection
    assert float(r.classifier.scale.detach()) != pytest.approx(16.0)  # the scale was learned


def test_cli_probe_head_centre(digits_shards, tmp_path, capsys):
    from downstream.__main__ import main
    from pretrain.backbone import create_backbone, export_backbone
    from pretrain.recipe import ModelConfig

    torch.manual_seed(0)
    backbone = create_backbone(ModelConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                                           num_heads=2, mlp_ratio=2.0))
    export_backbone(backbone, tmp_path / "export")
    out = tmp_path / "report"
    assert main(["probe", str(tmp_path / "export"), str(digits_shards), str(digits_shards), "--head", "centre",
                 "--pooling", "mean", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    data = json.loads((out / "centre.json").read_text())
    assert data["protocol"] == "centre" and data["num_train"] == data["num_test"] == 1797
    assert data["top1"] > 0.3 and (out / "centre_confusion.png").is_file()
    assert "centre: top-1" in capsys.readouterr().out
