"""From a data batch or an image to model inputs: how given frames condition the model.

Two formulations, chosen by `model.conditioning` (docs/model.md):

- "reference": what the official Wan pipelines feed their weights, per `model.model_type`.
  I2V (Wan2.2 I2V-A14B): noise on every latent frame, one scalar t, and the extra input channels
  y = [mask (4 channels, ones on latent frame 0), VAE(image followed by F-1 zero frames)] with the
  VAE's normalised latents (`reference_i2v_condition`). TI2V (Wan2.2 TI2V-5B, diffusers'
  `expand_timesteps`): the first latent frame is the clean image latent with t = 0 there, no extra
  channels. T2V: text only. `reference_denoiser` builds the sampler's function for these.
- "clean_first_frame" (the tiny default and the causal student): conditioning latent frames (I2V:
  the first; V2V: the first k) are given clean, with timestep 0, and carry no loss; the model also
  sees them through the I2V channels (4 mask channels + the conditioning latent, zero where not
  given). It needs no second VAE pass over a zero-padded clip (the tiny codec has no such notion)
  and it streams: a causal student generates chunk by chunk from clean context frames, where the
  reference I2V input y spans the whole clip up front. `noise_batch` / `conditioned_denoiser` serve
  training, post-training and generation with it, so the three agree on what "conditioned" means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titan_world.diffusion.flow import add_noise, timesteps, velocity_target
from titan_world.model.action import ActionInputs
from titan_world.model.codec import codec_from_config, frames_to_video, pixel_frames
from titan_world.model.moe import WanMoE, expert_for

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


def noise_batch(
    latents: torch.Tensor, cond_mask: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, with_i2v_channels: bool
) -> NoisedBatch:
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


def conditioned_denoiser(
    model,
    context,
    latents: torch.Tensor,
    cond_mask: torch.Tensor,
    actions: ActionInputs | None,
    with_i2v_channels: bool,
    **model_kwargs,
):
    """denoise_fn(x, t) for `titan_world.diffusion.samplers.sample` that keeps the given frames clean.

    Given frames are overwritten with their latents, get timestep 0 and a zero velocity, so both
    Euler and the multistep sampler leave them exactly unchanged. Start from noise with the given
    frames already filled in (`fill_given(noise, latents, cond_mask)`). A two-expert model is
    routed by the sampler's timestep (the given frames' t = 0 does not count).
    """
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


# -- the reference pipelines' formulation -------------------------------------------------------


def first_frame_mask(batch: int, frames: int, h: int, w: int, device=None) -> torch.Tensor:
    """[B, 4, F, h, w]: ones on latent frame 0 (its 4 mask channels stand for the 4 video frames a
    latent frame folds; the image is the first video frame, repeated 4x as the VAE's first group)."""
    mask = torch.zeros(batch, MASK_CHANNELS, frames, h, w, device=device)
    mask[:, :, 0] = 1.0
    return mask


@torch.no_grad()
def reference_i2v_condition(codec, image: torch.Tensor, num_frames: int) -> torch.Tensor:
    """y = [mask, VAE(image + num_frames - 1 zero frames)]: image [B, 3, H, W] in [-1, 1] -> [B, 4 + C, F, h, w]."""
    b, c, hp, wp = image.shape
    video = torch.cat([image[:, :, None], image.new_zeros(b, c, num_frames - 1, hp, wp)], dim=2)
    latents = codec.encode(video).float()
    return torch.cat([first_frame_mask(b, *latents.shape[2:], device=latents.device), latents], dim=1)


@torch.no_grad()
def reference_first_latent(codec, image: torch.Tensor) -> torch.Tensor:
    """TI2V: the clean latent of the image alone [B, C, 1, h, w] (the clip's first latent frame)."""
    return codec.encode(image[:, :, None]).float()


def reference_denoiser(
    model,
    context: torch.Tensor,
    negative: torch.Tensor,
    guidance: tuple[float, float],
    *,
    cond: torch.Tensor | None = None,
    first_latent: torch.Tensor | None = None,
):
    """denoise_fn(x, t) -> guided velocity as the reference pipelines compute it.

    t: the sampler's integer timestep per sample; a two-expert model routes by it (t >= boundary *
    1000 -> high-noise expert) and each expert has its own guidance scale: guidance = (high, low);
    v = v_neg + g * (v_text - v_neg), the unconditional branch being the negative prompt's
    embedding. cond: the I2V channels (`reference_i2v_condition`). first_latent: TI2V's clean
    first frame, substituted into x with t = 0 on that frame (its velocity is never used: sample
    with the same substitution at the end, `with_first_latent`)."""

    def denoise_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        name = expert_for(t, model.boundary) if isinstance(model, WanMoE) else "high"
        net = model.expert(name) if isinstance(model, WanMoE) else model
        scale = guidance[0] if name == "high" else guidance[1]
        dtype = next(net.parameters()).dtype
        t_in = t
        if first_latent is not None:
            x = with_first_latent(x, first_latent)
            t_in = t[:, None].expand(x.shape[0], x.shape[2]).clone()
            t_in[:, 0] = 0
        x_in = x.to(dtype)
        v = net(x_in, t_in, context.to(dtype), cond=cond).float()
        if scale == 1.0:
            return v
        v_neg = net(x_in, t_in, negative.to(dtype), cond=cond).float()
        return v_neg + scale * (v - v_neg)

    return denoise_fn


def with_first_latent(x: torch.Tensor, first_latent: torch.Tensor) -> torch.Tensor:
    return torch.cat([first_latent.to(x.dtype).expand(x.shape[0], -1, -1, -1, -1), x[:, :, 1:]], dim=2)


@torch.no_grad()
def training_inputs(
    model_cfg,
    latents: torch.Tensor,
    cond_mask: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    *,
    first_frames: torch.Tensor | None = None,
    codec=None,
) -> NoisedBatch:
    """One training step's inputs in the model's formulation (`model.conditioning`).

    clean_first_frame: `noise_batch` with the batch's cond_mask. reference, by model_type: I2V noises
    every latent frame at the sample's sigma (one t per sample), adds y = [mask, VAE(first frame +
    zero frames)] (needs `first_frames` [B, 3, H, W] in [-1, 1] and the `codec`) and takes the loss
    on every frame; TI2V keeps latent frame 0 clean at t = 0 (no loss there, no extra channels);
    T2V noises everything, text only. sigma: [B]."""
    if model_cfg.conditioning != "reference":
        return noise_batch(latents, cond_mask, sigma, noise, with_i2v_channels=model_cfg.cond_channels > 0)
    b, _, f = latents.shape[:3]
    given = torch.zeros(b, f, dtype=torch.bool, device=latents.device)
    if model_cfg.model_type == "ti2v":
        given[:, 0] = True
    if model_cfg.model_type != "i2v":
        return noise_batch(latents, given, sigma, noise, with_i2v_channels=False)
    if first_frames is None or codec is None:
        raise ValueError(
            "reference I2V training needs each clip's first frame (a dataset with raw frames) and the "
            "VAE (data.codec) to build y = [mask, VAE(first frame + zero frames)]"
        )
    cond = reference_i2v_condition(codec, first_frames, pixel_frames(f)).to(latents.dtype)
    nb = noise_batch(latents, given, sigma, noise, with_i2v_channels=False)
    return NoisedBatch(nb.x_t, nb.t, nb.target, nb.loss_mask, cond, nb.sigma)


_CODECS: dict[tuple, object] = {}


def training_batch_inputs(
    model_cfg,
    batch: dict,
    latents: torch.Tensor,
    cond_mask: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    codec_cfg,
) -> NoisedBatch:
    """`training_inputs` for a loader batch: with the reference I2V formulation, the clips' first
    frames (batch["frames"], a dataset with raw frames) and the VAE of `data.codec`, built once."""
    if model_cfg.conditioning != "reference" or model_cfg.model_type != "i2v":
        return training_inputs(model_cfg, latents, cond_mask, sigma, noise)
    if "frames" not in batch:
        raise ValueError(
            "model.conditioning=reference for an I2V model needs a dataset with raw frames "
            "(y = VAE(first frame + zero frames) is encoded per clip)"
        )
    key = (codec_cfg.kind, codec_cfg.spatial_stride, codec_cfg.path, codec_cfg.channels, str(latents.device))
    if key not in _CODECS:
        _CODECS[key] = codec_from_config(codec_cfg, device=latents.device)
    first = frames_to_video(batch["frames"][:, :1].cpu().numpy())[:, :, 0].to(latents.device)
    return training_inputs(model_cfg, latents, cond_mask, sigma, noise, first_frames=first, codec=_CODECS[key])
