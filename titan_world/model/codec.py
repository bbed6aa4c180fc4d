"""Video codecs with one latent interface: video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k
  -> latents [B, C, 1 + k, H/s, W/s].

`TinyCodec` is the embedded default, weight-free and microseconds per clip, with Wan's temporal
rule (the first frame alone, then groups of 4). With `channels=0` it is an exact, invertible
space-to-depth transform (3 * 4 * s * s channels). With `channels=K` it keeps the K
lowest-frequency coefficients of an orthonormal colour x DCT basis over each 4 x s x s block: a
compressing (lossy, low-pass) codec like a VAE, which is what a small DiT can learn on — an
exact codec makes every token carry 4x more numbers than the tiny model's width. Datasets store
the exact latents; `compress` maps them to K channels, so one dataset serves any K.
`WanVAECodec` wraps diffusers' `AutoencoderKLWan` for users who have the weights locally: a
diffusers VAE folder, or the official `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` (titan_world.model.official).
Both give a `stream_decoder()`: chunk-by-chunk decoding of a latent stream (serving) that equals
decoding the whole stream at once.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TEMPORAL_STRIDE = 4
log = logging.getLogger("titan_world.codec")


def check_frame_count(num_frames: int, what: str = "clip") -> int:
    """Return k for a clip of 1 + 4k frames, or raise with the rule spelled out."""
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_STRIDE:
        raise ValueError(
            f"{what} has {num_frames} frames; expected 1 + 4k frames (1, 5, 9, ..., 81) "
            "because the codec maps 1 + 4k frames to 1 + k latent frames"
        )
    return (num_frames - 1) // TEMPORAL_STRIDE


def latent_frames(num_frames: int, what: str = "clip") -> int:
    """Latent frames of a clip of `num_frames` (1 + 4k) frames: 1 + k. The one temporal-stride rule."""
    return 1 + check_frame_count(num_frames, what)


def pixel_frames(num_latents: int) -> int:
    """Video frames that `num_latents` latent frames decode to: 1 + 4(n - 1) (inverse of `latent_frames`)."""
    if num_latents < 1:
        raise ValueError(f"{num_latents} latent frames; expected at least 1")
    return 1 + TEMPORAL_STRIDE * (num_latents - 1)


def encodable_frames(num_frames: int) -> int:
    """The longest 1 + 4k prefix of a clip of `num_frames` >= 1 frames: what the codec encodes whole."""
    return pixel_frames(1 + (num_frames - 1) // TEMPORAL_STRIDE)


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II basis, rows ordered by frequency."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(torch.pi * (i + 0.5) * k / n) * (2.0 / n) ** 0.5
    m[0] /= 2**0.5
    return m


@functools.lru_cache(maxsize=8)
def low_frequency_basis(spatial_stride: int, channels: int) -> torch.Tensor:
    """[channels, 3*4*s*s] rows over the exact latent layout (colour, dt, sh, sw): luma/chroma x
    temporal x vertical x horizontal DCT, lowest total frequency f first (luma first), each row
    scaled by (1 + 3f) to roughly whiten natural video's falling spectrum (a VAE normalises its
    latents per channel for the same reason). Rows are orthogonal; `expand` undoes the scale."""
    colour = torch.tensor([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=torch.float64)
    colour = colour / colour.norm(dim=1, keepdim=True)
    d_t, d_s = _dct_matrix(TEMPORAL_STRIDE), _dct_matrix(spatial_stride)
    full = torch.kron(torch.kron(torch.kron(colour, d_t), d_s), d_s)
    idx = torch.cartesian_prod(*(torch.arange(n) for n in (3, TEMPORAL_STRIDE, spatial_stride, spatial_stride)))
    freq = [int(idx[r, 1:].sum()) + int(idx[r, 0] > 0) for r in range(len(idx))]
    order = sorted(range(len(idx)), key=lambda r: (freq[r], r))
    if not 0 < channels <= len(order):
        raise ValueError(f"data.codec.channels={channels}: expected 1..{len(order)} (0 = exact)")
    keep = order[:channels]
    gains = torch.tensor([1.0 + 3.0 * freq[r] for r in keep], dtype=torch.float64)
    return (full[keep] * gains[:, None]).float()


@dataclass(frozen=True)
class TinyCodec:
    spatial_stride: int = 4
    channels: int = 0  # 0: exact; K: K low-frequency coefficients per block (lossy, compressing)

    @property
    def exact_channels(self) -> int:
        return 3 * TEMPORAL_STRIDE * self.spatial_stride**2

    @property
    def latent_channels(self) -> int:
        return self.channels or self.exact_channels

    @property
    def stride(self) -> tuple[int, int, int]:
        return (TEMPORAL_STRIDE, self.spatial_stride, self.spatial_stride)

    @property
    def _scale(self) -> float:
        """Coefficients divided by sqrt(block size / 3) so the luma DC is ~sqrt(3) x mean pixel."""
        return (TEMPORAL_STRIDE * self.spatial_stride**2) ** 0.5

    def compress(self, exact: torch.Tensor) -> torch.Tensor:
        """Exact latents [B, 3*4*s*s, ...] -> this codec's [B, K, ...] (identity when exact)."""
        if not self.channels:
            return exact
        basis = low_frequency_basis(self.spatial_stride, self.channels).to(exact.device)
        return torch.einsum("kc,bc...->bk...", basis, exact.float()).to(exact.dtype) / self._scale

    def expand(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, K, ...] -> the exact layout (the low-pass reconstruction when lossy)."""
        if not self.channels:
            return latents
        basis = low_frequency_basis(self.spatial_stride, self.channels).to(latents.device)
        inverse = basis / basis.pow(2).sum(dim=1, keepdim=True)  # rows are orthogonal with norms = gains
        return torch.einsum("kc,bk...->bc...", inverse, latents.float() * self._scale).to(latents.dtype)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.compress(self._space_to_depth(video))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents have {latents.shape[1]} channels; {self} expects {self.latent_channels}")
        return self._depth_to_space(self.expand(latents))

    def stream_decoder(self) -> ContextStreamDecoder:
        """Latent frames decode independently here, so streaming is exact with one frame of context."""
        return ContextStreamDecoder(self)

    def _space_to_depth(self, video: torch.Tensor) -> torch.Tensor:
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

    def _depth_to_space(self, latents: torch.Tensor) -> torch.Tensor:
        b, ch, f, hl, wl = latents.shape
        s = self.spatial_stride
        x = latents.reshape(b, 3, TEMPORAL_STRIDE, s, s, f, hl, wl).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, 3, f * TEMPORAL_STRIDE, hl * s, wl * s)
        return x[:, :, TEMPORAL_STRIDE - 1 :].contiguous()  # the first group decodes to one frame


class WanVAECodec:
    """Wan 2.1/2.2 VAE through diffusers, loaded from a local diffusers folder or an official
    `.pth` file (never downloaded)."""

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        try:
            from diffusers import AutoencoderKLWan  # noqa: PLC0415 (optional dependency, its absence handled below)
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ImportError("the Wan VAE codec needs diffusers: pip install diffusers") from e
        from titan_world.model.official import (  # noqa: PLC0415 (import cycle: official -> io -> dit -> action -> codec)
            WAN21_VAE_FILE,
            WAN22_VAE_FILE,
            load_official_vae,
        )

        p = Path(path)
        if p.suffix == ".pth" or p.is_file():
            self.vae = load_official_vae(p, dtype=dtype, device=device)
        elif (p / "config.json").is_file():
            self.vae = (
                AutoencoderKLWan.from_pretrained(
                    path, torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=False
                )
                .to(device)
                .eval()
            )
        else:
            raise FileNotFoundError(
                f"data.codec.path={path}: expected a diffusers VAE folder (config.json + weights) "
                f"or the official {WAN21_VAE_FILE} / {WAN22_VAE_FILE}"
            )
        cfg = self.vae.config
        self.latent_channels = cfg.z_dim
        spatial = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)  # Wan2.2: 2x2 pixel patches, stride 16
        self.stride = (TEMPORAL_STRIDE, spatial, spatial)
        self._mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode()
        return (z - self._mean.to(z)) * self._inv_std.to(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self._unnormalize(latents)).sample.clamp(-1, 1)

    def _unnormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents / self._inv_std.to(latents) + self._mean.to(latents)).to(self.vae.dtype)

    def stream_decoder(self) -> WanStreamDecoder | ContextStreamDecoder:
        """The causal decoder carried across calls (`WanStreamDecoder`); a diffusers whose decoder
        has no causal cache argument gets the one-frame-of-context fallback."""
        if "feat_cache" in inspect.signature(self.vae.decoder.forward).parameters:
            return WanStreamDecoder(self)
        log.warning(
            "this diffusers' Wan decoder takes no causal cache: "
            "streaming decode re-decodes one latent of context per call"
        )
        return ContextStreamDecoder(self)


class ContextStreamDecoder:
    """Decode a latent stream call by call: each call decodes [the previous call's last latent,
    the new latents] and drops the context's frame. Exact for a codec whose latent frames decode
    independently (TinyCodec); for a causal VAE it restarts the decoder's memory at the context
    frame (the fallback, and how a stream resumes after a gap). The first call decodes as a clip
    start (its first latent is one frame)."""

    def __init__(self, codec) -> None:
        self.codec, self.last = codec, None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, n, h, w] -> the video frames of these latents [B, 3, 4n (first call: 1 + 4(n-1)), H, W]."""
        if self.last is None:
            video = self.codec.decode(latents)
        else:
            video = self.codec.decode(torch.cat([self.last, latents], dim=2))[:, :, 1:]
        self.last = latents[:, :, -1:].clone()
        return video

    def nbytes(self) -> int:
        return 0 if self.last is None else self.last.numel() * self.last.element_size()


class WanStreamDecoder:
    """The Wan VAE's causal decoder run across calls as over one clip.

    diffusers decodes a clip one latent frame at a time, every causal convolution reading the
    last frames of its input from a cache that lives for that one `decode` call. Here the cache
    lives as long as this object, so decoding a stream chunk by chunk gives exactly the frames of
    one `vae.decode` of the whole stream (tested), without re-decoding context latents and
    without the seams a fresh decoder memory leaves at every chunk. Memory is bounded: per
    convolution the cache holds its last two input frames.
    """

    def __init__(self, codec: WanVAECodec) -> None:
        self.codec = codec
        convs = sum(type(m).__name__ == "WanCausalConv3d" for m in codec.vae.decoder.modules())
        self.cache: list = [None] * convs
        self.first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.codec.vae
        x = vae.post_quant_conv(self.codec._unnormalize(latents))  # a 1x1x1 convolution: no temporal state
        out = []
        for i in range(x.shape[2]):
            out.append(vae.decoder(x[:, :, i : i + 1], feat_cache=self.cache, feat_idx=[0], first_chunk=self.first))
            self.first = False
        video = torch.cat(out, dim=2)
        if vae.config.patch_size is not None:  # Wan2.2's VAE decodes 2x2 patches
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify  # noqa: PLC0415 (heavy optional dependency: diffusers)

            video = unpatchify(video, patch_size=vae.config.patch_size)
        return video.clamp(-1, 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache if isinstance(t, torch.Tensor))


def default_vae_stride(model_cfg) -> int:
    """Spatial stride of the codec a model config is paired with, without loading it: the Wan2.2
    TI2V VAE 16 (48 latent channels), else `model.action.spatial_stride` (Wan VAE 8; the tiny
    config sets 4 for TinyCodec)."""
    return {48: 16}.get(model_cfg.out_dim, model_cfg.action.spatial_stride)


def codec_from_config(codec_cfg, device="cpu", dtype: torch.dtype = torch.float32):
    """The codec the model sees (`data.codec`: kind, spatial_stride, channels, path).

    Datasets are written with the exact codec (`channels=0`) and compressed by the loader, so
    training, sampling and serving all build their codec here. `dtype`: the Wan VAE's weights
    (serving on GPU decodes in bf16; TinyCodec has none)."""
    return build_codec(
        codec_cfg.kind,
        codec_cfg.spatial_stride,
        codec_cfg.path,
        device=device,
        channels=codec_cfg.channels,
        dtype=dtype,
    )


def build_codec(
    kind: str = "tiny",
    spatial_stride: int = 4,
    path: str | None = None,
    device="cpu",
    channels: int = 0,
    dtype: torch.dtype = torch.float32,
):
    if kind == "tiny":
        return TinyCodec(spatial_stride, channels)
    if kind == "wan_vae":
        if not path:
            raise ValueError(
                "codec.kind=wan_vae needs codec.path: a diffusers VAE folder or the official "
                "Wan2.1_VAE.pth / Wan2.2_VAE.pth"
            )
        return WanVAECodec(path, device=device, dtype=dtype)
    raise ValueError(f"codec.kind={kind!r}; expected 'tiny' or 'wan_vae'")


def frames_to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W] in [-1, 1] (the codec's input)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(127.5).sub_(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """The inverse: float [B, 3, T, H, W] in [-1, 1] (the codec's output; any device) -> uint8
    [B, T, H, W, 3] on the host."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous().cpu().numpy()
