"""Classifiers on frozen features: linear probes by MAE's and by DINO's protocol, k-NN by DINO's protocol, and
the heads of `pretrain.heads` (cosine classifier, nearest class centre) trained the same way.

Features are float tensors (N, D) already extracted by the backbone (`downstream.features`); labels are
integers in [0, num_classes). The probes run on the features' device, full tensors in memory, mini-batches
drawn by index (no DataLoader); k-NN searches an exact FAISS index in query batches (`pretrain.knn`, the one
k-NN the online evaluator uses too). Every protocol returns a `ProbeResult` (top-1, top-5, per-class accuracy,
confusion matrix) that writes itself as JSON + PNG.

A trained probe sees standardised features (MAE: BatchNorm without affine; DINO: train mean/std folded into its
Linear), trains for at least `min_steps` optimizer steps, and chooses its hyper-parameters on a held-out split of
*train* only: the weight decay by held-out top-1, the lr by the training objective it reaches, the grid grown when
the best value sits on an edge. With at least WHITEN_MIN_ROWS_PER_DIM rows per dimension the linear probes also try
whitened features (`Whiten`) and keep whichever normalisation wins on the held-out rows: SGD on nearly collinear
features (a small ViT's mean-pooled tokens) otherwise stops points short. On pixels and on a trained tiny ViT's
features each protocol then lands within half a point of (or above) scikit-learn's LogisticRegression with C tuned
on the same split (tests/test_probe.py).

The rooms: inputs (checks, held-out split), normalize, heads, optim, fit (training), select (model selection),
protocols (the specs and `probe()`), knn, result, checkpoint (from shard sets).
"""

from downstream.probe.checkpoint import embed_train_test, probe_checkpoint
from downstream.probe.fit import ProbeRecipe
from downstream.probe.fit import fit_heads as _fit  # the name tests/test_probe.py drives the loop by
from downstream.probe.heads import CosineHeads, LinearHeads
from downstream.probe.inputs import check_features, held_out_split
from downstream.probe.knn import knn_classify
from downstream.probe.normalize import Standardize, Whiten
from downstream.probe.optim import HeadwiseSGD
from downstream.probe.protocols import (
    COSINE,
    DINO,
    DINO_BASE_LRS,
    HEADS,
    MAE,
    MAE_BASE_LRS,
    PROTOCOLS,
    WEIGHT_DECAYS,
    ProbeProtocol,
    centre_probe,
    cosine_probe,
    linear_probe_dino,
    linear_probe_mae,
    probe,
    probe_features,
    resolve_protocol,
)
from downstream.probe.result import ProbeResult, result_from_scores
from downstream.probe.select import WHITEN_MIN_ROWS_PER_DIM, Selection, Sweep, select_hyperparameters
from pretrain.knn import knn_scores

__all__ = [
    "COSINE",
    "DINO",
    "DINO_BASE_LRS",
    "HEADS",
    "MAE",
    "MAE_BASE_LRS",
    "PROTOCOLS",
    "WEIGHT_DECAYS",
    "WHITEN_MIN_ROWS_PER_DIM",
    "CosineHeads",
    "HeadwiseSGD",
    "LinearHeads",
    "ProbeProtocol",
    "ProbeRecipe",
    "ProbeResult",
    "Selection",
    "Standardize",
    "Sweep",
    "Whiten",
    "_fit",
    "centre_probe",
    "check_features",
    "cosine_probe",
    "embed_train_test",
    "held_out_split",
    "knn_classify",
    "knn_scores",
    "linear_probe_dino",
    "linear_probe_mae",
    "probe",
    "probe_checkpoint",
    "probe_features",
    "resolve_protocol",
    "result_from_scores",
    "select_hyperparameters",
]
