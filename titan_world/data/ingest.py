"""`titan-world data ingest`: real videos (+ optional poses, intrinsics, actions, captions) -> MDS.

Per video `<stem>.<ext>` the folder may hold `<stem>.poses.npy` [N, 4, 4] (c2w, OpenCV),
`<stem>.intrinsics.npy` [N, 4] (fx, fy, cx, cy in source pixels), `<stem>.actions.npy` [N, 8]
and `<stem>.json` (captions: {"narrative", "scene", "events"} or {"caption": "..."}) or
`<stem>.txt`. Each item is validated, resampled to the configured fps (nearest source frame;
per-frame arrays follow the same frame choice), centre-cropped to the target aspect and resized
(intrinsics adjusted), trimmed to 1 + 4k frames, and written; a bad item is reported with its
reason and skipped, never stopping the job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from titan_world.data.actions import ACTION_DIM
from titan_world.data.geometry import default_intrinsics
from titan_world.data.synth import Episode

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
MIN_FRAMES = 5  # 1 + 4: the shortest encodable clip


class BadItem(ValueError):
    """An input that is skipped, with the reason shown in the summary."""


@dataclass
class ItemReport:
    name: str
    status: str  # ok | skipped
    frames: int = 0
    src_fps: float = 0.0
    src_size: str = ""
    reason: str = ""


def _decode(path: Path) -> tuple[np.ndarray, float]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadItem("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except BadItem:
        raise
    except Exception as e:  # PyAV raises many types for broken files
        raise BadItem(f"cannot decode: {type(e).__name__}: {e}") from None
    if not frames:
        raise BadItem("no frames decoded")
    fps = float(rate) if rate else 0.0
    if not np.isfinite(fps) or fps <= 0:
        raise BadItem(f"unknown frame rate ({rate})")
    return np.stack(frames), fps


def _load_array(path: Path, shape_tail: tuple[int, ...], n: int, what: str) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        arr = np.load(path)
    except Exception as e:
        raise BadItem(f"{path.name}: cannot read ({e})") from None
    if arr.ndim != 1 + len(shape_tail) or tuple(arr.shape[1:]) != shape_tail:
        raise BadItem(f"{path.name}: shape {arr.shape}, expected [N, {', '.join(map(str, shape_tail))}]")
    if len(arr) != n:
        raise BadItem(f"{path.name}: {len(arr)} {what} for {n} video frames")
    if not np.isfinite(arr).all():
        raise BadItem(f"{path.name}: contains NaN or inf")
    return arr.astype(np.float64)


def _captions(stem: Path) -> dict:
    j, t = stem.with_suffix(".json"), stem.with_suffix(".txt")
    if j.exists():
        try:
            obj = json.loads(j.read_text())
        except json.JSONDecodeError as e:
            raise BadItem(f"{j.name}: invalid JSON ({e})") from None
        text = obj.get("narrative") or obj.get("caption")
        if not isinstance(text, str):
            raise BadItem(f"{j.name}: expected a 'narrative' or 'caption' string")
        return {"narrative": text, "scene": obj.get("scene", text), "events": obj.get("events", [])}
    if t.exists():
        text = t.read_text().strip()
        return {"narrative": text, "scene": text, "events": []}
    return {"narrative": "", "scene": "", "events": []}


def _crop_resize(frames: np.ndarray, k: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop to the target aspect, resize; intrinsics [T, 4] follow (shift, then scale)."""
    _, h, w, _ = frames.shape
    if w * height > h * width:  # too wide
        cw, ch = round(h * width / height), h
    else:
        cw, ch = w, round(w * height / width)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    out = np.stack([np.asarray(Image.fromarray(f[y0 : y0 + ch, x0 : x0 + cw]).resize((width, height), Image.BILINEAR)) for f in frames])
    sx, sy = width / cw, height / ch
    k = k.copy()
    k[:, 0] *= sx
    k[:, 1] *= sy
    k[:, 2] = (k[:, 2] - x0) * sx
    k[:, 3] = (k[:, 3] - y0) * sy
    return out, k


def load_item(video: Path, height: int, width: int, fps: int, min_size: int = 16) -> Episode:
    frames, src_fps = _decode(video)
    n, h, w, _ = frames.shape
    if h < min_size or w < min_size:
        raise BadItem(f"resolution {w}x{h} is below the {min_size}px minimum")
    stem = video.with_suffix("")
    poses = _load_array(Path(f"{stem}.poses.npy"), (4, 4), n, "poses")
    if poses is not None and not np.allclose(poses[:, 3], [0, 0, 0, 1], atol=1e-5):
        raise BadItem(f"{stem.name}.poses.npy: last row of each pose must be [0, 0, 0, 1]")
    if poses is not None and (singular := np.flatnonzero(np.abs(np.linalg.det(poses[:, :3, :3])) < 1e-6)).size:
        raise BadItem(f"{stem.name}.poses.npy: pose {singular[0]} has a singular rotation block (expected a rotation)")
    intr = _load_array(Path(f"{stem}.intrinsics.npy"), (4,), n, "intrinsics")
    actions = _load_array(Path(f"{stem}.actions.npy"), (ACTION_DIM,), n, "actions")
    captions = _captions(stem)
    # resample in time: output frame i shows the source frame nearest to i / fps
    n_out = int(np.floor((n - 1) * fps / src_fps)) + 1
    n_out = 1 + 4 * ((n_out - 1) // 4)
    if n_out < MIN_FRAMES:
        raise BadItem(f"{n} frames at {src_fps:g} fps give {n_out} frames at {fps} fps; need >= {MIN_FRAMES}")
    idx = np.minimum(np.round(np.arange(n_out) * src_fps / fps).astype(int), n - 1)
    src_k = intr[idx] if intr is not None else np.repeat(default_intrinsics(h, w, 60.0)[None], n_out, 0)
    out_frames, k = _crop_resize(frames[idx], src_k, height, width)
    return Episode(
        episode_id=f"ingest-{stem.name}",
        frames=out_frames,
        actions=(actions[idx] if actions is not None else np.zeros((n_out, ACTION_DIM))).astype(np.float32),
        c2w=(poses[idx] if poses is not None else np.repeat(np.eye(4)[None], n_out, 0)).astype(np.float32),
        intrinsics=k.astype(np.float32),
        captions=captions,
        fps=fps,
        source=f"ingest:{video.name}",
        meta={"src_fps": src_fps, "src_size": [int(h), int(w)], "src_frames": int(n), "poses_known": poses is not None,
              "intrinsics_known": intr is not None, "actions_known": actions is not None},
    )


def list_videos(src: str | Path) -> list[Path]:
    """The videos `ingest` reads from `src`, sorted by name (item i of a parallel ingest)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src}: not a directory")
    return sorted(p for p in src.iterdir() if p.suffix.lower() in VIDEO_EXTS)


def ingest_videos(cfg, videos: list[Path], out: str | Path, *, keep_raw: bool = False) -> list[ItemReport]:
    """Validate and encode `videos` into an MDS dataset at `out` (not created if none is good)."""
    from titan_world.data.mds import write_episodes
    from titan_world.data.writer import build_encoders

    reports: list[ItemReport] = []

    def good():
        for v in videos:
            try:
                ep = load_item(v, cfg.data.height, cfg.data.width, cfg.data.fps)
            except BadItem as e:
                reports.append(ItemReport(v.name, "skipped", reason=str(e)))
                continue
            reports.append(ItemReport(v.name, "ok", ep.num_frames, ep.meta["src_fps"], "x".join(map(str, ep.meta["src_size"][::-1]))))
            yield ep

    codec, text, meta = build_encoders(cfg)
    episodes = list(good())  # decoded first so a bad file never leaves a half-written dataset
    if episodes:
        write_episodes(episodes, out, codec, text, {**meta, "source": "ingest"}, keep_raw=keep_raw)
    return reports


def ingest(cfg, src: str | Path, out: str | Path, *, keep_raw: bool = False, progress: bool = True) -> list[ItemReport]:
    """One process, straight into `out` (the CLI goes through `parallel_write` instead)."""
    return ingest_videos(cfg, list_videos(src), out, keep_raw=keep_raw)


def format_summary(reports: list[ItemReport]) -> str:
    rows = [("video", "status", "frames", "src fps", "src size", "reason")]
    rows += [(r.name, r.status, str(r.frames or ""), f"{r.src_fps:g}" if r.src_fps else "", r.src_size, r.reason) for r in reports]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else "") for r in rows]
    ok = sum(r.status == "ok" for r in reports)
    lines.append(f"{ok} written, {len(reports) - ok} skipped")
    return "\n".join(lines)
