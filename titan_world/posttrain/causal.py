"""Stage 1 — causal adaptation by diffusion forcing (LingBot §3.4.1).

The clip's latent frames are cut into chunks: chunk 0 holds the `prefix` given (conditioning)
frames, then chunks of `chunk_frames`. That is exactly how the streaming engine walks a session
(the start image is written to the KV cache as its own chunk, then chunks of C frames follow), so
the mask trained here is the mask served. Attention is bidirectional inside a chunk and causal
across chunks (optionally sink + window, as the rolling KV cache sees it).

Each generated chunk gets its own timestep from {t1..tm} ∪ {0} (diffusion forcing); given frames
are clean (t = 0). The student predicts velocity v; x0 = x_t − σ·v; the loss is

    L = E ‖G(x_t, t, a) − x0‖²      (mean over channels/pixels, over chunks with t > 0)

A t = 0 chunk has x0 = x_t exactly, so it carries no loss of its own: it is there as clean
context whose K/V later chunks attend to — the "clean frame supervision" that teaches the
high-noise expert to encode clean latents (they get their gradient through the later chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titan_world.conditioning import masked_mse, noise_batch
from titan_world.diffusion.flow import NUM_TRAIN_TIMESTEPS, x0_from_velocity
from titan_world.model.action import ActionInputs
from titan_world.model.attention import AttnMask


@dataclass(frozen=True)
class CausalMask(AttnMask):
    """`AttnMask.block_causal` whose first chunk is the `prefix_frames` given frames.

    chunk(f) = 0 for f < P, else (P > 0) + (f − P) // C. A query sees keys of chunks <= its own,
    and of earlier chunks only the first `sink_frames` frames and the `window_frames` frames
    before its chunk — the same rule as the KV cache. P = 0 reduces to `AttnMask.block_causal`.
    """

    prefix_frames: int = 0

    def with_padding(self, padded_len: int) -> CausalMask:
        return CausalMask(
            self.num_frames,
            self.tokens_per_frame,
            self.chunk_frames,
            self.sink_frames,
            self.window_frames,
            padded_len,
            self.prefix_frames,
        )

    def _chunk_of(self, f: torch.Tensor) -> torch.Tensor:
        p, c = self.prefix_frames, self.chunk_frames
        if p == 0:
            return f // c
        return torch.where(f < p, torch.zeros_like(f), 1 + (f - p).clamp_min(0) // c)

    def _chunk_start(self, f: torch.Tensor) -> torch.Tensor:
        p, c = self.prefix_frames, self.chunk_frames
        if p == 0:
            return (f // c) * c
        return torch.where(f < p, torch.zeros_like(f), p + ((f - p).clamp_min(0) // c) * c)

    def allowed(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        valid_k = k_idx < self.valid_len
        qf, kf = q_idx // self.tokens_per_frame, k_idx // self.tokens_per_frame
        qc, kc = self._chunk_of(qf), self._chunk_of(kf)
        ok = kc <= qc
        if self.window_frames is not None:
            ok = ok & ((kc == qc) | (kf < self.sink_frames) | (kf >= self._chunk_start(qf) - self.window_frames))
        return valid_k & (ok | (q_idx >= self.valid_len))


@dataclass(frozen=True)
class ChunkLayout:
    """Latent frames [0, prefix) are given; then generated chunks of `chunk_frames` (last may be short)."""

    num_frames: int
    prefix: int
    chunk_frames: int

    def chunks(self) -> list[tuple[int, int]]:
        """(start, end) of every generated chunk."""
        return [
            (s, min(s + self.chunk_frames, self.num_frames))
            for s in range(self.prefix, self.num_frames, self.chunk_frames)
        ]

    def mask(self, tokens_per_frame: int, sink_frames: int = 0, window_frames: int | None = None) -> CausalMask:
        return CausalMask(
            self.num_frames, tokens_per_frame, self.chunk_frames, sink_frames, window_frames, None, self.prefix
        )


def forcing_sigmas(
    batch: int, layout: ChunkLayout, timesteps: list[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """[B, F] noise levels: each generated chunk draws one of `timesteps` ∪ {0} (uniformly);
    given frames get 0."""
    choices = torch.tensor([float(t) for t in timesteps] + [0.0]) / NUM_TRAIN_TIMESTEPS
    sigma = torch.zeros(batch, layout.num_frames)
    for s, e in layout.chunks():
        idx = torch.randint(len(choices), (batch,), generator=generator)
        sigma[:, s:e] = choices[idx][:, None]
    return sigma


def i2v_mask(batch: int, num_frames: int, prefix: int = 1, device=None) -> torch.Tensor:
    """cond_mask [B, F]: the first `prefix` latent frames are given (I2V, as served)."""
    m = torch.zeros(batch, num_frames, dtype=torch.bool, device=device)
    m[:, :prefix] = True
    return m


@dataclass
class ForcingLoss:
    loss: torch.Tensor
    x0_pred: torch.Tensor
    sigma: torch.Tensor  # [B, F]


def diffusion_forcing_loss(
    model: torch.nn.Module,
    latents: torch.Tensor,
    context,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    layout: ChunkLayout,
    *,
    actions: ActionInputs | None = None,
    with_i2v_channels: bool = True,
    sink_frames: int = 0,
    window_frames: int | None = None,
) -> ForcingLoss:
    """‖G(x_t, t, a) − x0‖² over chunks with t > 0, one block-causal forward for the whole clip."""
    b, f = latents.shape[0], latents.shape[2]
    cond_mask = i2v_mask(b, f, layout.prefix, latents.device)
    nb = noise_batch(latents, cond_mask, sigma.to(latents.device), noise, with_i2v_channels)
    tpf = (latents.shape[3] // model.cfg.patch_size[1]) * (latents.shape[4] // model.cfg.patch_size[2])
    v = model(
        nb.x_t,
        nb.t,
        context,
        cond=nb.cond,
        actions=actions,
        action_reference=actions.c2w[:, 0] if actions is not None else None,
        attn_mask=layout.mask(tpf, sink_frames, window_frames),
    )
    x0_pred = x0_from_velocity(nb.x_t, v.float(), nb.sigma)
    loss_mask = nb.loss_mask * (nb.sigma > 0).to(nb.loss_mask.dtype)
    return ForcingLoss(masked_mse(x0_pred, latents, loss_mask), x0_pred, nb.sigma)
