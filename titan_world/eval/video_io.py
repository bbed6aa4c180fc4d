"""THE mp4 reader/writer of titan-world (eval, data, generate and serving all use these two).

PyAV bundles FFmpeg, so no system ffmpeg/OpenCV is needed. `write_video` defaults to lossless
H.264 in RGB (libx264rgb, qp=0): decoded frames equal the written ones bit for bit. (yuv444p with
qp=0 is lossless only in YUV; the RGB<->YUV conversion alone moves pixels by up to 2 levels.)
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# How a decoder turns YUV into RGB (docs/eval.md, "Decoding"):
#   "tagged": the matrix and range the file's colour tags name (BT.601 when untagged) — what
#             decord does (VBench's imaging/aesthetic quality, overall consistency);
#   "bt601":  always the BT.601 matrix, whatever the tag — what OpenCV's VideoCapture does
#             (VBench's temporal flickering, dynamic degree, motion smoothness).
# Both are explicit here so a PyAV upgrade cannot change them (PyAV 17 began following the tag
# in plain `to_ndarray`); tests/test_vbench_parity.py checks them against OpenCV and decord.
COLOUR_MODES = ("tagged", "bt601")


def _to_rgb(frame: av.VideoFrame, colour: str) -> np.ndarray:
    if colour == "tagged":
        return frame.reformat(
            format="rgb24", src_colorspace=frame.colorspace, src_color_range=frame.color_range
        ).to_ndarray()
    return frame.reformat(format="rgb24", src_colorspace="ITU601").to_ndarray()


def read_video(path: str | Path, colour: str = "tagged") -> tuple[np.ndarray, float]:
    """Decode every frame of a video -> (uint8 [T, H, W, 3] RGB, fps); `colour` in COLOUR_MODES."""
    if colour not in COLOUR_MODES:
        raise ValueError(f"read_video colour={colour!r}: expected one of {COLOUR_MODES}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.base_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            frames = [_to_rgb(f, colour) for f in container.decode(stream)]
    except (av.FFmpegError, IndexError) as e:
        raise ValueError(f"{path}: cannot decode video: {e}") from e
    if not frames:
        raise ValueError(f"{path}: video has no frames")
    return np.stack(frames), fps


def write_video(path: str | Path, frames: np.ndarray, fps: float, *, lossless: bool = True, crf: int = 18) -> Path:
    """Encode uint8 [T, H, W, 3] RGB frames to H.264 mp4.

    lossless=True: libx264rgb rgb24 + qp=0 (exact round trip; FFmpeg/PyAV/OpenCV decode it,
    browsers do not). Use it for tests and eval inputs.
    lossless=False: yuv420p + crf (small files that every browser plays; H and W must be even).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video({path}): expected frames [T, H, W, 3], got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"write_video({path}): expected uint8 frames, got {frames.dtype}")
    t, h, w, _ = frames.shape
    if not lossless and (h % 2 or w % 2):
        raise ValueError(f"write_video({path}): yuv420p needs even H and W, got {h}x{w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=rate)
        stream.width, stream.height = w, h
        if lossless:
            stream.pix_fmt = "rgb24"
            stream.options = {"qp": "0", "preset": "ultrafast"}
        else:
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
