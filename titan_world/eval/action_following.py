"""Action following on the synthetic world, where the simulator gives the ground truth.

Frame error: the generated rollout against the simulator's frames for the same actions, next
to two baselines any model must beat: copy-last-frame (repeat the last context frame) and
shuffled actions (the caller generates with shuffled actions and passes those frames).

Camera error: camera motion is estimated from the frames themselves, so it needs no access to
the model: per adjacent frame pair, phase correlation on a grid of tiles gives local shifts
(u_i, v_i) at tile centres (x_i, y_i) (relative to the principal point); a least-squares fit of
    u = tx + k x,   v = ty + k y
gives a global pan (tx, ty) and a zoom rate k. Yaw = atan(-tx / fx) (content moves left when
the camera turns right, OpenCV axes); k > 0 means the view expands (moving forward), and is
compared with the ground-truth forward translation by correlation and sign agreement (its
scale depends on scene depth). The estimator's own error on the simulator frames is reported
as a floor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

PSNR_CAP_DB = 100.0


def as_float_frames(frames: Any, name: str = "frames") -> np.ndarray:
    """uint8 (0..255) or float (0..1) video, [T, H, W, 3] or [T, 3, H, W] (numpy or torch)
    -> float64 [T, H, W, 3] in 0..1."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().numpy()
    x = np.asarray(frames)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a video [T, H, W, 3] or [T, 3, H, W], got shape {x.shape}")
    if x.shape[-1] != 3 and x.shape[1] == 3:
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] != 3:
        raise ValueError(f"{name}: expected 3 colour channels, got shape {x.shape}")
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def frame_errors(pred: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    """MSE / MAE / PSNR (on 0..1 frames) overall and per frame."""
    err = pred - target
    mse_t = (err**2).mean(axis=(1, 2, 3))
    mae_t = np.abs(err).mean(axis=(1, 2, 3))
    mse = float(mse_t.mean())
    return {
        "mse": mse,
        "mae": float(mae_t.mean()),
        "psnr": _psnr(mse),  # PSNR of the mean MSE (robust to single perfect frames)
        "psnr_per_frame": [_psnr(float(m)) for m in mse_t],
        "mse_per_frame": mse_t.tolist(),
    }


def _psnr(mse: float) -> float:
    return PSNR_CAP_DB if mse <= 10 ** (-PSNR_CAP_DB / 10) else float(-10 * math.log10(mse))


# ------------------------------------------------------------------------ camera estimation


def _gray(frames: np.ndarray) -> np.ndarray:
    return frames @ np.array([0.299, 0.587, 0.114])


def phase_shift(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Translation (dx, dy) such that b(x) ~ a(x - d), by phase correlation with sub-pixel
    parabolic refinement; a Hann window suppresses the tile borders."""
    h, w = a.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    fa, fb = np.fft.fft2((a - a.mean()) * win), np.fft.fft2((b - b.mean()) * win)
    cross = fb * np.conj(fa)
    corr = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)

    def refine(c_m: float, c_0: float, c_p: float) -> float:
        den = c_m - 2 * c_0 + c_p
        return 0.0 if abs(den) < 1e-12 else 0.5 * (c_m - c_p) / den

    dy = iy + refine(corr[(iy - 1) % h, ix], corr[iy, ix], corr[(iy + 1) % h, ix])
    dx = ix + refine(corr[iy, (ix - 1) % w], corr[iy, ix], corr[iy, (ix + 1) % w])
    dy = dy - h if dy > h / 2 else dy
    dx = dx - w if dx > w / 2 else dx
    return float(dx), float(dy)


def estimate_camera_motion(
    frames: Any, fx: float | None = None, grid: int = 3, fov_deg: float = 90.0
) -> dict[str, list[float]]:
    """Per adjacent pair: yaw (degrees, + = turn right), pitch-like pan ty (px) and zoom rate k.

    fx defaults to the focal length of a pinhole with horizontal field of view `fov_deg`.
    """
    g = _gray(as_float_frames(frames, "frames"))
    t, h, w = g.shape
    fx = fx or (w / 2) / math.tan(math.radians(fov_deg) / 2)
    th, tw = h // grid, w // grid
    if th < 8 or tw < 8:
        grid, th, tw = 1, h, w
    yaw, ty_l, zoom = [], [], []
    for i in range(t - 1):
        rows = []
        for gy in range(grid):
            for gx in range(grid):
                sl = (slice(gy * th, (gy + 1) * th), slice(gx * tw, (gx + 1) * tw))
                u, v = phase_shift(g[i][sl], g[i + 1][sl])
                xc, yc = gx * tw + tw / 2 - w / 2, gy * th + th / 2 - h / 2
                rows.append((u, v, xc, yc))
        r = np.array(rows)
        if grid > 1:  # least squares for [tx, ty, k]
            a = np.zeros((2 * len(r), 3))
            a[0::2, 0], a[0::2, 2] = 1, r[:, 2]
            a[1::2, 1], a[1::2, 2] = 1, r[:, 3]
            rhs = np.empty(2 * len(r))
            rhs[0::2], rhs[1::2] = r[:, 0], r[:, 1]
            tx, ty, k = np.linalg.lstsq(a, rhs, rcond=None)[0]
        else:
            (tx, ty), k = r[0, :2], 0.0
        yaw.append(math.degrees(math.atan(-tx / fx)))
        ty_l.append(float(ty))
        zoom.append(float(k))
    return {"yaw_deg": yaw, "pan_y_px": ty_l, "zoom_rate": zoom, "fx": [fx]}


def pose_motion(c2w: Any) -> dict[str, list[float]]:
    """Ground-truth per-pair yaw (degrees, + = turn right) and forward translation (camera z)
    from camera-to-world poses [T, 4, 4] (OpenCV axes)."""
    p = np.asarray(c2w.detach().cpu().numpy() if hasattr(c2w, "detach") else c2w, dtype=np.float64)
    if p.ndim != 3 or p.shape[1:] != (4, 4):
        raise ValueError(f"poses: expected camera-to-world [T, 4, 4], got {p.shape}")
    yaw, fwd = [], []
    for i in range(len(p) - 1):
        rel = np.linalg.inv(p[i]) @ p[i + 1]
        yaw.append(math.degrees(math.atan2(rel[0, 2], rel[2, 2])))
        fwd.append(float(rel[2, 3]))
    return {"yaw_deg": yaw, "forward": fwd}


def camera_errors(est: dict[str, list[float]], gt: dict[str, list[float]], start: int) -> dict[str, Any]:
    """Yaw error per pair and cumulative (drift), forward agreement; pairs from `start` on."""
    ye, yg = np.array(est["yaw_deg"][start:]), np.array(gt["yaw_deg"][start:])
    ke, kg = np.array(est["zoom_rate"][start:]), np.array(gt["forward"][start:])
    out: dict[str, Any] = {
        "yaw_mae_deg": float(np.abs(ye - yg).mean()) if len(ye) else None,
        "yaw_drift_deg": float(abs(ye.sum() - yg.sum())) if len(ye) else None,
        "yaw_cum_err_per_pair_deg": np.abs(np.cumsum(ye) - np.cumsum(yg)).tolist(),
    }
    moving = np.abs(kg) > 1e-9
    out["forward_sign_agreement"] = float((np.sign(ke[moving]) == np.sign(kg[moving])).mean()) if moving.any() else None
    out["forward_corr"] = (
        float(np.corrcoef(ke, kg)[0, 1]) if len(ke) > 2 and ke.std() > 1e-12 and kg.std() > 1e-12 else None
    )
    return out


# --------------------------------------------------------------------------------- report


def action_following_report(
    generated: Any,
    simulator: Any,
    shuffled: Any | None = None,
    context_frames: int = 1,
    poses: Any | None = None,
    intrinsics: Any | None = None,
    fov_deg: float = 90.0,
) -> dict[str, Any]:
    """Everything the trainer/demo logs about action following (JSON-ready).

    generated / simulator / shuffled: videos of the same length and size, uint8 0..255 or
    float 0..1, [T, H, W, 3] or [T, 3, H, W]. The first `context_frames` frames were given to
    the model and are not scored. poses: ground-truth camera-to-world [T, 4, 4] (OpenCV);
    intrinsics: [fx, fy, cx, cy] (or [T, 4]) in pixels, else a `fov_deg` pinhole.
    """
    gen, sim = as_float_frames(generated, "generated"), as_float_frames(simulator, "simulator")
    if gen.shape != sim.shape:
        raise ValueError(f"generated {gen.shape} and simulator {sim.shape} videos differ in shape")
    t = len(sim)
    if not 1 <= context_frames < t:
        raise ValueError(f"context_frames={context_frames}: expected 1 <= context_frames < {t}")
    c = context_frames
    videos = {"model": gen, "copy_last": np.repeat(sim[c - 1 : c], t, axis=0)}
    if shuffled is not None:
        shf = as_float_frames(shuffled, "shuffled")
        if shf.shape != sim.shape:
            raise ValueError(f"shuffled {shf.shape} and simulator {sim.shape} videos differ in shape")
        videos["shuffled"] = shf
    fe = {k: frame_errors(v[c:], sim[c:]) for k, v in videos.items()}
    report: dict[str, Any] = {
        "kind": "titan-world-eval/action-following",
        "version": 1,
        "settings": {
            "context_frames": c,
            "num_frames": t,
            "scored_frames": t - c,
            "height": sim.shape[1],
            "width": sim.shape[2],
            "fov_deg": fov_deg,
            "frame_range": "0..1",
            "psnr_cap_db": PSNR_CAP_DB,
        },
        "frame_error": fe,
        "beats": {f"psnr_vs_{k}": fe["model"]["psnr"] - fe[k]["psnr"] for k in fe if k != "model"},
    }
    fx = None
    if intrinsics is not None:
        k = np.asarray(intrinsics, dtype=np.float64).reshape(-1, 4)
        fx = float(k[0, 0])
    est = {k: estimate_camera_motion(v, fx, fov_deg=fov_deg) for k, v in {**videos, "simulator": sim}.items()}
    # pair i links frames i and i+1: score pairs that end after the context
    start = c - 1
    if poses is not None:
        gt = pose_motion(poses)
        if len(gt["yaw_deg"]) != t - 1:
            raise ValueError(f"poses: {len(gt['yaw_deg']) + 1} poses for {t} frames")
        report["camera"] = {
            "reference": "ground-truth poses",
            "gt": gt,
            **{k: camera_errors(e, gt, start) for k, e in est.items()},
        }
    else:  # compare with the motion estimated from the simulator frames instead
        ref = {"yaw_deg": est["simulator"]["yaw_deg"], "forward": est["simulator"]["zoom_rate"]}
        report["camera"] = {
            "reference": "motion estimated from simulator frames",
            **{k: camera_errors(e, ref, start) for k, e in est.items() if k != "simulator"},
        }
    report["camera"]["estimates"] = est
    return report


# ------------------------------------------------------------------ long streams: drift, revisits


def detail_energy(frames: Any) -> np.ndarray:
    """High-frequency energy per frame: mean squared 4-neighbour Laplacian of the grey image.
    A rollout that blurs (or dissolves into noise) has less (or more) of it than the simulator."""
    g = _gray(as_float_frames(frames))
    lap = 4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    return (lap**2).mean(axis=(1, 2))


def colour_histogram(frames: np.ndarray, bins: int = 8) -> np.ndarray:
    """Joint RGB histogram (bins^3, sums to 1) of float frames in 0..1."""
    q = np.clip((frames * bins).astype(np.int64), 0, bins - 1)
    idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    h = np.bincount(idx.ravel(), minlength=bins**3).astype(np.float64)
    return h / max(h.sum(), 1.0)


def drift_windows(
    generated: Any, simulator: Any, fps: float, window_seconds: float = 10.0, context_frames: int = 1
) -> dict[str, Any]:
    """Per window of `window_seconds` over a long rollout: detail (the model's high-frequency
    energy / the simulator's over the same frames) and colour-histogram distance (total variation,
    0 = same colours, 1 = disjoint), and the ratio last window / first window of each. A stream
    that keeps the data's statistics has ratios near 1 (issue 22 asks for within 1.5x)."""
    gen, sim = as_float_frames(generated, "generated"), as_float_frames(simulator, "simulator")
    if gen.shape != sim.shape:
        raise ValueError(f"generated {gen.shape} and simulator {sim.shape} videos differ in shape")
    size = max(1, int(round(window_seconds * fps)))
    e_gen, e_sim = detail_energy(gen), detail_energy(sim)
    windows = []
    for start in range(context_frames, len(sim), size):
        sl = slice(start, min(start + size, len(sim)))
        if sl.stop - sl.start < size // 2 and windows:  # a short tail would be a noisy last window
            break
        tv = 0.5 * float(np.abs(colour_histogram(gen[sl]) - colour_histogram(sim[sl])).sum())
        windows.append(
            {
                "start_s": start / fps,
                "end_s": sl.stop / fps,
                "frames": sl.stop - sl.start,
                "detail_ratio": float(e_gen[sl].mean() / max(e_sim[sl].mean(), 1e-12)),
                "colour_hist_distance": tv,
                "psnr": _psnr(float(((gen[sl] - sim[sl]) ** 2).mean())),
            }
        )

    def ratio(key: str) -> float | None:
        if len(windows) < 2:
            return None
        first, last = windows[0][key], windows[-1][key]
        return float(last / first) if first > 1e-12 else None

    return {
        "window_seconds": window_seconds,
        "windows": windows,
        "last_over_first": {k: ratio(k) for k in ("detail_ratio", "colour_hist_distance")},
    }


def find_revisits(
    c2w: Any, fps: float, radius: float = 0.5, max_yaw_deg: float = 30.0, min_gap_seconds: float = 3.0
) -> dict[str, Any]:
    """Frames where the agent is back at a place it saw earlier: an earlier frame at least
    `min_gap_seconds` before within `radius` metres (floor plane) looking within `max_yaw_deg`.

    Uses ground-truth camera-to-world poses [T, 4, 4] (world: x east, y down, z north). Returns
    `revisit` (frame indices), `earlier` (the earliest matching frame of each) and `first_visit`
    (every other frame: no match that far back)."""
    p = np.asarray(c2w.detach().cpu().numpy() if hasattr(c2w, "detach") else c2w, dtype=np.float64)
    if p.ndim != 3 or p.shape[1:] != (4, 4):
        raise ValueError(f"poses: expected camera-to-world [T, 4, 4], got {p.shape}")
    xz = p[:, [0, 2], 3]
    yaw = np.arctan2(p[:, 0, 2], p[:, 2, 2])
    dist = np.linalg.norm(xz[:, None] - xz[None], axis=-1)
    dyaw = np.abs((yaw[:, None] - yaw[None] + np.pi) % (2 * np.pi) - np.pi)
    gap = max(1, int(round(min_gap_seconds * fps)))
    t = np.arange(len(p))
    match = (dist <= radius) & (dyaw <= math.radians(max_yaw_deg)) & (t[None] <= t[:, None] - gap)
    revisit = np.flatnonzero(match.any(axis=1))
    return {
        "radius_m": radius,
        "max_yaw_deg": max_yaw_deg,
        "min_gap_seconds": min_gap_seconds,
        "revisit": revisit.tolist(),
        "earlier": [int(np.argmax(match[i])) for i in revisit],
        "first_visit": np.flatnonzero(~match.any(axis=1)).tolist(),
    }


def revisit_errors(
    videos: dict[str, Any], simulator: Any, revisits: dict[str, Any], context_frames: int = 1
) -> dict[str, Any]:
    """Frame error (MSE, PSNR of the mean MSE) at revisits vs at first visits, per rollout in
    `videos` (e.g. model, copy_last); context frames are not scored."""
    sim = as_float_frames(simulator, "simulator")
    sets = {k: [i for i in revisits[k] if i >= context_frames] for k in ("revisit", "first_visit")}
    out: dict[str, Any] = {"frames": {k: len(v) for k, v in sets.items()}}
    for name, v in videos.items():
        gen = as_float_frames(v, name)
        mse_t = ((gen - sim) ** 2).mean(axis=(1, 2, 3))
        row = {}
        for k, idx in sets.items():
            mse = float(mse_t[idx].mean()) if idx else None
            row[k] = {"mse": mse, "psnr": None if mse is None else _psnr(mse)}
        out[name] = row
    return out
