"""3-D rotary position embedding over (frame, height, width), as in Wan.

head_dim is split into t/h/w parts of head_dim - 4*(head_dim//6), 2*(head_dim//6), 2*(head_dim//6)
real dims (44/42/42 for 128), i.e. consecutive pairs rotated by pos * theta^(-2i/d_axis).
Frame positions start at `frame_offset`, so a chunk computed alone gets exactly the angles it
would have inside the full sequence (needed for streaming and the KV cache).
"""

from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _inv_freq(dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def rope_angles(
    grid: tuple[int, int, int], head_dim: int, *, frame_offset: int = 0, theta: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [F*H*W, head_dim/2] (float32) for tokens in (f, h, w) raster order."""
    f, h, w = grid
    dt, dh, dw = rope_axis_dims(head_dim)
    ang_t = torch.outer(
        torch.arange(frame_offset, frame_offset + f, device=device, dtype=torch.float64), _inv_freq(dt, theta, device)
    )
    ang_h = torch.outer(torch.arange(h, device=device, dtype=torch.float64), _inv_freq(dh, theta, device))
    ang_w = torch.outer(torch.arange(w, device=device, dtype=torch.float64), _inv_freq(dw, theta, device))
    angles = torch.cat(
        [
            ang_t[:, None, None, :].expand(f, h, w, -1),
            ang_h[None, :, None, :].expand(f, h, w, -1),
            ang_w[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x [B, L, H, D] by the angles [L, D/2]; computed in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.type_as(x)
