"""The small interface through which the model is context-parallel (Ulysses), without knowing meshes.

`parallel.ulysses` implements it; the model only pads, shards and gathers through these calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ContextParallel(Protocol):
    size: int
    rank: int

    def scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Keep this rank's contiguous 1/size slice of `dim` (length divisible by size); grad: all-gather."""
        ...

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """All-gather the slices along `dim` in rank order; grad: keep own slice."""
        ...

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_fn: AttnFn) -> torch.Tensor:
        """q/k/v [B, S/P, H, D] -> attn_fn on [B, S, H/P, D] -> [B, S/P, H, D]."""
        ...
