"""Flow-UniPC: the sampler both Wan references use by default (UniPC, B(h) = e^-h - 1, order 2, with
the corrector on every step after the first), written for flow matching: alpha = 1 - sigma, and the
network's velocity v gives the data prediction x0 = x - sigma * v.

In log-SNR lambda = log(alpha / sigma), one step from sigma_s to sigma_t (h = lambda_t - lambda_s)
is the exact data-prediction update plus a correction from earlier x0 predictions:
    x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) m_0 - alpha_t B(h) * (sum_k rho_k D_k)
with m_0 the x0 at sigma_s and D_k = (m_k - m_0) / r_k the scaled differences to earlier
predictions (r_k = (lambda_k - lambda_s) / h). The predictor (UniP) uses rho = 1/2 at order 2;
the corrector (UniC) re-does the previous step once the model has been evaluated at its result,
adding that new x0 as one more difference, with rho from the order conditions
sum_k rho_k r_k^(i-1) = b_i, b_i = i! phi_(i+1)(-h) / B(h) (phi_1(z) = (e^z - 1)/z, phi_(k+1) = (phi_k - 1/k!)/z).
The model output at the corrected point is never recomputed: the next prediction starts from the
corrected sample with the x0 evaluated at the uncorrected one (as the references do). The order
warms up (1 on the first step) and drops to 1 on the last, which lands exactly on x0.

Sigma schedules (`flow_schedule`): the references differ in where the grid starts before the shift.
diffusers' `UniPCMultistepScheduler(use_flow_sigmas=True)` takes linspace(1, 1/1000, steps + 1)[:-1]
(a first sigma of exactly 1 is moved to 1 - 1e-6); the official `FlowUniPCMultistepScheduler` takes
linspace(0.999, 0, steps + 1)[:-1]. Both then shift, give the model int(sigma * 1000) and end at 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from titan_world.diffusion.flow import NUM_TRAIN_TIMESTEPS

SCHEDULE_STARTS = ("diffusers", "official")


@dataclass(frozen=True)
class FlowSchedule:
    """sigmas [steps + 1] float32 ending at 0; timesteps [steps] int64, what the model receives."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def flow_schedule(steps: int, shift: float, start: str = "diffusers") -> FlowSchedule:
    """The references' UniPC grid (module docstring). Built in float64 numpy as they are, so the
    integer timesteps (and with them the MoE expert of every step) come out identical."""
    if steps < 1:
        raise ValueError(f"sampling steps = {steps}: expected at least 1")
    if start == "diffusers":
        base = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1)[:-1]
    elif start == "official":
        sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))  # the official code keeps it in float32
        base = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    else:
        raise ValueError(f"schedule start {start!r}: expected one of {SCHEDULE_STARTS}")
    sigmas = shift * base / (1 + (shift - 1) * base)
    if start == "diffusers" and abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6  # log(alpha) must stay finite on the first step
    timesteps = torch.from_numpy((sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64))
    return FlowSchedule(torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32)), timesteps)


def _log_snr(sigma: float) -> float:
    return float(np.log1p(-sigma) - np.log(sigma))


def _rho_corrector(r: float | None, h: float) -> tuple[float, ...]:
    """UniC weights (bh2): order 1 -> (1/2,); order 2 (one earlier difference at ratio r) -> the
    2x2 order conditions solved in closed form: rho_0 (for D_r) and rho_1 (for the new x0)."""
    if r is None:
        return (0.5,)
    z = -h
    b_h = np.expm1(z)
    phi = np.expm1(z) / z - 1.0  # z * phi_2(z)
    b1 = phi / b_h
    phi = phi / z - 0.5  # z * phi_3(z)
    b2 = 2.0 * phi / b_h
    rho0 = (b1 - b2) / (1.0 - r)
    return (rho0, b1 - rho0)


@torch.no_grad()
def unipc_sample(
    denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    schedule: FlowSchedule,
    order: int = 2,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Integrate `denoise_fn(x, t) -> velocity` (t: the schedule's int64 timestep, one per sample)
    from `noise` at sigmas[0] to x0 with Flow-UniPC of `order` (1 or 2); returns x0."""
    if order not in (1, 2):
        raise ValueError(f"UniPC order {order}: expected 1 or 2 (the references use 2)")
    sig = [float(s) for s in schedule.sigmas]
    n = schedule.steps
    x = noise
    x0s: list[torch.Tensor] = []  # data predictions, newest last
    prev_x, prev_order = None, 0  # the sample the last predictor started from, and its order
    steps = range(n)
    for i in progress(steps) if progress else steps:
        t = schedule.timesteps[i].to(x.device).expand(x.shape[0])
        v = denoise_fn(x, t).to(x.dtype)
        x0 = x - sig[i] * v
        last = sig[i + 1] == 0.0  # the last step lands on the data prediction (no need to correct first)
        if i > 0 and not last:  # UniC: redo the step sig[i-1] -> sig[i] with the x0 just evaluated at its result
            lam_t, lam_s = _log_snr(sig[i]), _log_snr(sig[i - 1])
            h = lam_t - lam_s
            r = (_log_snr(sig[i - 2]) - lam_s) / h if prev_order == 2 else None
            rho = _rho_corrector(r, h)
            m0 = x0s[-1]
            a_t, b_h = 1.0 - sig[i], float(np.expm1(-h))
            corr = rho[-1] * (x0 - m0)
            if r is not None:
                corr = corr + rho[0] * (x0s[-2] - m0) / r
            x = (sig[i] / sig[i - 1]) * prev_x - (a_t * b_h) * m0 - (a_t * b_h) * corr
        x0s = (x0s + [x0])[-2:]
        this_order = min(order, n - i, i + 1)
        prev_x, prev_order = x, this_order
        if last:
            x = x0
            continue
        lam_t, lam_s = _log_snr(sig[i + 1]), _log_snr(sig[i])
        h = lam_t - lam_s
        a_t, b_h = 1.0 - sig[i + 1], float(np.expm1(-h))
        x_next = (sig[i + 1] / sig[i]) * x - (a_t * b_h) * x0
        if this_order == 2:  # UniP-2: rho = 1/2 on the one earlier difference
            r = (_log_snr(sig[i - 1]) - lam_s) / h
            x_next = x_next - (a_t * b_h * 0.5 / r) * (x0s[-2] - x0)
        x = x_next
    return x
