"""AdamW, the learning-rate schedule, gradient clipping and an EMA of the weights.

The schedule is a pure function of the global step (no scheduler object to checkpoint): a
resumed run recomputes the exact LR of any step, and a stage's own `lr` simply rescales it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

try:
    from torchtitan.distributed.utils import clip_grad_norm_ as titan_clip_grad_norm
except Exception:  # torchtitan missing: torch's own (handles DTensor grads too)
    titan_clip_grad_norm = None


def build_optimizer(params: list[nn.Parameter], tcfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel on GPU (foreach on CPU); no weight decay on 1-D params / modulation."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    kwargs: dict = {"lr": tcfg.lr, "betas": tuple(tcfg.betas), "eps": 1e-8}
    if device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base LR at `step` (0-based): linear warmup, then cosine to `min_ratio` or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total gradient norm (a tensor: no host sync), clipped to `max_norm` when > 0.

    Uses torchtitan's `clip_grad_norm_`, which reduces DTensor (FSDP2) gradients over their mesh;
    plain tensors take the same path.
    """
    clip_grad_norm_ = titan_clip_grad_norm
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    limit = max_norm if max_norm > 0 else float("inf")
    if clip_grad_norm_ is not None:
        norm = clip_grad_norm_(grads, limit, foreach=True)
    else:
        norm = torch.nn.utils.clip_grad_norm_(grads, limit, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


class EMA(nn.Module):
    """Exponential moving average of the trainable parameters (shards under FSDP: same placement).

    A module, so the Checkpointer saves it like the model (DCP, resharding). Names are the model's
    parameter names with '.' replaced by '/' (ParameterDict keys cannot contain dots).
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = nn.ParameterDict(
            {
                name.replace(".", "/"): nn.Parameter(p.detach().clone().float(), requires_grad=False)
                for name, p in named_params
            }
        )

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, nn.Parameter]], decay: float | None = None) -> None:
        """shadow ← decay·shadow + (1 − decay)·param; `decay` 0 copies (an EMA that has not started yet)."""
        pairs = [(self.shadow[n.replace(".", "/")], p) for n, p in named_params]
        ema, cur = [e for e, _ in pairs], [p.detach().float() for _, p in pairs]
        torch._foreach_lerp_(ema, cur, 1.0 - (self.decay if decay is None else decay))

    def state_for_export(self) -> dict[str, torch.Tensor]:
        return {
            k.replace("/", "."): (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
            for k, v in self.shadow.items()
        }
