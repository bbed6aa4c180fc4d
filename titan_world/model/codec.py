"""Video codecs with one latent interface: video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k
  -> latents [B, C, 1 + k, H/s, W/s].

`TinyCodec` is the embedded default: an exact, invertible space-to-depth transform (no weights,
microseconds per clip) with Wan's temporal rule (the first frame alone, then groups of 4). Its
latent channel count is 3 * 4 * s * s. `WanVAECodec` wraps diffusers' `AutoencoderKLWan` for
users who have the weights locally (nothing is downloaded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEMPORAL_STRIDE = 4


def check_frame_count(num_frames: int, what: str = "clip") -> int:
    """Return k for a clip of 1 + 4k frames, or raise with the rule spelled out."""
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_STRIDE:
        raise ValueError(
            f"{what} has {num_frames} frames; expected 1 + 4k frames (1, 5, 9, ..., 81) "
            "because the codec maps 1 + 4k frames to 1 + k latent frames"
        )
    return (num_frames - 1) // TEMPORAL_STRIDE


def latent_frames(num_frames: int) -> int:
    return 1 + check_frame_count(num_frames)


@dataclass(frozen=True)
class TinyCodec:
    spatial_stride: int = 4

    @property
    def latent_channels(self) -> int:
        return 3 * TEMPORAL_STRIDE * self.spatial_stride**2

    @property
    def stride(self) -> tuple[int, int, int]:
        return (TEMPORAL_STRIDE, self.spatial_stride, self.spatial_stride)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        s = self.spatial_stride
        check_frame_count(t, "video")
        if h % s or w % s:
            raise ValueError(f"video is {h}x{w}; height and width must be multiples of {s}")
        # The first frame is repeated 4x so every latent frame holds a group of 4 frames.
        grouped = torch.cat([video[:, :, :1].expand(-1, -1, TEMPORAL_STRIDE, -1, -1), video[:, :, 1:]], dim=2)
        f = grouped.shape[2] // TEMPORAL_STRIDE
        x = grouped.reshape(b, c, f, TEMPORAL_STRIDE, h // s, s, w // s, s)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # b, c, dt, sh, sw, f, h', w'
        return x.reshape(b, c * TEMPORAL_STRIDE * s * s, f, h // s, w // s).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, ch, f, hl, wl = latents.shape
        s = self.spatial_stride
        if ch != self.latent_channels:
            raise ValueError(f"latents have {ch} channels; TinyCodec(s={s}) expects {self.latent_channels}")
        x = latents.reshape(b, 3, TEMPORAL_STRIDE, s, s, f, hl, wl).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, 3, f * TEMPORAL_STRIDE, hl * s, wl * s)
        return x[:, :, TEMPORAL_STRIDE - 1 :].contiguous()  # the first group decodes to one frame


class WanVAECodec:
    """Wan 2.1/2.2 VAE through diffusers, loaded from a local folder (never downloaded)."""

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        try:
            from diffusers import AutoencoderKLWan
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ImportError("the Wan VAE codec needs diffusers: pip install diffusers") from e
        self.vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True).to(device).eval()
        cfg = self.vae.config
        self.latent_channels = cfg.z_dim
        self.stride = (TEMPORAL_STRIDE, 2 ** len(cfg.temperal_downsample), 2 ** len(cfg.temperal_downsample))
        self._mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode()
        return (z - self._mean.to(z)) * self._inv_std.to(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self._inv_std.to(latents) + self._mean.to(latents)
        return self.vae.decode(z.to(self.vae.dtype)).sample.clamp(-1, 1)


def build_codec(kind: str = "tiny", spatial_stride: int = 4, path: str | None = None, device="cpu"):
    if kind == "tiny":
        return TinyCodec(spatial_stride)
    if kind == "wan_vae":
        if not path:
            raise ValueError("codec.kind=wan_vae needs codec.path: a local folder with the Wan VAE weights")
        return WanVAECodec(path, device=device)
    raise ValueError(f"codec.kind={kind!r}; expected 'tiny' or 'wan_vae'")
