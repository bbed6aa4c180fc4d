"""Action conditioning (LingBot-style): camera Plücker rays + keyboard multi-hot -> per-token
AdaLN modulation after each block's self-attention, zero-initialised (a fresh adapter is an
exact no-op).

Inputs per *latent* frame: keys [B, F, K], camera-to-world [B, F, 4, 4] (OpenCV axes: x right, y down,
z forward), intrinsics [B, F, 4] (fx, fy, cx, cy in pixels; pixel (u, v) centred at (u + 0.5, v + 0.5)).
Poses are made relative to a reference frame (the clip's first frame, or a session's first frame when
streaming) and translations divided by a fixed scale, so the same motion gives the same input wherever a
window starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from titan_world.model.codec import TEMPORAL_STRIDE, check_frame_count


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
            f"plucker_rays: c2w {tuple(c2w.shape)} and intrinsics {tuple(intrinsics.shape)}; "
            "expected [...,4,4] and [...,4]"
        )
    # geometry in the poses' precision: under autocast the einsum would round directions to bf16
    with torch.autocast(c2w.device.type, enabled=False):
        d_cam = pixel_directions(intrinsics, height, width, like=c2w)  # [..., H, W, 3]
        rot = c2w[..., :3, :3]
        d = torch.einsum("...ij,...hwj->...hwi", rot, d_cam)
        d = d / d.norm(dim=-1, keepdim=True)
        o = c2w[..., None, None, :3, 3].expand_as(d)
        m = torch.cross(o, d, dim=-1)
        return torch.cat([m, d], dim=-1).movedim(-1, -3).contiguous()


def keys_per_latent_frame(keys: torch.Tensor) -> torch.Tensor:
    """[..., 1 + 4k, K] per video frame -> [..., 1 + k, K]: frame 0 alone, then the mean over each
    group of 4 frames (the fraction of time a key was held)."""
    check_frame_count(keys.shape[-2], "actions")
    rest = keys[..., 1:, :]
    groups = rest.reshape(*rest.shape[:-2], -1, TEMPORAL_STRIDE, rest.shape[-1]).mean(-2)
    return torch.cat([keys[..., :1, :], groups], dim=-2)


@dataclass
class ActionInputs:
    keys: torch.Tensor  # [B, F, K] per latent frame
    c2w: torch.Tensor  # [B, F, 4, 4]
    intrinsics: torch.Tensor  # [B, F, 4]

    @staticmethod
    def from_video_frames(keys: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor) -> ActionInputs:
        """Per-video-frame actions (T = 1 + 4k) -> per latent frame: latent 0 <- frame 0; latent i
        <- frames 4i-3..4i (keys averaged = fraction of time pressed, pose/intrinsics of frame 4i)."""
        idx = torch.arange(0, keys.shape[1], TEMPORAL_STRIDE, device=keys.device)
        return ActionInputs(keys_per_latent_frame(keys), c2w[:, idx], intrinsics[:, idx])

    def slice(self, start: int, end: int) -> ActionInputs:
        return ActionInputs(self.keys[:, start:end], self.c2w[:, start:end], self.intrinsics[:, start:end])

    def relative(self, reference: torch.Tensor | None = None, translation_scale: float = 1.0) -> torch.Tensor:
        """c2w relative to `reference` [B, 4, 4] (default: the first frame), translations scaled."""
        ref = self.c2w[:, 0] if reference is None else reference
        # inv_ex: linalg.inv checks for singular input, a host sync on every pass on a GPU; poses
        # are rotation + translation (ingestion refuses singular ones: titan_world/data/ingest.py)
        return _scaled_translation(torch.linalg.inv_ex(ref).inverse[:, None] @ self.c2w, translation_scale)

    def in_world(self, translation_scale: float = 1.0) -> torch.Tensor:
        """c2w as given (the data's own frame), translations scaled."""
        return _scaled_translation(self.c2w, translation_scale)


def _scaled_translation(c2w: torch.Tensor, translation_scale: float) -> torch.Tensor:
    """A copy of c2w [..., 4, 4] with its translations divided by `translation_scale`."""
    out = c2w.clone()
    out[..., :3, 3] = out[..., :3, 3] / translation_scale
    return out


@dataclass
class WarpSource:
    """For each frame of a forward: the clean latent frame its I2V channels re-project, and that frame's
    camera. The rule is always the last given frame (`last_given_source`, the default); a forward that
    does not hold that frame (a cached chunk of a causal student, past the start) passes it here."""

    latents: torch.Tensor  # [B, C, F, h, w]
    c2w: torch.Tensor  # [B, F, 4, 4]
    valid: torch.Tensor  # [B, F] bool: frames with nothing to re-project keep zeros

    @staticmethod
    def gather(clean: torch.Tensor, c2w: torch.Tensor, index: torch.Tensor) -> WarpSource:
        """Frames `index` [B, F] of `clean` [B, C, T, h, w] and of `c2w` [B, T, 4, 4] (< 0: none)."""
        b, c, _, h, w = clean.shape
        i = index.clamp_min(0)
        lat = torch.gather(clean, 2, i[:, None, :, None, None].expand(b, c, -1, h, w))
        pose = torch.gather(c2w, 1, i[:, :, None, None].expand(-1, -1, 4, 4))
        return WarpSource(lat, pose, index >= 0)


def last_given_source(cond: torch.Tensor, actions: ActionInputs, mask_channels: int = 4) -> WarpSource:
    """The last given frame at or before each frame (the mask channels say which are given)."""
    f = cond.shape[2]
    given = cond[:, 0, :, 0, 0] > 0.5
    index = torch.where(given, torch.arange(f, device=cond.device), -1).cummax(dim=1).values
    return WarpSource.gather(cond[:, mask_channels:], actions.c2w, index)


def warp_condition(
    cond: torch.Tensor,
    actions: ActionInputs,
    spatial_stride: int,
    source: WarpSource | None = None,
    mask_channels: int = 4,
) -> torch.Tensor:
    """I2V channels [B, mask + C, F, h, w] with each generated frame's latent channels filled by its
    source frame (default: the last given one) re-projected to that frame's camera by the rotation
    between the two poses.

    The rotation-only homography needs no depth (exact for turning, approximate for walking); pixels
    that come from outside the source view (or behind it) stay zero. The model then sees, at each token,
    what the source frame shows in that direction: following the camera becomes copying, which a small
    model learns in minutes, where inferring the view change from rays or keys alone does not (the demo
    model ignored both: docs/train.md). Given frames keep their own latents."""
    b, _, f, h, w = cond.shape
    src = source if source is not None else last_given_source(cond, actions, mask_channels)
    rot = actions.c2w[..., :3, :3].to(torch.float32)  # [B, F, 3, 3] camera-to-world
    rel = src.c2w[..., :3, :3].to(torch.float32).transpose(-1, -2) @ rot  # target camera -> source camera
    k = actions.intrinsics.to(torch.float32) / spatial_stride  # in pixels of the latent grid
    d = torch.einsum("bfij,bfhwj->bfhwi", rel, pixel_directions(k, h, w, like=rel))  # target rays, source frame
    z = d[..., 2]
    ok = z > 1e-3
    zs = torch.where(ok, z, torch.ones_like(z))
    u = k[:, :, None, None, 0] * d[..., 0] / zs + k[:, :, None, None, 2]  # the source shares the intrinsics
    v = k[:, :, None, None, 1] * d[..., 1] / zs + k[:, :, None, None, 3]
    grid = torch.stack([2 * u / w - 1, 2 * v / h - 1], dim=-1)
    grid = torch.where(ok[..., None], grid, torch.full_like(grid, 3.0))  # behind the source camera: zeros
    lat = cond[:, mask_channels:]
    flat = src.latents.to(torch.float32).permute(0, 2, 1, 3, 4).reshape(b * f, -1, h, w)
    warped = F.grid_sample(
        flat, grid.reshape(b * f, h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    warped = warped.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4).to(cond.dtype)
    given = cond[:, 0, :, 0, 0] > 0.5
    fill = (src.valid & ~given)[:, None, :, None, None]
    return torch.cat([cond[:, :mask_channels], torch.where(fill, warped, lat)], dim=1)


def camera_features(spatial_stride: int, patch_hw: tuple[int, int], ray_frequencies: int = 0) -> int:
    """Camera inputs per token: 6 Plücker coordinates of each of its pixels, plus sin/cos of each
    coordinate of its mean ray at `ray_frequencies` octaves."""
    return 6 * spatial_stride**2 * patch_hw[0] * patch_hw[1] + 12 * ray_frequencies


def fourier_features(x: torch.Tensor, octaves: int) -> torch.Tensor:
    """[..., D] -> [..., 2 D octaves]: sin and cos of pi 2^k x, k < octaves (NeRF's positional encoding:
    a small network can then fit a function of x with detail finer than x's range)."""
    freq = torch.pi * 2.0 ** torch.arange(octaves, device=x.device, dtype=x.dtype)
    xf = (x[..., None] * freq).flatten(-2)
    return torch.cat([xf.sin(), xf.cos()], dim=-1)


class ActionEmbedding(nn.Module):
    """Plücker rays unshuffled to the latent grid and patchified (optionally with Fourier features of
    each token's mean ray), plus keys per token -> [B, L, dim]."""

    def __init__(
        self,
        dim: int,
        num_keys: int,
        spatial_stride: int,
        patch_hw: tuple[int, int],
        hidden: int = 0,
        use_camera: bool = True,
        world_frame: bool = False,
        ray_frequencies: int = 0,
    ):
        super().__init__()
        self.stride, self.patch_hw, self.use_camera = spatial_stride, patch_hw, use_camera
        self.world_frame = world_frame  # poses in the data's frame (model.action.pose_frame=world): no reference
        self.ray_frequencies = ray_frequencies
        cam_features = camera_features(spatial_stride, patch_hw, ray_frequencies) if use_camera else 0
        hidden = hidden or dim
        # Wan-style Sequential naming: action_embedding.0 / .2
        self.net = nn.Sequential(nn.Linear(cam_features + num_keys, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(
        self,
        actions: ActionInputs,
        grid: tuple[int, int, int],
        reference: torch.Tensor | None = None,
        translation_scale: float = 1.0,
    ) -> torch.Tensor:
        f, h, w = grid  # token grid (after patching)
        b = actions.keys.shape[0]
        ph, pw = self.patch_hw
        feats = []
        if self.use_camera:
            hl, wl = h * ph, w * pw  # latent grid
            poses = (
                actions.in_world(translation_scale)
                if self.world_frame
                else actions.relative(reference, translation_scale)
            )
            rays = plucker_rays(poses, actions.intrinsics, hl * self.stride, wl * self.stride)
            rays = F.pixel_unshuffle(rays.flatten(0, 1), self.stride)  # [B*F, 6 s s, hl, wl]
            rays = rays.reshape(b, f, -1, h, ph, w, pw).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, f * h * w, -1)
            feats.append(rays)
            if self.ray_frequencies:  # the token's mean ray (features are laid out coordinate-major)
                feats.append(fourier_features(rays.unflatten(-1, (6, -1)).mean(-1), self.ray_frequencies))
        feats.append(actions.keys[:, :, None, :].expand(-1, -1, h * w, -1).reshape(b, f * h * w, -1))
        return self.net(torch.cat(feats, dim=-1).to(self.net[0].weight.dtype))


class ActionModulation(nn.Module):
    """Per-block AdaLN from the action embedding: x * (1 + scale) + shift, zero-initialised."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(F.silu(c)).float().chunk(2, dim=-1)
        return (x.float() * (1 + scale) + shift).type_as(x)
