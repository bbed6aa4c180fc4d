"""Distribution matching distillation (DMD / DMD2) on self-rollouts (LingBot §3.4.2).

Notation: x̂ = student sample (clean latents of the generated frames, with gradient), σ ~ the
DMD sigma range, x̂_σ = (1 − σ)·x̂ + σ·ε. The scores are x0-predictions (x0 = x_σ − σ·v):
    μ_real = frozen teacher (WanMoE routes by t; optional CFG on its velocity, Wan's convention
             v = v_neg + s·(v_cond − v_neg) with v_neg the job's encoded negative prompt),
    μ_fake = fake score, initialised from the teacher and trained on student samples with the
             flow-matching loss  ‖v_fake(x̃_σ) − (ε − x̃)‖²  (x̃ = detached student samples).

Student loss, per sample b (mean over the N_b generated elements):
    w_b   = mean |x̂_b − μ_real,b|                                  (DMD's per-sample normaliser)
    g_b   = (μ_fake,b − μ_real,b) / w_b
    L_DMD = ½ · mean_b mean_elems (x̂_b − sg[x̂_b − g_b])²
so ∂L_DMD/∂x̂ = g / (B·N): a gradient step moves x̂ toward the teacher's prediction and away
from the fake score's (LingBot's eq. (4) writes sg[x̂ − (μ_real − μ_fake)]; with μ read as
x0-predictions the descent direction is the one above, which is DMD's implementation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titan_world.conditioning import masked_mse, noise_batch
from titan_world.diffusion.flow import NUM_TRAIN_TIMESTEPS, sample_sigma
from titan_world.model.action import ActionInputs
from titan_world.model.moe import WanMoE, expert_for


@dataclass
class ScoreInputs:
    """A clip window as the (bidirectional) score networks see it: given frames first."""

    latents: torch.Tensor  # [B, C, F, h, w]; student frames carry gradient in the student step
    cond_mask: torch.Tensor  # [B, F] bool
    context: object
    actions: ActionInputs | None
    with_i2v_channels: bool = True
    uncond_context: object | None = None  # for CFG on the real score


def route(net: torch.nn.Module, sigma: float) -> torch.nn.Module:
    """The network that scores noise level σ: an MoE's expert by t = 1000σ, else the net itself."""
    if isinstance(net, WanMoE):
        return net.expert(expert_for(sigma * NUM_TRAIN_TIMESTEPS, net.boundary))
    return net


def velocity(
    net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, inp: ScoreInputs, cond, context=None
) -> torch.Tensor:
    a = inp.actions
    return net(
        x_t,
        t,
        inp.context if context is None else context,
        cond=cond,
        actions=a,
        action_reference=a.c2w[:, 0] if a is not None else None,
    ).float()


def noised(inp: ScoreInputs, sigma: float, noise: torch.Tensor):
    """x_σ with clean given frames (t = 0 there), via the shared conditioning code."""
    b = inp.latents.shape[0]
    s = torch.full((b,), float(sigma), device=inp.latents.device)
    return noise_batch(inp.latents, inp.cond_mask, s, noise, inp.with_i2v_channels)


def score_x0(
    net: torch.nn.Module, inp: ScoreInputs, sigma: float, noise: torch.Tensor, guidance: float = 1.0
) -> torch.Tensor:
    """μ(x_σ): the net's x0-prediction at noise level σ (CFG when guidance != 1: v_u + s·(v − v_u))."""
    nb = noised(inp, sigma, noise)
    expert = route(net, sigma)
    v = velocity(expert, nb.x_t, nb.t, inp, nb.cond)
    if guidance != 1.0:
        if inp.uncond_context is None:
            raise ValueError("posttrain.guidance_scale != 1 needs an unconditional context")
        v_u = velocity(expert, nb.x_t, nb.t, inp, nb.cond, inp.uncond_context)
        v = v_u + guidance * (v - v_u)
    return nb.x_t.float() - nb.sigma[:, None, :, None, None] * v


def dmd_direction(
    x_hat: torch.Tensor, mu_real: torch.Tensor, mu_fake: torch.Tensor, gen_mask: torch.Tensor
) -> torch.Tensor:
    """g = (μ_fake − μ_real) / mean|x̂ − μ_real| per sample (over generated frames), 0 elsewhere."""
    m = gen_mask[:, None, :, None, None].to(x_hat.dtype).expand_as(x_hat)
    dims = (1, 2, 3, 4)
    denom = ((x_hat.detach() - mu_real).abs() * m).sum(dims) / m.sum(dims).clamp_min(1)
    g = (mu_fake - mu_real) / denom.clamp_min(1e-6).view(-1, 1, 1, 1, 1)
    return torch.nan_to_num(g * m)


def dmd_loss(x_hat: torch.Tensor, grad: torch.Tensor, gen_mask: torch.Tensor) -> torch.Tensor:
    """½ · mean over samples and generated elements of (x̂ − sg[x̂ − g])²."""
    target = (x_hat - grad).detach()
    return 0.5 * masked_mse(x_hat, target, gen_mask.to(x_hat.dtype))


@dataclass
class DMDTerms:
    loss: torch.Tensor
    grad: torch.Tensor  # g (the normalised direction), for logging/tests
    gap: float  # mean |μ_real − μ_fake| over generated frames: shrinks as the fake tracks the student
    sigma: float


def dmd_step_loss(
    x_hat: torch.Tensor, inp: ScoreInputs, teacher, fake, sigma: float, noise: torch.Tensor, guidance: float = 1.0
) -> DMDTerms:
    """Score the (detached) noised student sample with both nets, then L_DMD on x̂."""
    gen = ~inp.cond_mask
    with torch.no_grad():
        det = ScoreInputs(
            x_hat.detach(), inp.cond_mask, inp.context, inp.actions, inp.with_i2v_channels, inp.uncond_context
        )
        mu_real = score_x0(teacher, det, sigma, noise, guidance)
        mu_fake = score_x0(fake, det, sigma, noise)
        g = dmd_direction(x_hat.detach().float(), mu_real, mu_fake, gen)
        m = gen[:, None, :, None, None].float().expand_as(mu_real)
        gap = float(((mu_real - mu_fake).abs() * m).sum() / m.sum().clamp_min(1))
    return DMDTerms(dmd_loss(x_hat.float(), g, gen), g, gap, sigma)


def fake_score_loss(fake, inp: ScoreInputs, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """Flow matching on (detached) student samples: ‖v_fake(x̃_σ) − (ε − x̃)‖² on generated frames."""
    nb = noised(inp, sigma, noise)
    v = velocity(route(fake, sigma), nb.x_t, nb.t, inp, nb.cond)
    return masked_mse(v, nb.target, nb.loss_mask)


def draw_sigma(generator: torch.Generator, shift: float, lo: float, hi: float) -> float:
    """One σ per step, from a generator seeded alike on every rank (an MoE teacher must route
    every sample and rank to the same expert)."""
    return float(sample_sigma((1,), shift, lo, hi, generator=generator)[0])
