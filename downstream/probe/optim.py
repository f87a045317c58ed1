"""The probe's optimizer: momentum SGD or LARS with a learning rate and weight decay per head."""

from __future__ import annotations

import torch

__all__ = ["HeadwiseSGD"]


class HeadwiseSGD(torch.optim.Optimizer):
    """Momentum SGD or LARS for parameters whose first dimension indexes independent heads, each head with its
    own learning rate and weight decay (`head_lr`, `head_wd`: tensors of length num_heads in each group).

    Head h follows exactly `torch.optim.SGD(lr=head_lr[h] * lr, momentum, weight_decay=head_wd[h])`, or with
    `lars=True` timm's `Lars(..., always_adapt=True)` with its trust ratio computed per head (MAE's probe
    optimizer). The group's `lr` is a multiplier that a scheduler drives (1.0 = the heads' own lrs).
    """

    def __init__(self, groups: list[dict], momentum: float = 0.9, trust_coeff: float = 1e-3, eps: float = 1e-8):
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        defaults = dict(lr=1.0, momentum=momentum, lars=False, trust_coeff=trust_coeff, eps=eps)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                view = (-1,) + (1,) * (p.dim() - 1)
                wd = group["head_wd"].to(p.device).view(view)
                d = p.grad.add(p * wd)
                if group["lars"]:
                    w_norm = p.flatten(1).norm(dim=1).view(view)
                    g_norm = p.grad.flatten(1).norm(dim=1).view(view)
                    trust = group["trust_coeff"] * w_norm / (g_norm + w_norm * wd + group["eps"])
                    d.mul_(torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust)))
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                    d = state["momentum_buffer"]
                p.sub_(d * (group["lr"] * group["head_lr"].to(p.device).view(view)))
