"""Samplers for flow-matching models: Euler and a second-order multistep (DPM-Solver++(2M) in
the data-prediction form, the predictor that UniPC builds on), with optional CFG and MoE expert
switching handled by the caller's `denoise_fn(x, t) -> velocity` (WanMoE routes by t).
"""

from __future__ import annotations

from typing import Callable

import torch

from titan_world.diffusion.flow import NUM_TRAIN_TIMESTEPS, shift_sigma

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sigma_schedule(steps: int, shift: float, device=None) -> torch.Tensor:
    """steps + 1 sigmas from 1 to 0, shifted (the last is exactly 0)."""
    base = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift_sigma(base, shift).to(device)


def with_guidance(cond_fn: DenoiseFn, uncond_fn: DenoiseFn, scale: float) -> DenoiseFn:
    """Classifier-free guidance: v = v_u + s·(v_c − v_u); scale 1 skips the unconditional pass."""
    if scale == 1.0:
        return cond_fn

    def fn(x, t):
        v_c, v_u = cond_fn(x, t), uncond_fn(x, t)
        return v_u + scale * (v_c - v_u)

    return fn


@torch.no_grad()
def sample(denoise_fn: DenoiseFn, noise: torch.Tensor, steps: int, shift: float, sampler: str = "euler", sigmas: torch.Tensor | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Integrate from pure noise (sigma = 1) to data (sigma = 0); returns x0."""
    sigmas = sigma_schedule(steps, shift, noise.device) if sigmas is None else sigmas.to(noise.device)
    x = noise
    prev_x0, prev_h = None, None
    iterator = range(len(sigmas) - 1)
    for i in progress(iterator) if progress else iterator:
        s, s_next = sigmas[i], sigmas[i + 1]
        t = (s * NUM_TRAIN_TIMESTEPS).expand(x.shape[0])
        v = denoise_fn(x, t).to(x.dtype)
        if sampler == "euler":
            x = x + (s_next - s) * v
            continue
        if sampler != "dpmpp2m":
            raise ValueError(f"sampler={sampler!r}: expected euler or dpmpp2m")
        x0 = x - s * v
        if s_next == 0:
            x = x0
            continue
        # In log-SNR lambda = log((1 - s)/s), the exact data-prediction update is
        # x' = (s'/s) x - (1 - s') (e^{-h} - 1) D, with D a first/second-order estimate of x0.
        lam, lam_next = torch.log((1 - s) / s), torch.log((1 - s_next) / s_next)
        h = lam_next - lam
        if prev_x0 is None or s == 1.0:
            d = x0
        else:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (s_next / s) * x - (1 - s_next) * torch.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x
