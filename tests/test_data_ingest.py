"""`titan-world data ingest`: good videos are resampled and written, bad ones reported and skipped."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from launch.cli import main
from titan_world.data._streaming import StreamingDataset, release_prefix

pytestmark = pytest.mark.xdist_group("data_streaming")


def _mp4(path: Path, n: int, fps: int, h: int = 48, w: int = 64) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = (i * 8) % 256
            img[:, : (i % w) + 1, 1] = 200
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_ingest_reports_and_skips(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _mp4(src / "good.mp4", 40, 30)
    poses = np.repeat(np.eye(4)[None], 40, 0)
    poses[:, 0, 3] = np.arange(40)
    np.save(src / "good.poses.npy", poses)
    np.save(src / "good.intrinsics.npy", np.tile([50.0, 50.0, 32.0, 24.0], (40, 1)))
    (src / "good.json").write_text(json.dumps({"caption": "a moving green bar"}))
    _mp4(src / "nan.mp4", 20, 16)
    bad = np.repeat(np.eye(4)[None], 20, 0)
    bad[3, 0, 0] = np.nan
    np.save(src / "nan.poses.npy", bad)
    _mp4(src / "count.mp4", 20, 16)
    np.save(src / "count.poses.npy", np.repeat(np.eye(4)[None], 7, 0))
    _mp4(src / "flat.mp4", 20, 16)
    flat = np.repeat(np.eye(4)[None], 20, 0)
    flat[5, 2, 2] = 0.0  # a rotation block that cannot be inverted
    np.save(src / "flat.poses.npy", flat)
    _mp4(src / "short.mp4", 3, 16)
    (src / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "out"
    rc = main(["data", "ingest", "--src", str(src), "--out", str(out), "--keep-raw", "data.height=32", "data.width=32"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "1 written, 5 skipped" in text
    for name, reason in [("nan.mp4", "NaN"), ("count.mp4", "7 poses for 20"), ("flat.mp4", "pose 5 has a singular rotation"), ("short.mp4", "need >= 5"), ("broken.mp4", "cannot decode")]:
        line = next(l for l in text.splitlines() if l.startswith(name))
        assert "skipped" in line and reason in line, line
    ds = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    try:
        assert len(ds) == 1
        row = ds[0]
        # 40 frames at 30 fps = 1.3 s -> 21 frames at 16 fps (1 + 4k), source frames nearest in time
        assert row["num_frames"] == 21 and row["frames"].shape == (21, 32, 32, 3)
        idx = np.round(np.arange(21) * 30 / 16).astype(int)
        np.testing.assert_allclose(row["c2w"][:, 0, 3], idx)
        # 64x48 centre-cropped to 48x48 (x0 = 8), resized by 32/48
        np.testing.assert_allclose(row["intrinsics"][0], [50 * 2 / 3, 50 * 2 / 3, (32 - 8) * 2 / 3, 24 * 2 / 3], rtol=1e-5)
        assert row["captions"]["narrative"] == "a moving green bar" and row["meta"]["poses_known"]
    finally:
        release_prefix(ds._shm_prefix_int)
