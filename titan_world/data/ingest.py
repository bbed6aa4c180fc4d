"""`titan-world data ingest`: real videos (+ optional poses, intrinsics, actions, captions) -> MDS.

Per video `<stem>.<ext>` the folder may hold `<stem>.poses.npy` [N, 4, 4] (c2w, OpenCV),
`<stem>.intrinsics.npy` [N, 4] (fx, fy, cx, cy in source pixels), `<stem>.actions.npy` [N, 8]
and `<stem>.json` (captions: {"narrative", "scene", "events"} or {"caption": "..."}) or
`<stem>.txt`. The per-frame arrays describe the frames as stored in the file (before the display
rotation). Each item is validated, resampled to the configured fps (output frame i shows the
source frame nearest in presentation time to i / fps, so variable-frame-rate files keep their
timing; per-frame arrays follow the same frame choice), turned upright (display rotation; poses
and intrinsics follow), centre-cropped to the target aspect and resized (intrinsics adjusted),
trimmed to 1 + 4k frames, and written; a bad item is reported with its reason and skipped, never
stopping the job.

Memory: a video is decoded as a stream; only the source frames the output shows are converted,
each cropped and resized at once, so a clip costs about its output size (target resolution), not
its source size. Episodes are written as they are made, one at a time.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
from PIL import Image

from titan_world.data.actions import ACTION_DIM
from titan_world.data.geometry import default_intrinsics
from titan_world.data.mds import write_episodes
from titan_world.data.parallel_write import _finish, _make_tmp
from titan_world.data.synth import Episode
from titan_world.data.writer import build_encoders
from titan_world.model.codec import encodable_frames, pixel_frames

T = TypeVar("T")

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
MIN_FRAMES = pixel_frames(2)  # 5: the shortest encodable clip


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


# ---- time: which source frame each output frame shows -------------------------------------------


def _frame_time(pts: int | None, time_base: Fraction | None, j: int, t0: Fraction | None, rate: Fraction) -> Fraction:
    """Presentation time of source frame j in seconds after the first frame (t0: its timestamp).

    Without timestamps (no pts, or none on the first frame) frame j is at j / rate. A timestamp
    within one tick of the time base of j / rate is taken to be j / rate: it is a constant-rate
    frame whose time was rounded to the container's clock (mkv/webm: 1 ms), and the snap makes such
    files pick exactly the frames the index would.
    """
    nominal = j / rate
    if pts is None or time_base is None or t0 is None:
        return nominal
    t = pts * time_base - t0
    return nominal if abs(t - nominal) <= time_base else t


def _nearest_in_time(timed: Iterable[tuple[Fraction, T]], fps: int) -> Iterator[tuple[int, T]]:
    """(source index, item) for output frames i = 0, 1, ...: the item nearest in time to i / fps.

    `timed` gives (time after the first frame, item) in presentation order. Output frames stop at
    the last source frame's time. Streams: only the previous item is held. Equal distances go to
    the even source index, as `np.round(i * src_fps / fps)` does for a constant rate.
    """
    prev: tuple[int, Fraction, T] | None = None
    i = 0
    for j, (t, item) in enumerate(timed):
        while (target := Fraction(i, fps)) <= t:
            if prev is None:
                yield j, item
            else:
                d_prev, d_cur = target - prev[1], t - target
                take_cur = d_cur < d_prev or (d_cur == d_prev and j % 2 == 0)
                yield (j, item) if take_cur else (prev[0], prev[2])
            i += 1
        prev = (j, t, item)


# ---- space: rotation, crop, resize ----------------------------------------------------------------


def _quarter_turns(degrees: int | float | None) -> int:
    """np.rot90 turns (counter-clockwise) that show a frame upright, from PyAV's `frame.rotation`.

    PyAV decodes the frames as stored and reports the display matrix's rotation (side data on each
    frame) as the angle by which the frame must be turned counter-clockwise for display; a portrait
    phone video is typically stored landscape with -90 (turn clockwise). Flips are not handled.
    """
    degrees = int(round(degrees or 0))
    if degrees % 90:
        raise BadItem(f"display rotation of {degrees} degrees (only multiples of 90 are supported)")
    return (degrees // 90) % 4


def rotate_intrinsics(k: np.ndarray, turns: int, height: int, width: int) -> np.ndarray:
    """Intrinsics [T, 4] of a `height x width` image after `np.rot90(image, turns)`.

    One counter-clockwise quarter turn moves pixel point (x, y) to (y, width - x): fx and fy swap
    and (cx, cy) -> (cy, width - cx).
    """
    k = np.array(k, dtype=np.float64)
    for _ in range(turns % 4):
        k = np.stack([k[:, 1], k[:, 0], k[:, 3], width - k[:, 2]], axis=1)
        height, width = width, height
    return k


def rotate_poses(c2w: np.ndarray, turns: int) -> np.ndarray:
    """c2w [T, 4, 4] of a camera whose image is turned by `np.rot90(image, turns)`.

    The camera's x/y axes turn with the image (per quarter turn: new x = old y, new y = -old x),
    so the rays of `plucker_rays(c2w, K)` through the same image content stay the same.
    """
    quarter = np.eye(4)
    quarter[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]  # columns: the new x and y axes in the old camera frame
    return np.asarray(c2w, dtype=np.float64) @ np.linalg.matrix_power(quarter, turns % 4)


def _crop_box(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(x0, y0, cw, ch): the centred window of an h x w image with the target aspect."""
    if w * height > h * width:  # too wide
        cw, ch = round(h * width / height), h
    else:
        cw, ch = w, round(w * height / width)
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def _crop_resize_frame(img: np.ndarray, box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    x0, y0, cw, ch = box
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(img[y0 : y0 + ch, x0 : x0 + cw])).resize((width, height), Image.BILINEAR)
    )


def _crop_resize_intrinsics(k: np.ndarray, box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """Intrinsics [T, 4] follow the crop (shift) and the resize (scale)."""
    x0, y0, cw, ch = box
    sx, sy = width / cw, height / ch
    k = k.copy()
    k[:, 0] *= sx
    k[:, 1] *= sy
    k[:, 2] = (k[:, 2] - x0) * sx
    k[:, 3] = (k[:, 3] - y0) * sy
    return k


# ---- decoding -------------------------------------------------------------------------------------


@dataclass
class _Clip:
    """A video resampled to the output fps and size, and what the per-frame arrays need."""

    frames: np.ndarray  # uint8 [T, height, width, 3], T = 1 + 4k (possibly < MIN_FRAMES)
    idx: np.ndarray  # int [T]: the source frame each output frame shows
    n_src: int  # source frames decoded (the rows the .npy files must have)
    src_fps: float  # the stream's average rate
    stored_hw: tuple[int, int]  # source frame size as stored
    turns: int  # np.rot90 turns applied to make frames upright


class _Source:
    """A video's frames in presentation order with their times; checks each frame's geometry.

    Iterating yields (time after the first frame, frame); afterwards `n` is the frame count.
    `stored_hw` and `turns` are set once the first frame is out (the crop needs them).
    """

    def __init__(self, frames: Iterable[Any], rate: Fraction, min_size: int) -> None:
        self.frames, self.rate, self.min_size = frames, rate, min_size
        self.n, self.stored_hw, self.turns = 0, (0, 0), 0

    @property
    def upright_hw(self) -> tuple[int, int]:
        h, w = self.stored_hw
        return (w, h) if self.turns % 2 else (h, w)

    def __iter__(self) -> Iterator[tuple[Fraction, Any]]:
        t0: Fraction | None = None
        prev_t = Fraction(0)
        for j, frame in enumerate(self.frames):
            hw, turns = (frame.height, frame.width), _quarter_turns(getattr(frame, "rotation", 0))
            if j == 0:
                if min(hw) < self.min_size:
                    raise BadItem(f"resolution {hw[1]}x{hw[0]} is below the {self.min_size}px minimum")
                self.stored_hw, self.turns = hw, turns
                t0 = frame.pts * frame.time_base if frame.pts is not None and frame.time_base is not None else None
            elif (hw, turns) != (self.stored_hw, self.turns):
                raise BadItem(
                    f"frame {j} is {hw[1]}x{hw[0]} turned {turns * 90} degrees, frame 0 "
                    f"{self.stored_hw[1]}x{self.stored_hw[0]} turned {self.turns * 90}; expected one size and rotation"
                )
            t = _frame_time(frame.pts, frame.time_base, j, t0, self.rate)
            if t < prev_t:
                raise BadItem(
                    f"frame {j} is shown at {float(t):.3f} s, before frame {j - 1} ({float(prev_t):.3f} s); "
                    "expected presentation times that never go back"
                )
            prev_t = t
            self.n = j + 1
            yield t, frame


def _rgb(frame: Any, j: int) -> np.ndarray:
    """Frame j as full-size rgb24 (alive only until it is cropped and resized)."""
    try:
        return frame.to_ndarray(format="rgb24")
    except Exception as e:
        raise BadItem(f"cannot convert frame {j} to rgb24: {type(e).__name__}: {e}") from None


def _read_clip(frames: Iterable[Any], rate: Fraction, height: int, width: int, fps: int, min_size: int = 16) -> _Clip:
    """Resample decoded `frames` (PyAV VideoFrames, in order) in one pass, holding only the output."""
    src = _Source(frames, rate, min_size)
    out: list[np.ndarray] = []
    idx: list[int] = []
    box = None
    for j, frame in _nearest_in_time(src, fps):
        if not idx or idx[-1] != j:  # a frame shown twice (fps above the source's) is converted once
            if box is None:
                box = _crop_box(*src.upright_hw, height, width)
            last = _crop_resize_frame(np.rot90(_rgb(frame, j), src.turns), box, height, width)
        out.append(last)
        idx.append(j)
    if src.n == 0:
        raise BadItem("no frames decoded")
    keep = encodable_frames(len(out))
    return _Clip(np.stack(out[:keep]), np.asarray(idx[:keep]), src.n, float(rate), src.stored_hw, src.turns)


def _decoded(frames: Iterator[T]) -> Iterator[T]:
    """`frames`, with a decoder's error (PyAV raises many types for broken files) as a BadItem."""
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except Exception as e:
            raise BadItem(f"cannot decode: {type(e).__name__}: {e}") from None
        yield frame


@contextmanager
def _open_video(path: Path) -> Iterator[tuple[Fraction, Iterator[Any]]]:
    """(average frame rate, decoded frames) of the first video stream of `path`."""
    try:
        container = av.open(str(path))
    except Exception as e:
        raise BadItem(f"cannot decode: {type(e).__name__}: {e}") from None
    with container:
        if not container.streams.video:
            raise BadItem("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise BadItem(f"unknown frame rate ({rate})")
        yield Fraction(rate), _decoded(iter(container.decode(stream)))


def _decode(path: Path, height: int, width: int, fps: int, min_size: int = 16) -> _Clip:
    with _open_video(path) as (rate, frames):
        return _read_clip(frames, rate, height, width, fps, min_size)


# ---- one item -------------------------------------------------------------------------------------


def _load_array(path: Path, shape_tail: tuple[int, ...]) -> np.ndarray | None:
    """`path` as float64 [N, *shape_tail], finite; None when absent. N is checked after decoding."""
    if not path.exists():
        return None
    try:
        arr = np.load(path)
    except Exception as e:
        raise BadItem(f"{path.name}: cannot read ({e})") from None
    if arr.ndim != 1 + len(shape_tail) or tuple(arr.shape[1:]) != shape_tail:
        raise BadItem(f"{path.name}: shape {arr.shape}, expected [N, {', '.join(map(str, shape_tail))}]")
    if not np.isfinite(arr).all():
        raise BadItem(f"{path.name}: contains NaN or inf")
    return arr.astype(np.float64)


def _check_rows(arr: np.ndarray | None, path: Path, n: int, what: str) -> None:
    """One row per source frame: the frame count is known only once the video is decoded."""
    if arr is not None and len(arr) != n:
        raise BadItem(f"{path.name}: {len(arr)} {what} for {n} video frames")


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


def load_item(video: Path, height: int, width: int, fps: int, min_size: int = 16, *, arrays: str = "stored") -> Episode:
    """One video and its side files as an episode; raises BadItem (cheap checks before decoding).

    `arrays` (data.ingest_arrays): the frames the pose/intrinsics files describe. "stored": as in
    the file, before its display rotation (device logs such as ARKit); "upright": as displayed
    (poses solved on frames an extractor like ffmpeg had already turned), so not turned again."""
    if arrays not in ("stored", "upright"):
        raise ValueError(f"data.ingest_arrays={arrays!r}: expected stored or upright")
    stem = video.with_suffix("")
    files = {kind: Path(f"{stem}.{kind}.npy") for kind in ("poses", "intrinsics", "actions")}
    poses = _load_array(files["poses"], (4, 4))
    if poses is not None and not np.allclose(poses[:, 3], [0, 0, 0, 1], atol=1e-5):
        raise BadItem(f"{stem.name}.poses.npy: last row of each pose must be [0, 0, 0, 1]")
    if poses is not None and (singular := np.flatnonzero(np.abs(np.linalg.det(poses[:, :3, :3])) < 1e-6)).size:
        raise BadItem(f"{stem.name}.poses.npy: pose {singular[0]} has a singular rotation block (expected a rotation)")
    intr = _load_array(files["intrinsics"], (4,))
    actions = _load_array(files["actions"], (ACTION_DIM,))
    captions = _captions(stem)
    clip = _decode(video, height, width, fps, min_size)
    n = clip.n_src
    for arr, kind in ((poses, "poses"), (intr, "intrinsics"), (actions, "actions")):
        _check_rows(arr, files[kind], n, kind)
    n_out = len(clip.idx)
    if n_out < MIN_FRAMES:
        raise BadItem(f"{n} frames at {clip.src_fps:g} fps give {n_out} frames at {fps} fps; need >= {MIN_FRAMES}")
    idx = clip.idx
    h, w = clip.stored_hw
    up_h, up_w = (w, h) if clip.turns % 2 else (h, w)
    turns = clip.turns if arrays == "stored" else 0  # how far the given arrays must turn to be upright
    if intr is not None:
        k = rotate_intrinsics(intr[idx], turns, h, w) if turns else intr[idx]
    else:
        k = np.repeat(default_intrinsics(up_h, up_w, 60.0)[None], n_out, 0)
    k = _crop_resize_intrinsics(k, _crop_box(up_h, up_w, height, width), height, width)
    c2w = rotate_poses(poses[idx], turns) if poses is not None else np.repeat(np.eye(4)[None], n_out, 0)
    return Episode(
        episode_id=f"ingest-{stem.name}",
        frames=clip.frames,
        actions=(actions[idx] if actions is not None else np.zeros((n_out, ACTION_DIM))).astype(np.float32),
        c2w=c2w.astype(np.float32),
        intrinsics=k.astype(np.float32),
        captions=captions,
        fps=fps,
        source=f"ingest:{video.name}",
        meta={
            "src_fps": clip.src_fps,
            "src_size": [int(up_h), int(up_w)],
            "src_frames": int(n),
            "src_rotation": 90 * clip.turns,
            "poses_known": poses is not None,
            "intrinsics_known": intr is not None,
            "actions_known": actions is not None,
        },
    )


# ---- a folder -------------------------------------------------------------------------------------


def list_videos(folder: str | Path) -> list[Path]:
    """Video files directly inside `folder`, sorted by name (item i of a parallel ingest; what eval scores)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder {folder} does not exist (or is not a folder)")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTS)


def ingest_videos(cfg, videos: list[Path], out: str | Path, *, keep_raw: bool = False) -> list[ItemReport]:
    """Validate and encode `videos` into an MDS dataset at `out` (not created if none is good).

    Each episode is written as soon as it is decoded (one episode in memory: batch size 1, since
    real clips are long). A bad video is skipped, so it never stops the writing; any other error
    leaves a partial dataset in `out`, so `out` must be a temporary folder that is renamed only
    when this returns: the CLI passes `write_parallel`'s `OUT.tmp-*` (or its `rank-RRR`), `ingest`
    makes its own.
    """
    reports: list[ItemReport] = []

    def good() -> Iterator[Episode]:
        for v in videos:
            try:
                ep = load_item(v, cfg.data.height, cfg.data.width, cfg.data.fps, arrays=cfg.data.ingest_arrays)
            except BadItem as e:
                reports.append(ItemReport(v.name, "skipped", reason=str(e)))
                continue
            reports.append(
                ItemReport(
                    v.name, "ok", ep.num_frames, ep.meta["src_fps"], "x".join(map(str, ep.meta["src_size"][::-1]))
                )
            )
            yield ep

    codec, text, meta = build_encoders(cfg)
    episodes = good()
    first = next(episodes, None)  # write_episodes creates `out`: only once a video is good
    if first is not None:
        write_episodes(
            itertools.chain([first], episodes),
            out,
            codec,
            text,
            {**meta, "source": "ingest"},
            keep_raw=keep_raw,
            batch_size=1,
        )
    return reports


def ingest(cfg, src: str | Path, out: str | Path, *, keep_raw: bool = False, progress: bool = True) -> list[ItemReport]:
    """One process (the CLI goes through `parallel_write` instead), as atomic as the CLI.

    Written into `OUT.tmp-*` beside `out` and renamed at the end, so an error leaves no half
    dataset at `out`; `out` must not exist or be empty, and is not created when no video is good.
    """
    videos = list_videos(src)
    out = Path(out).absolute()
    tmp = Path(_make_tmp(out))
    try:
        reports = ingest_videos(cfg, videos, tmp, keep_raw=keep_raw)
        _finish(tmp, out, 1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return reports


def format_summary(reports: list[ItemReport]) -> str:
    rows = [("video", "status", "frames", "src fps", "src size", "reason")]
    rows += [
        (r.name, r.status, str(r.frames or ""), f"{r.src_fps:g}" if r.src_fps else "", r.src_size, r.reason)
        for r in reports
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else "") for r in rows]
    ok = sum(r.status == "ok" for r in reports)
    lines.append(f"{ok} written, {len(reports) - ok} skipped")
    return "\n".join(lines)
