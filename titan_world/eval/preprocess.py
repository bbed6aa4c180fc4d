"""VBench's frame preprocessing re-implemented in plain torch (torchvision is not available).

Each helper names the torchvision/VBench operation it reproduces, so results match VBench's
on the same frames (float inputs, no rounding, `antialias=False` as VBench passes it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_float_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W] in 0..255 (VBench's `torch.Tensor(frames)`)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """torchvision `Resize((h, w), antialias=False)` on a float tensor."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def resize_shorter(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """torchvision `Resize(size)` (int): shorter side -> size, longer -> int(size * long / short)."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    if w <= h:
        return resize(x, (int(size * h / w), size), mode)
    return resize(x, (size, int(size * w / h)), mode)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision `CenterCrop(size)` (pads with zeros when the image is smaller)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        x = F.pad(x, [pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2])
        h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def clip_transform(x: torch.Tensor, n_px: int = 224, uint8: bool = False) -> torch.Tensor:
    """VBench `clip_transform`: Resize(n_px, bicubic) -> CenterCrop -> /255 -> CLIP normalise.

    `uint8=True`: the frames are a uint8 tensor in VBench (overall consistency reads them with
    decord), so torchvision's resize rounds its bicubic result back to 0..255 integers; the float
    path (aesthetic quality: `torch.Tensor(frames)`) keeps the unrounded values.
    """
    x = resize_shorter(x, n_px, "bicubic")
    if uint8:
        x = x.clamp(0, 255).round()
    x = center_crop(x, n_px) / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class Padder:
    """RAFT/AMT `InputPadder`: replicate-pad H, W up to a multiple of `divisor` (split evenly)."""

    def __init__(self, hw: tuple[int, int], divisor: int):
        ht, wd = hw
        pad_ht = (((ht // divisor) + 1) * divisor - ht) % divisor
        pad_wd = (((wd // divisor) + 1) * divisor - wd) % divisor
        self.pad_ = [pad_wd // 2, pad_wd - pad_wd // 2, pad_ht // 2, pad_ht - pad_ht // 2]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad_, mode="replicate") if any(self.pad_) else x

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        l, r, t, b = self.pad_
        h, w = x.shape[-2:]
        return x[..., t : h - b, l : w - r]


def middle_indices(num_frames: int, vlen: int) -> list[int]:
    """VBench `get_frame_indices(num_frames, vlen, sample='middle')`: middle of equal intervals."""
    acc = min(num_frames, vlen)
    edges = np.linspace(0, vlen, acc + 1).astype(int)
    idx = [int((edges[i] + edges[i + 1] - 1) // 2) for i in range(acc)]
    return idx + [idx[-1]] * (num_frames - len(idx))
