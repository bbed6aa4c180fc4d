"""Video I/O: lossless round trip (exact), fps, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from titan_world.data.ingest import list_videos
from titan_world.eval.video_io import read_video, write_video


def test_lossless_round_trip_is_exact(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (7, 18, 26, 3), dtype=np.uint8)
    write_video(tmp_path / "a.mp4", x, 16)
    y, fps = read_video(tmp_path / "a.mp4")
    assert fps == 16.0 and y.dtype == np.uint8
    np.testing.assert_array_equal(x, y)


def test_lossy_mode_and_ntsc_fps(tmp_path):
    x = np.full((5, 16, 20, 3), 120, np.uint8)
    write_video(tmp_path / "b.mp4", x, 30000 / 1001, lossless=False)
    y, fps = read_video(tmp_path / "b.mp4")
    assert y.shape == x.shape and abs(fps - 29.97) < 0.01
    assert np.abs(y.astype(int) - 120).max() <= 2


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        read_video(tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "c.mp4", np.zeros((2, 8, 8, 3), np.float32), 8)
    assert list_videos(tmp_path) == [tmp_path / "bad.mp4"]
