"""A light streaming decoder distilled from a codec's own (serving's "lighter decoder" lever).

On one GPU the Wan VAE's decoder is not free: at ~39 frames/s at 480p (benchmarks/RESULTS.md, reference
numbers) it needs ~26 ms of the GPU per frame, of the 31 ms a frame has at 32 fps, leaving 5 for the DiT.
This decoder keeps the codec's latent interface and spends its capacity at latent resolution:

    z_t, z_(t-1)  --stem + residual 2-D blocks (latent res)-->  features
    features      --1x1 conv, channels -> time-->                4 feature maps (the frame group)
    each map      --(nearest x2 upsample + 3x3 conv) x log2(s) --> 3x3 conv --> RGB

Its only memory across calls is the previous latent frame, so decoding a stream chunk by chunk
equals decoding it at once. As in the Wan VAE, a stream's first latent frame (its own
predecessor here) decodes to one video frame, every later one to four. The weights come from
`titan-world distill-decoder` (titan_world/train/light_decoder.py): the codec's decode is the
teacher. `serving.light_decoder=PATH` makes the serving engine decode with it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from titan_world.model.codec import TEMPORAL_STRIDE
from titan_world.model.io import check_state_dict, write_atomically

CLASS_NAME = "TitanLightDecoder"
WEIGHTS = "model.safetensors"


@dataclass
class LightDecoderConfig:
    latent_channels: int = 16
    spatial_stride: int = 8  # a power of two: one upsampling stage per factor 2
    width: int = 64  # channels at latent resolution; each upsampling stage halves them (at least 16)
    depth: int = 2  # residual blocks at latent resolution

    def validate(self) -> None:
        s = self.spatial_stride
        if s < 1 or s & (s - 1):
            raise ValueError(f"light decoder spatial_stride={s}: expected a power of two")
        if self.latent_channels < 1 or self.width < 1 or self.depth < 0:
            raise ValueError(f"light decoder {self}: expected latent_channels >= 1, width >= 1, depth >= 0")

    def stage_widths(self) -> list[int]:
        widths, ch = [], self.width
        for _ in range(int(math.log2(self.spatial_stride))):
            ch = max(ch // 2, 16)
            widths.append(ch)
        return widths


class ResidualBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class LightDecoder(nn.Module):
    def __init__(self, cfg: LightDecoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w = cfg.width
        self.stem = nn.Conv2d(2 * cfg.latent_channels, w, 3, padding=1)
        self.trunk = nn.Sequential(*(ResidualBlock(w) for _ in range(cfg.depth)))
        self.to_time = nn.Conv2d(w, TEMPORAL_STRIDE * w, 1)
        ups, ch = [], w
        for out in cfg.stage_widths():
            ups.append(nn.Conv2d(ch, out, 3, padding=1))
            ch = out
        self.up = nn.ModuleList(ups)
        self.to_rgb = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, latents: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """latents [B, C, n, h, w] and the latent frame before them [B, C, 1, h, w] (None: they
        start a stream) -> video [B, 3, 4n (1 + 4(n-1) at a start), s*h, s*w], unclamped."""
        b, c, n, h, w = latents.shape
        if c != self.cfg.latent_channels:
            raise ValueError(f"latents have {c} channels; this light decoder was built for {self.cfg.latent_channels}")
        first = latents[:, :, :1] if previous is None else previous.to(latents.dtype)
        before = torch.cat([first, latents[:, :, :-1]], dim=2)
        x = torch.cat([latents, before], dim=1).transpose(1, 2).reshape(b * n, 2 * c, h, w)
        x = self.trunk(self.stem(x))
        x = F.silu(self.to_time(x)).view(b * n * TEMPORAL_STRIDE, self.cfg.width, h, w)  # one map per video frame
        for conv in self.up:
            x = F.silu(conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
        x = self.to_rgb(x)
        video = x.view(b, n * TEMPORAL_STRIDE, 3, *x.shape[-2:]).transpose(1, 2)
        return video[:, :, TEMPORAL_STRIDE - 1 :] if previous is None else video


class LightStreamDecoder:
    """`decode(latents)` call by call over a latent stream (the serving engine's stream decoder):
    the only state is the last latent frame, so it equals one decode of the whole stream."""

    def __init__(self, decoder: LightDecoder) -> None:
        self.decoder, self.previous = decoder, None
        self.dtype = next(decoder.parameters()).dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.dtype)
        video = self.decoder(latents, self.previous).clamp(-1, 1)
        self.previous = latents[:, :, -1:].clone()
        return video

    def nbytes(self) -> int:
        return 0 if self.previous is None else self.previous.numel() * self.previous.element_size()


class LightDecodedCodec:
    """A codec whose decoding goes through a light decoder; encoding stays the codec's."""

    def __init__(self, codec, decoder: LightDecoder):
        if decoder.cfg.latent_channels != codec.latent_channels or decoder.cfg.spatial_stride != codec.stride[1]:
            raise ValueError(
                f"light decoder expects {decoder.cfg.latent_channels} latent channels at stride "
                f"{decoder.cfg.spatial_stride}; "
                f"the codec gives {codec.latent_channels} at stride {codec.stride[1]} (distill one for this codec)"
            )
        self.codec, self.decoder = codec, decoder
        self.latent_channels, self.stride = codec.latent_channels, codec.stride

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(video)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.stream_decoder().decode(latents)

    def stream_decoder(self) -> LightStreamDecoder:
        return LightStreamDecoder(self.decoder)


def save_light_decoder(decoder: LightDecoder, folder: str | Path, *, teacher: str = "") -> None:
    """config.json + model.safetensors, written atomically (a temp folder renamed into place)."""

    def write(tmp: Path) -> None:
        config = {"_class_name": CLASS_NAME, **asdict(decoder.cfg), "teacher": teacher}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in decoder.state_dict().items()}, str(tmp / WEIGHTS))

    write_atomically(Path(folder), write)


def load_light_decoder(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> LightDecoder:
    """A decoder written by `save_light_decoder` (or a run dir holding one in `decoder/`)."""
    folder = Path(path)
    if (folder / "decoder" / "config.json").is_file():
        folder = folder / "decoder"
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"light decoder {folder}: no config.json (expected the output of `titan-world distill-decoder`)"
        )
    raw = json.loads(config.read_text())
    if raw.pop("_class_name", None) != CLASS_NAME:
        raise ValueError(f"{config}: not a light decoder (expected _class_name {CLASS_NAME!r})")
    raw.pop("teacher", None)
    decoder = LightDecoder(LightDecoderConfig(**raw))
    state = load_file(str(folder / WEIGHTS))
    check_state_dict(decoder, state, str(folder))
    decoder.load_state_dict(state)
    return decoder.to(device=device, dtype=dtype).eval()
