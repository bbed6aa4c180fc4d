"""Model FLOPs of the Wan DiT (the one formula the trainer, benchmarks and `inspect` share).

Counting convention (PaLM/MFU practice, as benchmarks/RESULTS.md counts): 2 FLOPs per multiply-accumulate,
matmuls only, full (unmasked) attention, a training step = 3 x forward (backward = 2 x forward;
activation recomputation is *not* counted, so MFU stays comparable across AC settings).

Per video token per layer (forward), sequence S, text length Lt, dim d, FFN width f:
  self-attn q,k,v,o 8·d²  +  cross-attn q,o 4·d²  (together 12·d²)
  FFN 4·d·f
  self-attention scores + weighted sum 4·S·d
  cross-attention scores + weighted sum 4·Lt·d
per sample per layer: cross-attn k,v over the text 4·Lt·d².
Plus the patch embedding, head, text embedding, time projection and (when enabled) the action
adapter. Check: Wan 1.3B at 32,760 tokens gives 8.64 GFLOP/token forward, and diffusers' 2.754 s
train step is 308 model-TFLOP/s, the reference number in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from titan_world.model.action import camera_features

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the device name.
DEVICE_PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "B100": 1750.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


@dataclass(frozen=True)
class FlopsBreakdown:
    tokens: int  # video tokens per sample
    forward: float  # forward FLOPs per sample
    train_step: float  # 3 x forward, per sample

    @property
    def per_token_forward(self) -> float:
        return self.forward / max(1, self.tokens)


def sample_flops(model_cfg, latent_frames: int, latent_h: int, latent_w: int) -> FlopsBreakdown:
    """FLOPs of one sample of `latent_frames` x `latent_h` x `latent_w` latents through one expert."""
    pt, ph, pw = model_cfg.patch_size
    s = (latent_frames // pt) * (latent_h // ph) * (latent_w // pw)
    d, f, lt, n = model_cfg.dim, model_cfg.ffn_dim, model_cfg.text_len, model_cfg.num_layers
    per_token_layer = 12 * d * d + 4 * d * f + 4 * s * d + 4 * lt * d
    per_sample_layer = 4 * lt * d * d
    patch = math.prod(model_cfg.patch_size)
    fwd = n * (s * per_token_layer + per_sample_layer)
    fwd += s * 2 * model_cfg.in_dim * patch * d  # patch embedding
    fwd += s * 2 * d * model_cfg.out_dim * patch  # head
    fwd += 2 * lt * (model_cfg.text_dim * d + d * d)  # text embedding
    fwd += 2 * (model_cfg.freq_dim * d + d * d + d * 6 * d) * latent_frames  # time embedding (per frame)
    a = getattr(model_cfg, "action", None)
    if a is not None and a.enabled:
        hidden = a.hidden_dim or d
        cam = camera_features(a.spatial_stride, (ph, pw), a.ray_frequencies) if a.use_camera else 0
        fwd += s * 2 * ((cam + a.num_keys) * hidden + hidden * d)  # action embedding MLP
        fwd += n * s * 2 * d * 2 * d  # per-block AdaLN projection
    return FlopsBreakdown(tokens=s, forward=float(fwd), train_step=3.0 * float(fwd))


def train_step_flops(model_cfg, batch: int, latent_frames: int, latent_h: int, latent_w: int) -> float:
    """Model FLOPs of one optimizer step over `batch` samples (MoE: one expert runs per step)."""
    return batch * sample_flops(model_cfg, latent_frames, latent_h, latent_w).train_step


def device_peak_tflops(device: torch.device | str, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of `device` (None on CPU or an unknown GPU: MFU is then not reported)."""
    if override:
        return float(override)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in DEVICE_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None
