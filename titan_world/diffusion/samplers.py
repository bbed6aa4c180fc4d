"""Samplers for flow-matching models: Flow-UniPC (the Wan references' default, `unipc.py`), Euler and a
second-order multistep (DPM-Solver++(2M) in the data-prediction form, the predictor that UniPC builds on),
with optional CFG and MoE expert switching handled by the caller's `denoise_fn(x, t) -> velocity`
(WanMoE routes by t).

Without a `FlowSchedule` the grid is linspace(1, 0) shifted and the model sees t = 1000 sigma (what the
tiny models are trained and sampled with); with one (the reference grids, `unipc.flow_schedule`) every
sampler uses its sigmas and passes its integer timesteps, as the references do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from titan_world.diffusion.flow import NUM_TRAIN_TIMESTEPS, shift_sigma
from titan_world.diffusion.unipc import FlowSchedule, flow_schedule, unipc_sample

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("unipc", "dpmpp2m", "euler")


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
def sample(
    denoise_fn: DenoiseFn,
    noise: torch.Tensor,
    steps: int,
    shift: float,
    sampler: str = "euler",
    sigmas: torch.Tensor | None = None,
    progress: Callable | None = None,
    schedule: FlowSchedule | None = None,
) -> torch.Tensor:
    """Integrate from pure noise (sigma = 1) to data (sigma = 0); returns x0. `schedule` (a reference
    grid with integer timesteps) replaces steps/shift/sigmas; UniPC without one uses diffusers' grid."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if steps < 1 and schedule is None and sigmas is None:
        raise ValueError(f"sampling steps = {steps}: expected at least 1")
    if sampler == "unipc":
        return unipc_sample(denoise_fn, noise, schedule or flow_schedule(steps, shift), progress=progress)
    if schedule is not None:
        sigmas = schedule.sigmas
    sigmas = sigma_schedule(steps, shift, noise.device) if sigmas is None else sigmas.to(noise.device)
    x = noise
    prev_x0, prev_h = None, None
    iterator = range(len(sigmas) - 1)
    for i in progress(iterator) if progress else iterator:
        s, s_next = sigmas[i], sigmas[i + 1]
        if schedule is not None:
            t = schedule.timesteps[i].to(x.device).expand(x.shape[0])
        else:
            t = (s * NUM_TRAIN_TIMESTEPS).expand(x.shape[0])
        v = denoise_fn(x, t).to(x.dtype)
        if sampler == "euler":
            x = x + (s_next - s) * v
            continue
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
