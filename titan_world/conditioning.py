"""From a data batch to model inputs: I2V/V2V conditioning and per-frame noise levels.

Conditioning latent frames (I2V: the first; V2V: the first k) are given clean, with timestep 0,
and carry no loss; the model also sees them through Wan's I2V channels (4 mask channels + the
conditioning latent, zero where not given). The same function serves training, post-training
and generation, so the three agree on what "conditioned" means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titan_world.diffusion.flow import add_noise, timesteps, velocity_target
from titan_world.model.action import ActionInputs

MASK_CHANNELS = 4  # Wan folds the 4 video frames of a latent frame into 4 mask channels


def i2v_condition(latents: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
    """[B, 4 + C, F, h, w]: mask channels (1 where a latent frame is given) + the given latents."""
    b, _, f, h, w = latents.shape
    m = cond_mask.to(latents.dtype)[:, None, :, None, None]
    return torch.cat([m.expand(b, MASK_CHANNELS, f, h, w), latents * m], dim=1)


def actions_from_batch(batch: dict, enabled: bool) -> ActionInputs | None:
    if not enabled:
        return None
    return ActionInputs.from_video_frames(batch["actions"], batch["c2w"], batch["intrinsics"])


@dataclass
class NoisedBatch:
    x_t: torch.Tensor  # noisy latents with clean conditioning frames
    t: torch.Tensor  # [B, F] timesteps (0 on conditioning frames)
    target: torch.Tensor  # velocity target
    loss_mask: torch.Tensor  # [B, F] float, 1 on generated frames
    cond: torch.Tensor | None  # model `cond` (i2v channels) or None for t2v models
    sigma: torch.Tensor  # [B, F]


def noise_batch(latents: torch.Tensor, cond_mask: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, with_i2v_channels: bool) -> NoisedBatch:
    """sigma: [B] (one level per sample, diffusion training) or [B, F] (diffusion forcing)."""
    b, _, f = latents.shape[:3]
    sigma_f = (sigma[:, None].expand(b, f) if sigma.ndim == 1 else sigma).clone()
    sigma_f[cond_mask] = 0.0
    x_t = add_noise(latents, noise, sigma_f)
    loss_mask = (~cond_mask).to(latents.dtype)
    cond = i2v_condition(latents, cond_mask) if with_i2v_channels else None
    return NoisedBatch(x_t, timesteps(sigma_f), velocity_target(latents, noise), loss_mask, cond, sigma_f)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over generated frames only ([B, C, F, h, w] with mask [B, F])."""
    err = (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    return (err * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)


def conditioned_denoiser(model, context, latents: torch.Tensor, cond_mask: torch.Tensor, actions: ActionInputs | None, with_i2v_channels: bool, **model_kwargs):
    """denoise_fn(x, t) for `titan_world.diffusion.samplers.sample` that keeps the given frames clean.

    Given frames are overwritten with their latents, get timestep 0 and a zero velocity, so both
    Euler and the multistep sampler leave them exactly unchanged. Start from noise with the given
    frames already filled in (`fill_given(noise, latents, cond_mask)`). A two-expert model is
    routed by the sampler's timestep (the given frames' t = 0 does not count).
    """
    from titan_world.model.moe import WanMoE, expert_for

    cond = i2v_condition(latents, cond_mask) if with_i2v_channels else None
    keep = cond_mask[:, None, :, None, None]

    def denoise_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        net = model.expert(expert_for(t, model.boundary)) if isinstance(model, WanMoE) else model
        x = torch.where(keep, latents, x)
        t_f = torch.where(cond_mask, torch.zeros_like(t[:, None]), t[:, None].expand_as(cond_mask))
        v = net(x, t_f, context, cond=cond, actions=actions, **model_kwargs)
        return torch.where(keep, torch.zeros_like(v), v)

    return denoise_fn


def fill_given(noise: torch.Tensor, latents: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(cond_mask[:, None, :, None, None], latents, noise)
