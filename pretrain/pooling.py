"""One pooling vocabulary for the house: "cls" (the final CLS token) and "mean" (the mean of the final patch
tokens), both after the backbone's final norm. Probes, k-NN, the index, fine-tuning and the online evaluator all
say these two (features add "lastN", DINO's concatenated CLS tokens of the last N blocks); timm's names for the
same two, a model's `global_pool` "token" and "avg", translate through `from_timm`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

POOLINGS = ("cls", "mean")
_FROM_TIMM = {"token": "cls", "avg": "mean"}


def from_timm(global_pool: str) -> str:
    """The house's name for a timm ViT's `global_pool`; ValueError for the ones without one ("map", "")."""
    if global_pool not in _FROM_TIMM:
        raise ValueError(f"timm global_pool {global_pool!r} has no pooling here; supported: {sorted(_FROM_TIMM)}")
    return _FROM_TIMM[global_pool]


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pooling: str) -> torch.Tensor:
    """(B, D) from the final tokens (B, prefix + L, D): the CLS token or the mean of the patch tokens."""
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "mean":
        return tokens[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"pooling={pooling!r}: use one of {POOLINGS}")
