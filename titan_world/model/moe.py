"""Wan2.2's two-expert MoE: a high-noise expert for t >= boundary·1000, a low-noise one below.

The experts are independent networks with identical shapes (each a `WanDiT`), saved and loaded
separately (`high_noise_model/`, `low_noise_model/`). Routing is per call, by timestep: every
sample of a batch (and every rank of a step) must fall on the same side of the boundary.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from titan_world.model.dit import WanDiT

EXPERT_DIRS = {"high": "high_noise_model", "low": "low_noise_model"}


def expert_for(t: torch.Tensor | float, boundary: float) -> str:
    """'high' if t >= boundary * 1000 (t in [0, 1000]); t must not straddle the boundary."""
    t = torch.as_tensor(t, dtype=torch.float64)
    high = t >= boundary * 1000
    if bool(high.any()) != bool(high.all()):
        raise ValueError(f"timesteps straddle the MoE boundary {boundary * 1000:.0f}: route each side separately")
    return "high" if bool(high.all()) else "low"


class WanMoE(nn.Module):
    def __init__(self, high: WanDiT, low: WanDiT, boundary: float):
        super().__init__()
        self.high, self.low, self.boundary = high, low, boundary
        self.cfg = high.cfg

    def expert(self, name: str) -> WanDiT:
        return self.high if name == "high" else self.low

    def forward(self, x: torch.Tensor, t: torch.Tensor, context, **kwargs) -> torch.Tensor:
        return self.expert(expert_for(t, self.boundary))(x, t, context, **kwargs)


def experts(net: nn.Module) -> list[nn.Module]:
    """The dense networks inside `net`: an MoE's two experts (high, low), else `net` itself. What
    per-network treatments (FSDP, AC, compile, context parallelism, feature taps) iterate over."""
    return [net.high, net.low] if isinstance(net, WanMoE) else [net]
