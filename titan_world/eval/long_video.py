"""VBench-Long's custom-input split (`vbench2_beta_long`, mode long_custom_input), reproduced.

What the official code does to a long video before scoring it with the ordinary dimensions:
read every frame with decord (the file's colour tag), clip length = int(avg fps) * 2 frames for
every dimension, consecutive clips, a last partial clip extended *backwards* to full length, a
video shorter than one clip kept whole; each clip re-encoded with torchvision's `write_video`
(PyAV libx264, yuv420p, x264 defaults, `int(fps)` frames per second); each clip scored as a video;
a long video's score is the mean over its clips. PySceneDetect's semantic split
(`use_semantic_splitting`, off by default) and the static filter are not done.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from titan_world.eval.video_io import read_video

CLIP_SECONDS = 2  # long_custom_input uses 2 s clips for every dimension


def clip_ranges(num_frames: int, clip_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of VBench-Long's `split_video_into_clips`."""
    if clip_frames <= 0 or num_frames < clip_frames:
        return [(0, num_frames)]
    full, rest = divmod(num_frames, clip_frames)
    out = [(i * clip_frames, (i + 1) * clip_frames) for i in range(full)]
    if rest:
        out.append((max(0, full * clip_frames - (clip_frames - rest)), num_frames))
    return out


def write_clip(path: Path, frames: np.ndarray, fps: int) -> Path:
    """Encode as torchvision.io.write_video does by default: libx264, yuv420p, no options."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for img in frames:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pict_type = av.video.frame.PictureType.NONE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def split_long_video(
    path: str | Path, out_dir: str | Path, seconds: int = CLIP_SECONDS
) -> tuple[list[Path], np.ndarray, float]:
    """Write VBench-Long's clips of `path` into `out_dir` (`<stem>_000.mp4`, ...).

    Returns (clip paths, the decoded long video, its fps)."""
    frames, fps = read_video(path, "tagged")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(
            f"{path}: VBench-Long re-encodes clips as yuv420p, which needs even H and W "
            f"(got {frames.shape[1]}x{frames.shape[2]})"
        )
    fps_int = int(fps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(path).stem
    clips = [
        write_clip(out / f"{stem}_{i:03d}.mp4", frames[s:e], fps_int)
        for i, (s, e) in enumerate(clip_ranges(len(frames), fps_int * int(seconds)))
    ]
    return clips, frames, fps
