"""Rectified-flow (flow matching) primitives, with sigma in [0, 1] and timesteps t = 1000·sigma.

x_t = (1 − σ)·x0 + σ·ε, the network predicts v = ε − x0, so x0 = x_t − σ·v.
A shift s bends sigmas toward noise: σ' = s·σ / (1 + (s − 1)·σ) (longer clips use larger s).
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor:
    """Inverse of shift_sigma (used to restrict training sigmas to an expert's range)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return sigma / (shift - (shift - 1) * sigma)


def sample_sigma(
    shape, shift: float, lo: float = 0.0, hi: float = 1.0, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Training sigmas: uniform u, shifted, restricted to [lo, hi) in shifted space by sampling u
    in the matching pre-image (no rejection loop, so every rank draws the same count)."""
    u_lo, u_hi = float(unshift_sigma(lo, shift)), float(unshift_sigma(hi, shift))
    u = torch.rand(shape, generator=generator, device=device) * (u_hi - u_lo) + u_lo
    return shift_sigma(u, shift).to(device).clamp(1e-4, 1.0)


def expand_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sigma [B] or [B, F] -> broadcastable to x [B, C, F, H, W]."""
    if sigma.ndim == 1:
        return sigma.view(-1, 1, 1, 1, 1).to(x.dtype)
    return sigma[:, None, :, None, None].to(x.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = expand_sigma(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x_t - expand_sigma(sigma, x_t) * v


def timesteps(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * NUM_TRAIN_TIMESTEPS
