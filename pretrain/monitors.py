"""What a run is learning, measured cheaply: collapse monitors (attention maps: `pretrain.attention_maps`).

Collapse monitors (DINO's failure mode, most reported at small batch sizes; Caron et al. 2021, Sec. 5.3):
  * `entropy` of the teacher's output distribution: 0 when every sample picks one prototype (collapse to a
    dominant dimension), log(K) when the output is uniform (collapse to uniform);
  * the teacher-student KL (DINO's `st_kl`, its loss minus the teacher entropy): 0 when both collapse the same way;
  * `embedding_std`: mean over dimensions of the per-dimension std of the L2-normalised embeddings (SimSiam's
    measure): 1/sqrt(D) for embeddings spread like random directions, 0 when all samples share one vector;
  * `effective_rank`: exp of the entropy of the normalised singular values (Roy & Vetterli 2007; RankMe):
    n for n orthonormal rows, 1 for rows that are all equal.
`CollapseMonitor` keeps the last measurement and warns loudly, at most once every `every` steps, when the
embedding std falls near zero. The alarms that read these measurements over time (entropy near ln K, a loss
climbing while the rank falls, the online k-NN falling) are `pretrain.alarms.CollapseAlarms`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger("vitssl.monitors")


# ------------------------------------------------------------------------------------------- collapse


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum p log p (nats) of probability rows (N, K); 0 log 0 = 0."""
    return torch.special.entr(probs.float()).sum(dim=-1).mean()


def embedding_std(emb: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the (unbiased) per-dimension std of the L2-normalised rows of `emb` (N, D)."""
    if emb.dim() != 2 or emb.shape[0] < 2:
        raise ValueError(f"embedding_std needs (N >= 2, D) embeddings, got {tuple(emb.shape)}")
    z = F.normalize(emb.float(), dim=-1)
    return z.std(dim=0).mean()


def effective_rank(emb: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """exp(H(p)) with p = singular values of `emb` (N, D) / their sum: between 1 and min(N, D)."""
    if emb.dim() != 2:
        raise ValueError(f"effective_rank needs (N, D) embeddings, got {tuple(emb.shape)}")
    s = torch.linalg.svdvals(emb.float())
    p = s / s.sum().clamp_min(eps)
    return torch.exp(torch.special.entr(p).sum())


def _is_main_rank() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


class CollapseMonitor:
    """Measure an embedding batch (`measure`) every step; warn (`check`) when its std is near zero.

    The threshold is relative to the spread of random directions: warn when `embedding_std * sqrt(D)` is below
    `warn_below`, at most once every `every` steps, on the main process only.
    """

    def __init__(self, warn_below: float = 0.05, every: int = 100) -> None:
        self.warn_below = warn_below
        self.every = every
        self.last: dict[str, float] = {}
        self._dim = 0
        self._last_warned: int | None = None

    @torch.no_grad()
    def measure(self, emb: torch.Tensor) -> dict[str, float]:
        self._dim = emb.shape[-1]
        self.last = {"embed_std": float(embedding_std(emb)), "embed_rank": float(effective_rank(emb))}
        return dict(self.last)

    def check(self, step: int) -> bool:
        """True (and a logged warning) when the last measurement looks collapsed and a warning is due."""
        if not self.last or self.warn_below <= 0:
            return False
        relative = self.last["embed_std"] * math.sqrt(self._dim)
        if relative >= self.warn_below:
            return False
        if self._last_warned is not None and step - self._last_warned < self.every:
            return False
        self._last_warned = step
        if _is_main_rank():
            log.warning(
                f"!!! COLLAPSE WARNING at step {step}: the normalised embedding std is {self.last['embed_std']:.2e} "
                f"({relative:.3f} x the 1/sqrt({self._dim}) of random directions; effective rank "
                f"{self.last['embed_rank']:.1f}). Every image is getting nearly the same embedding. DINO: raise "
                f"the batch size, lower the teacher temperature or raise center_momentum; check the lr."
            )
        return True
