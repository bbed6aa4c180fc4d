"""Vectorised numpy raycaster for `World`: exact pinhole images from any c2w pose.

Every pixel's ray is cast (no per-column shortcut) so pitch is a true rotation and the image
agrees with the stored pose and intrinsics exactly. The world is 2.5-D: a 2-D DDA over the grid
in the x-z plane finds the first wall block; a ray whose floor hit comes first shows the floor,
and one that passes above the wall top shows the sky (the eye stays below the wall top). Rays are
processed for many frames at once and compacted as they finish, so the cost is a few dozen numpy
calls per batch of frames, not per pixel.
"""

from __future__ import annotations

import numpy as np

from titan_world.data.world import SKY_H, SKY_W, TEX, WALL_HEIGHT, World, floor_texture, sky_texture, wall_atlas

FOG_COLOUR = {
    "clear blue sky": (0.70, 0.85, 1.00),
    "orange sunset sky": (1.00, 0.60, 0.30),
    "grey overcast sky": (0.75, 0.76, 0.78),
    "starry night sky": (0.05, 0.06, 0.15),
}
FOG_DISTANCE = 9.0  # metres: colours fade to the horizon colour with exp(-t / FOG_DISTANCE)


class Renderer:
    def __init__(self, world: World, height: int, width: int, intrinsics: np.ndarray):
        self.world, self.h, self.w = world, height, width
        fx, fy, cx, cy = (float(v) for v in intrinsics)
        v, u = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
        self.dirs_cam = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1).reshape(-1, 3)
        self.atlas = wall_atlas()
        self.floor = floor_texture(world.floor)
        self.sky = sky_texture(world.sky)
        self.fog = np.array(FOG_COLOUR[world.sky], np.float32)
        self.cells = world.cells
        self.max_steps = int(sum(world.cells.shape)) + 2

    def render(self, c2w: np.ndarray, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """c2w [T, 4, 4] -> frames uint8 [T, H, W, 3], cell-type ids int16 [T, H, W] (0 floor, -1 sky)."""
        frames, ids = [], []
        for i in range(0, len(c2w), chunk):
            f, k = self._render_batch(np.asarray(c2w[i : i + chunk], np.float64))
            frames.append(f)
            ids.append(k)
        return np.concatenate(frames), np.concatenate(ids)

    def _cast(self, o: np.ndarray, d: np.ndarray, t_limit: np.ndarray):
        """2-D DDA for rays (o, d) [N, 3]: first wall hit before `t_limit` -> (t, type, x_side)."""
        n = len(d)
        grid = self.cells
        gh, gw = grid.shape
        t_hit = np.full(n, np.inf)
        kind = np.zeros(n, np.int16)
        xside = np.zeros(n, bool)
        idx = np.arange(n)
        px, pz, dx, dz = o[:, 0], o[:, 2], d[:, 0], d[:, 2]
        ix, iz = np.floor(px).astype(np.int64), np.floor(pz).astype(np.int64)
        with np.errstate(divide="ignore"):
            tdx, tdz = np.abs(1.0 / dx), np.abs(1.0 / dz)
        sx, sz = np.where(dx > 0, 1, -1), np.where(dz > 0, 1, -1)
        with np.errstate(invalid="ignore"):
            side_x = np.where(dx > 0, ix + 1 - px, px - ix) * tdx
            side_z = np.where(dz > 0, iz + 1 - pz, pz - iz) * tdz
        side_x[~np.isfinite(side_x)] = np.inf
        side_z[~np.isfinite(side_z)] = np.inf
        lim = t_limit
        for _ in range(self.max_steps):
            if not len(idx):
                break
            step_x = side_x < side_z
            t = np.where(step_x, side_x, side_z)
            ix = ix + np.where(step_x, sx, 0)
            iz = iz + np.where(step_x, 0, sz)
            side_x = np.where(step_x, side_x + tdx, side_x)
            side_z = np.where(step_x, side_z, side_z + tdz)
            cell = grid[np.clip(iz, 0, gh - 1), np.clip(ix, 0, gw - 1)]
            hit = (cell > 0) & (t <= lim)
            h = idx[hit]
            t_hit[h], kind[h], xside[h] = t[hit], cell[hit], step_x[hit]
            keep = ~hit & (t <= lim)
            idx, ix, iz, side_x, side_z, tdx, tdz, sx, sz, lim = (
                a[keep] for a in (idx, ix, iz, side_x, side_z, tdx, tdz, sx, sz, lim)
            )
        return t_hit, kind, xside

    def _render_batch(self, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = len(c2w)
        npx = self.h * self.w
        d = np.einsum("bij,nj->bni", c2w[:, :3, :3], self.dirs_cam).reshape(-1, 3)
        o = np.repeat(c2w[:, :3, 3], npx, axis=0)
        dy = d[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            t_floor = np.where(dy > 1e-9, -o[:, 1] / dy, np.inf)  # floor: y = 0 (y points down)
            t_top = np.where(dy < -1e-9, (-WALL_HEIGHT - o[:, 1]) / dy, np.inf)
        t_wall, kind, xside = self._cast(o, d, np.minimum(t_floor, t_top))
        is_wall = np.isfinite(t_wall)
        is_floor = ~is_wall & np.isfinite(t_floor)
        is_sky = ~is_wall & ~is_floor
        rgb = np.empty((len(d), 3), np.float32)
        t_fog = np.zeros(len(d))
        # walls
        w = np.flatnonzero(is_wall)
        p = o[w] + t_wall[w, None] * d[w]
        along = np.where(xside[w], p[:, 2], p[:, 0])
        col = np.clip(((along - np.floor(along)) * TEX).astype(np.int64), 0, TEX - 1)
        row = np.clip(((p[:, 1] + WALL_HEIGHT) / WALL_HEIGHT * TEX).astype(np.int64), 0, TEX - 1)
        rgb[w] = self.atlas[kind[w], row, col] * np.where(xside[w], 1.0, 0.78)[:, None].astype(np.float32)
        t_fog[w] = t_wall[w]
        # floor
        f = np.flatnonzero(is_floor)
        pf = o[f] + t_floor[f, None] * d[f]
        fr = ((pf[:, 2] - np.floor(pf[:, 2])) * TEX).astype(np.int64).clip(0, TEX - 1)
        fc = ((pf[:, 0] - np.floor(pf[:, 0])) * TEX).astype(np.int64).clip(0, TEX - 1)
        rgb[f] = self.floor[fr, fc]
        t_fog[f] = t_floor[f]
        # sky (direction only)
        s = np.flatnonzero(is_sky)
        ds = d[s]
        el = np.arctan2(-ds[:, 1], np.hypot(ds[:, 0], ds[:, 2]))
        az = np.arctan2(ds[:, 0], ds[:, 2])
        sr = ((0.5 - el / np.pi) * SKY_H).astype(np.int64).clip(0, SKY_H - 1)
        sc = ((az / (2 * np.pi) + 0.5) * SKY_W).astype(np.int64) % SKY_W
        rgb[s] = self.sky[sr, sc]
        # fog on walls and floor
        fog = np.exp(-t_fog / FOG_DISTANCE).astype(np.float32)[:, None]
        hit = ~is_sky
        rgb[hit] = rgb[hit] * fog[hit] + self.fog * (1 - fog[hit])
        ids = np.where(is_wall, kind, np.where(is_floor, 0, -1)).astype(np.int16)
        frames = (rgb * 255.0 + 0.5).clip(0, 255).astype(np.uint8).reshape(b, self.h, self.w, 3)
        return frames, ids.reshape(b, self.h, self.w)
