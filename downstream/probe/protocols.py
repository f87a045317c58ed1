"""Protocols as data: each trained probe is a `ProbeProtocol` (its report name, the recipe its heads train by, the
grids its sweep starts from), and one `probe()` runs any of them: select on held-out train, refit, score on test.
`linear_probe_mae`, `linear_probe_dino` and `cosine_probe` are the published protocols with their knobs as keyword
arguments; `centre_probe` and k-NN need no training. `PROTOCOLS` names them all for the command line."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from downstream.probe.fit import ProbeRecipe, predict, train_heads
from downstream.probe.inputs import prepare
from downstream.probe.knn import knn_classify
from downstream.probe.result import ProbeResult, result_from_scores
from downstream.probe.select import Selection, select
from pretrain.heads import ClassCentreHead

__all__ = ["COSINE", "DINO", "DINO_BASE_LRS", "HEADS", "MAE", "MAE_BASE_LRS", "PROTOCOLS", "WEIGHT_DECAYS",
           "ProbeProtocol", "centre_probe", "cosine_probe", "linear_probe_dino", "linear_probe_mae", "probe",
           "probe_features", "resolve_protocol"]

# The grids each protocol sweeps on held-out train (grown one step past an edge that wins). Base learning rates
# are scaled by batch_size / 256, as DINO and MAE do; on standardised features the best-converging lr is large,
# so the grid reaches 10. MAE's LARS steps by lr * 1e-3 of the weight's norm, so its lrs are larger still.
# Weight decays span "none" to strong (scikit-learn's C is about 1 / (wd * n)).
DINO_BASE_LRS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAE_BASE_LRS: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)
WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class ProbeProtocol:
    """A trained probe's protocol: the name its report carries, how its heads train, the grids its sweep starts
    from, and whether a linear head may also try whitened features."""

    name: str
    recipe: ProbeRecipe
    base_lrs: Sequence[float]
    weight_decays: Sequence[float]
    try_whiten: bool = False


MAE = ProbeProtocol("mae-lars", ProbeRecipe(head="linear", norm="batchnorm", optimizer="lars", momentum=0.9, epochs=90,
                                            warmup_epochs=10, batch_size=4096, min_steps=3000),
                    MAE_BASE_LRS, WEIGHT_DECAYS, try_whiten=True)
DINO = ProbeProtocol("dino", ProbeRecipe(head="linear", norm="standardize", optimizer="sgd", momentum=0.9, epochs=100,
                                         warmup_epochs=0.0, batch_size=1024, min_steps=3000),
                     DINO_BASE_LRS, WEIGHT_DECAYS, try_whiten=True)
COSINE = ProbeProtocol("cosine", ProbeRecipe(head="cosine", norm="none", optimizer="sgd", momentum=0.9, epochs=100,
                                             warmup_epochs=0.0, batch_size=1024, min_steps=3000, cosine_scale=16.0),
                       DINO_BASE_LRS, (0.0,))


def _trained_classifier(selection: Selection, train_x, train_y, num_classes: int, refit: bool, seed: int):
    """(classifier, training info): a fresh head trained on all of train, or the sweep's own head."""
    recipe = selection.recipe
    fold = recipe.norm == "standardize" or recipe.whiten
    if refit:
        model, info = train_heads(train_x, train_y, num_classes, [(selection.base_lr, selection.weight_decay)],
                                  recipe, seed)
        return model.classifier(0, fold=fold), info
    model, head = selection.chosen.models[(selection.base_lr, selection.weight_decay)]
    return model.classifier(head, fold=fold), selection.chosen.train_info


def _settings(selection: Selection, info: dict, held_out_fraction: float, refit: bool, seed: int) -> dict:
    recipe, base_lr = selection.recipe, selection.base_lr
    extra = {"initial_scale": recipe.cosine_scale} if recipe.head == "cosine" else {}
    return {
        "base_lr": base_lr, "lr": base_lr * info["batch_size"] / 256, "weight_decay": selection.weight_decay,
        "chosen_on_held_out": selection.chosen_on_held_out(), "grid": selection.grid(),
        "epochs": recipe.epochs, "epochs_run": info["epochs_run"], "steps": info["steps"],
        "min_steps": recipe.min_steps, "warmup_epochs": recipe.warmup_epochs,
        "warmup_epochs_run": info["warmup_epochs_run"], "batch_size": info["batch_size"],
        "optimizer": recipe.optimizer, "momentum": recipe.momentum, "norm": recipe.norm, "whiten": recipe.whiten,
        "head": recipe.head,
        "held_out_fraction": held_out_fraction, "refit": refit, "seed": seed, **extra,
    }


def probe(
    protocol: ProbeProtocol,
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    held_out_fraction: float = 0.2,
    refit: bool = True,
    max_grid_extensions: int = 3,
    seed: int = 0,
) -> ProbeResult:
    """Run a trained protocol: choose (base_lr, weight_decay) on a seeded, stratified held-out split of *train*
    (`select`), then with `refit` train a fresh head on all of train (without it keep the sweep's head), and
    score it on test; test labels play no part."""
    started = time.perf_counter()
    train_x, train_y, test_x, test_y, num_classes = prepare(
        train_features, train_labels, test_features, test_labels, num_classes, classes
    )
    recipe = protocol.recipe
    if recipe.norm == "batchnorm" and min(recipe.batch_size, len(train_x)) < 2:
        raise ValueError("MAE's probe trains a BatchNorm: it needs batches (and train sets) of 2 or more rows")
    recipe.validate()
    selection = select(train_x, train_y, num_classes, recipe, base_lrs=protocol.base_lrs,
                       weight_decays=protocol.weight_decays, held_out_fraction=held_out_fraction, seed=seed,
                       max_grid_extensions=max_grid_extensions, try_whiten=protocol.try_whiten)
    refit = refit or selection.chosen is None  # 1-shot: no sweep head to keep
    classifier, info = _trained_classifier(selection, train_x, train_y, num_classes, refit, seed)
    return result_from_scores(
        protocol.name, predict(classifier, test_x), test_y,
        num_classes=num_classes, num_train=len(train_x), classes=classes, seconds=time.perf_counter() - started,
        classifier=classifier, settings=_settings(selection, info, held_out_fraction, refit, seed),
        sweep=selection.records, selection=selection.describe(refit, len(train_x)),
    )


def linear_probe_mae(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    base_lrs: Sequence[float] = MAE_BASE_LRS,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    base_lr: float | None = None,
    weight_decay: float | None = None,
    epochs: int = 90,
    warmup_epochs: float = 10,
    batch_size: int = 4096,
    min_steps: int = 3000,
    optimizer: Literal["lars", "sgd"] = "lars",
    momentum: float = 0.9,
    held_out_fraction: float = 0.2,
    refit: bool = True,
    max_grid_extensions: int = 3,
    try_whiten: bool = True,
    seed: int = 0,
) -> ProbeResult:
    """MAE's linear probe: BatchNorm1d(D, affine=False) -> Linear (the BatchNorm standardises each feature and
    leaves the probe linear), LARS (timm's rule, trust ratio per head) or SGD with momentum 0.9,
    lr = base_lr * batch_size / 256, linear warmup then cosine decay per step.

    base_lr and weight decay are chosen on a seeded, stratified split of *train* as the DINO probe's are
    (`base_lrs` x `weight_decays`, grown at an edge; `base_lr=` / `weight_decay=` fix one value), then a fresh probe is trained
    on all of train (`refit`) and scored on test; test labels play no part. At least `min_steps` optimizer steps:
    LARS moves a weight by about lr * 1e-3 of its norm per step, so MAE's 90 epochs (~7,000 ImageNet steps)
    become a few dozen steps on a small set without it.
    """
    recipe = replace(MAE.recipe, optimizer=optimizer, momentum=momentum, epochs=epochs, warmup_epochs=warmup_epochs,
                     batch_size=batch_size, min_steps=min_steps)
    spec = ProbeProtocol(f"mae-{optimizer}", recipe, base_lrs if base_lr is None else (base_lr,),
                         weight_decays if weight_decay is None else (weight_decay,), try_whiten=try_whiten)
    return probe(spec, train_features, train_labels, test_features, test_labels, num_classes=num_classes,
                 classes=classes, held_out_fraction=held_out_fraction, refit=refit,
                 max_grid_extensions=max_grid_extensions, seed=seed)


def linear_probe_dino(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    base_lrs: Sequence[float] = DINO_BASE_LRS,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    held_out_fraction: float = 0.2,
    epochs: int = 100,
    batch_size: int = 1024,
    min_steps: int = 3000,
    standardize: bool = True,
    refit: bool = True,
    max_grid_extensions: int = 3,
    try_whiten: bool = True,
    seed: int = 0,
) -> ProbeResult:
    """DINO's linear probe: Linear on the given features (DINO feeds the last-4 CLS concat, `pooling=last4`),
    SGD momentum 0.9, cosine schedule to 0, no warmup, lr = base_lr * batch_size / 256; base_lr and weight decay
    swept (`base_lrs` x `weight_decays`, grown at an edge).

    `standardize` (default) z-scores each feature with train statistics first and folds them into the returned
    Linear, so the probe is still one linear layer on the raw features; without it SGD crawls on features
    whose mean is large beside their spread (mean-pooled tokens after a LayerNorm: mean ~0.5, std ~0.1).
    The hyper-parameters are chosen on a seeded, stratified split of *train* (`held_out_fraction` held out):
    the weight decay by held-out top-1 (then loss), the lr by the training objective it reaches (`_best`); test
    labels play no part. With `refit` (default) a fresh probe is then trained on all of train and evaluated on
    test; without it the sweep's best probe is kept. At least `min_steps` optimizer steps: DINO's 100 epochs are
    ~125k steps on ImageNet but 200 on a set of 2,000 rows.
    """
    recipe = replace(DINO.recipe, norm="standardize" if standardize else "none", epochs=epochs,
                     batch_size=batch_size, min_steps=min_steps)
    spec = ProbeProtocol("dino", recipe, base_lrs, weight_decays, try_whiten=try_whiten)
    return probe(spec, train_features, train_labels, test_features, test_labels, num_classes=num_classes,
                 classes=classes, held_out_fraction=held_out_fraction, refit=refit,
                 max_grid_extensions=max_grid_extensions, seed=seed)


def cosine_probe(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    base_lrs: Sequence[float] = DINO_BASE_LRS,
    weight_decays: Sequence[float] = (0.0,),
    scale: float = 16.0,
    held_out_fraction: float = 0.2,
    epochs: int = 100,
    batch_size: int = 1024,
    min_steps: int = 3000,
    refit: bool = True,
    max_grid_extensions: int = 3,
    seed: int = 0,
) -> ProbeResult:
    """A `pretrain.heads.CosineClassifier` (learned scale, starting at `scale`) trained on frozen features with
    cross-entropy by the DINO probe's recipe (SGD momentum 0.9, cosine schedule, lr swept on held-out train and
    grown at an edge, refit on all of train). No standardisation: the head sees only the features' directions,
    as k-NN and retrieval do. The returned classifier is the CosineClassifier itself."""
    recipe = replace(COSINE.recipe, epochs=epochs, batch_size=batch_size, min_steps=min_steps, cosine_scale=scale)
    spec = ProbeProtocol("cosine", recipe, base_lrs, weight_decays)
    return probe(spec, train_features, train_labels, test_features, test_labels, num_classes=num_classes,
                 classes=classes, held_out_fraction=held_out_fraction, refit=refit,
                 max_grid_extensions=max_grid_extensions, seed=seed)


def centre_probe(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
) -> ProbeResult:
    """Nearest class centre by cosine (`pretrain.heads.ClassCentreHead`, one full update): each centre is the
    renormalised mean of its class's L2-normalised train features; a test row goes to the most similar centre.
    No hyper-parameters, no selection; a class without train rows scores -inf."""
    started = time.perf_counter()
    train_x, train_y, test_x, test_y, num_classes = prepare(
        train_features, train_labels, test_features, test_labels, num_classes, classes
    )
    head = ClassCentreHead(train_x.shape[1], num_classes, momentum=0.0).to(train_x.device)
    head.update(train_x, train_y)  # a class's first update sets its centre to its normalised mean
    head.eval()
    return result_from_scores(
        "centre", predict(head, test_x), test_y,
        num_classes=num_classes, num_train=len(train_x), classes=classes, seconds=time.perf_counter() - started,
        classifier=head, settings={"metric": "cosine", "centre": "normalised mean of L2-normalised train features"},
        selection="none: no hyper-parameters",
    )


PROTOCOLS = {"mae": linear_probe_mae, "dino": linear_probe_dino, "knn": knn_classify, "cosine": cosine_probe,
             "centre": centre_probe}
# --head: which classifier sits on the frozen features. "linear" runs the linear protocol given (dino or mae).
HEADS = ("linear", "cosine", "centre")


def resolve_protocol(protocol: str = "dino", head: str = "linear") -> str:
    """The PROTOCOLS key for a (linear-probe protocol, head) pair: head "linear" keeps the protocol ("dino",
    "mae", or "knn"); "cosine" and "centre" name their own."""
    if head not in HEADS:
        raise ValueError(f"head={head!r}: use one of {list(HEADS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: use one of {sorted(PROTOCOLS)}")
    return protocol if head == "linear" else head


def probe_features(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    protocol: str = "dino",
    head: str = "linear",
    **protocol_kwargs,
) -> ProbeResult:
    """What `python -m downstream probe --protocol P --head H` runs once the features are embedded."""
    name = resolve_protocol(protocol, head)
    return PROTOCOLS[name](train_features, train_labels, test_features, test_labels, **protocol_kwargs)
