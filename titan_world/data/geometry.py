"""Camera geometry shared by the data pipeline and the model's action adapter.

Conventions: camera-to-world 4x4 in OpenCV axes (x right, y down, z forward); intrinsics
`[fx, fy, cx, cy]` in pixels of a `height x width` image whose pixel (u, v) has its centre at
(u + 0.5, v + 0.5) (so cx = width / 2 is the image centre).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def default_intrinsics(height: int, width: int, hfov_deg: float = 90.0) -> np.ndarray:
    """Square pixels, principal point at the image centre, `hfov_deg` horizontal field of view."""
    f = width / (2.0 * math.tan(math.radians(hfov_deg) / 2.0))
    return np.array([f, f, width / 2.0, height / 2.0], dtype=np.float64)


def pixel_directions(intrinsics, height: int, width: int, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-frame (unnormalised, z = 1) ray directions through pixel centres: [..., H, W, 3]."""
    k = torch.as_tensor(intrinsics, dtype=like.dtype if like is not None else torch.float64)
    if like is not None:
        k = k.to(like.device)
    dev, dt = k.device, k.dtype
    v, u = torch.meshgrid(
        torch.arange(height, device=dev, dtype=dt) + 0.5, torch.arange(width, device=dev, dtype=dt) + 0.5, indexing="ij"
    )
    fx, fy, cx, cy = (k[..., i, None, None] for i in range(4))
    x = (u - cx) / fx
    y = (v - cy) / fy
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def plucker_rays(c2w: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-pixel Plücker coordinates (o x d, d) with unit world direction d: [..., 6, H, W].

    `c2w [..., 4, 4]`, `intrinsics [..., 4]` (pixels of a `height x width` image). The moment
    o x d does not depend on where along the ray o lies, which is why the adapter uses it.
    """
    c2w = torch.as_tensor(c2w)
    if not c2w.is_floating_point():
        c2w = c2w.double()
    intrinsics = torch.as_tensor(intrinsics).to(c2w)
    if c2w.shape[-2:] != (4, 4) or intrinsics.shape[-1] != 4 or c2w.shape[:-2] != intrinsics.shape[:-1]:
        raise ValueError(
            f"plucker_rays: c2w {tuple(c2w.shape)} and intrinsics {tuple(intrinsics.shape)}; expected [...,4,4] and [...,4]"
        )
    d_cam = pixel_directions(intrinsics, height, width, like=c2w)  # [..., H, W, 3]
    rot = c2w[..., :3, :3]
    d = torch.einsum("...ij,...hwj->...hwi", rot, d_cam)
    d = d / d.norm(dim=-1, keepdim=True)
    o = c2w[..., None, None, :3, 3].expand_as(d)
    m = torch.cross(o, d, dim=-1)
    return torch.cat([m, d], dim=-1).movedim(-1, -3).contiguous()
