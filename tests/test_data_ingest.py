"""`titan-world data ingest`: good videos are resampled and written, bad ones reported and skipped."""

from __future__ import annotations

import json
import tracemalloc
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest

from launch.cli import main
from titan_world.data import ingest as ingest_mod
from titan_world.data._streaming import StreamingDataset, release_prefix
from titan_world.data.ingest import (
    BadItem,
    _frame_time,
    _nearest_in_time,
    _Source,
    load_item,
    rotate_intrinsics,
    rotate_poses,
)

pytestmark = pytest.mark.xdist_group("data_streaming")


def _mp4(path: Path, n: int, fps: int, h: int = 48, w: int = 64, *, rotation: int = 0) -> None:
    """Frame i: red = 8 i, a green bar i + 1 px wide; `rotation`: display matrix (counter-clockwise)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if rotation:
            s.set_display_rotation(rotation)
        for i in range(n):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = (i * 8) % 256
            img[:, : (i % w) + 1, 1] = 200
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _vfr_mp4(path: Path, times_ms: list[int], h: int = 48, w: int = 64) -> None:
    """Frame j shown at times_ms[j] (uneven, like a phone recording); grey level 8 j."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)  # the nominal rate; the timestamps below rule
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        for j, t in enumerate(times_ms):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), 8 * j, np.uint8), format="rgb24")
            f.pts, f.time_base = t, Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _poses_by_index(n: int) -> np.ndarray:
    """Pose j has x translation j, so a row's source frame can be read back."""
    poses = np.repeat(np.eye(4)[None], n, 0)
    poses[:, 0, 3] = np.arange(n)
    return poses


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
    for name, reason in [
        ("nan.mp4", "NaN"),
        ("count.mp4", "7 poses for 20"),
        ("flat.mp4", "pose 5 has a singular rotation"),
        ("short.mp4", "need >= 5"),
        ("broken.mp4", "cannot decode"),
    ]:
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
        np.testing.assert_allclose(
            row["intrinsics"][0], [50 * 2 / 3, 50 * 2 / 3, (32 - 8) * 2 / 3, 24 * 2 / 3], rtol=1e-5
        )
        assert row["captions"]["narrative"] == "a moving green bar" and row["meta"]["poses_known"]
    finally:
        release_prefix(ds._shm_prefix_int)


def test_decoding_holds_the_output_not_the_source(tmp_path):
    """Peak numpy memory while ingesting a 256x192 clip to 32x32 stays below a few source frames
    (decoding everything first held all 60 of them, twice with np.stack)."""
    h, w, n = 192, 256, 60
    _mp4(tmp_path / "big.mp4", n, 30, h, w)
    src_frame = h * w * 3
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        ep = load_item(tmp_path / "big.mp4", 32, 32, 16)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not tracing:
            tracemalloc.stop()
    assert ep.frames.shape == (29, 32, 32, 3)  # 60 frames at 30 fps -> 32 at 16 fps -> 1 + 4k
    assert peak < 4 * src_frame, f"peak {peak / src_frame:.1f} source frames alive"


def test_variable_frame_rate_picks_nearest_in_time(tmp_path):
    """Output frame i shows the source frame nearest to t0 + i / fps by presentation time; frames,
    poses and actions all follow that choice (nearest by index at the average rate does not)."""
    rng = np.random.default_rng(0)
    times = [0] + list(np.cumsum(rng.choice([10, 10, 10, 30, 120], 30)) + 3)  # bursts and gaps; no ties
    _vfr_mp4(tmp_path / "vfr.mp4", times)
    np.save(tmp_path / "vfr.poses.npy", _poses_by_index(len(times)))
    actions = np.zeros((len(times), 8))
    actions[:, 6] = np.arange(len(times))
    np.save(tmp_path / "vfr.actions.npy", actions)
    fps = 10
    t = np.asarray(times) / 1000
    want = [int(np.argmin(np.abs(t - i / fps))) for i in range(int(t[-1] * fps) + 1)]
    want = want[: 1 + 4 * ((len(want) - 1) // 4)]
    ep = load_item(tmp_path / "vfr.mp4", 32, 32, fps)
    np.testing.assert_array_equal(ep.c2w[:, 0, 3], want)
    np.testing.assert_array_equal(ep.actions[:, 6], want)
    grey = ep.frames.reshape(len(want), -1).mean(1)
    np.testing.assert_allclose(grey, 8 * np.asarray(want), atol=3)  # the pixels follow the same choice
    assert ep.meta["src_frames"] == len(times)


@pytest.mark.parametrize("ext,fps", [(".mp4", 16), (".mkv", 12), (".mkv", 16)])
def test_constant_rate_picks_as_by_index(tmp_path, ext, fps):
    """Constant rate: exactly np.round(i * src_fps / fps), also with mkv's 1 ms timestamps (30 fps
    -> 0, 33, 67, ... ms, where the rounding alone would break the ties differently)."""
    _mp4(tmp_path / f"cfr{ext}", 40, 30)
    np.save(tmp_path / "cfr.poses.npy", _poses_by_index(40))
    ep = load_item(tmp_path / f"cfr{ext}", 32, 32, fps)
    n_out = int(np.floor(39 * fps / 30)) + 1
    n_out = 1 + 4 * ((n_out - 1) // 4)
    np.testing.assert_array_equal(ep.c2w[:, 0, 3], np.round(np.arange(n_out) * 30 / fps))


def test_nearest_in_time_matches_index_rounding_at_constant_rate():
    for rate in (Fraction(24), Fraction(25), Fraction(30), Fraction(30000, 1001), Fraction(60)):
        for fps in (8, 12, 16, 24):
            n = 97
            picks = [j for j, _ in _nearest_in_time(((j / rate, None) for j in range(n)), fps)]
            n_out = int(np.floor((n - 1) * fps / rate)) + 1
            np.testing.assert_array_equal(
                picks, np.round(np.arange(n_out) * float(rate) / fps), err_msg=f"{rate} -> {fps}"
            )


def _fake(pts=None, tb=None, h=48, w=64, rotation=0):
    return SimpleNamespace(pts=pts, time_base=tb, height=h, width=w, rotation=rotation)


def test_frame_times_fallback_snap_and_checks():
    ms = Fraction(1, 1000)
    assert _frame_time(None, None, 3, None, Fraction(30)) == Fraction(1, 10)  # no timestamp: index / rate
    assert _frame_time(1033, ms, 1, Fraction(1), Fraction(30)) == Fraction(1, 30)  # 33 ms: 1/30 s rounded to the clock
    assert _frame_time(1050, ms, 1, Fraction(1), Fraction(30)) == Fraction(5, 100)  # a real (VFR) time
    src = _Source([_fake(), _fake(), _fake()], Fraction(25), 16)  # no timestamps at all
    assert [t for t, _ in src] == [0, Fraction(1, 25), Fraction(2, 25)] and src.n == 3
    with pytest.raises(BadItem, match="frame 2 is shown at 0.010 s, before frame 1"):
        list(_Source([_fake(0, ms), _fake(40, ms), _fake(10, ms)], Fraction(25), 16))
    with pytest.raises(BadItem, match="frame 1 is 32x24 .* expected one size and rotation"):
        list(_Source([_fake(0, ms), _fake(40, ms, 24, 32)], Fraction(25), 16))
    with pytest.raises(BadItem, match="display rotation of 45 degrees"):
        list(_Source([_fake(0, ms, rotation=45)], Fraction(25), 16))


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_rotated_camera_sees_the_rotated_image(turns):
    """A world point projected with the rotated intrinsics and poses lands on the pixel where
    np.rot90 moved the pixel it hit before rotation."""
    h, w = 48, 64
    k = np.array([[50.0, 40.0, 30.0, 20.0]])
    a = 0.3
    c2w = np.eye(4)
    c2w[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    c2w[:3, 3] = [1.0, -2.0, 0.5]

    def project(k, c2w, x_world):
        p = np.linalg.inv(c2w) @ np.append(x_world, 1.0)
        return k[0, 0] * p[0] / p[2] + k[0, 2], k[0, 1] * p[1] / p[2] + k[0, 3]

    for row, col, depth in ((3, 5, 2.0), (40, 10, 3.0), (17, 60, 7.0)):
        fx, fy, cx, cy = k[0]
        x_world = (c2w @ np.array([(col + 0.5 - cx) / fx * depth, (row + 0.5 - cy) / fy * depth, depth, 1.0]))[:3]
        img = np.zeros((h, w), np.uint8)
        img[row, col] = 1
        r, c = np.argwhere(np.rot90(img, turns))[0]
        u2, v2 = project(rotate_intrinsics(k, turns, h, w), rotate_poses(c2w[None], turns)[0], x_world)
        np.testing.assert_allclose([v2, u2], [r + 0.5, c + 0.5], atol=1e-9, err_msg=f"{turns} turns, pixel {row, col}")


@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_display_rotation_is_applied(tmp_path, rotation):
    """A video stored 64x48 with a display rotation comes out upright; intrinsics and poses given
    for the stored frames follow (for -90, the usual portrait phone video: fx, fy swap and
    (cx, cy) -> (h - cy, cx))."""
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix (Stream.set_display_rotation)")
    _mp4(tmp_path / "phone.mp4", 9, 16, rotation=rotation)
    np.save(tmp_path / "phone.intrinsics.npy", np.tile([50.0, 40.0, 30.0, 20.0], (9, 1)))
    c2w = np.repeat(np.eye(4)[None], 9, 0)
    c2w[:, :3, 3] = [1.0, 2.0, 3.0]
    np.save(tmp_path / "phone.poses.npy", c2w)
    up_h, up_w = (64, 48) if rotation % 180 else (48, 64)
    ep = load_item(tmp_path / "phone.mp4", up_h, up_w, 16)  # upright size: no crop, no scale
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[..., 0] = 8 * 4
    stored[:, :5, 1] = 200  # frame 4: a green bar at the stored left edge

    def err(turns: int) -> float:
        return float(np.abs(ep.frames[4].astype(float) - np.rot90(stored, turns)).mean())

    assert err(rotation // 90) < 3 < 10 < err(rotation // 90 + 2), (
        err(rotation // 90),
        err(rotation // 90 + 2),
    )  # upright, not upside down
    assert ep.meta["src_size"] == [up_h, up_w] and ep.meta["src_rotation"] == rotation % 360
    if rotation == -90:
        np.testing.assert_allclose(ep.intrinsics[0], [40, 50, 48 - 20, 30])
        np.testing.assert_allclose(ep.c2w[0, :3, 0], [0, -1, 0])  # new x = -old y
        np.testing.assert_allclose(ep.c2w[0, :3, 1], [1, 0, 0])  # new y = old x
        np.testing.assert_allclose(ep.c2w[0, :3, 3], [1, 2, 3])
        # arrays given for the upright frames (data.ingest_arrays=upright) are not turned again
        up = load_item(tmp_path / "phone.mp4", up_h, up_w, 16, arrays="upright")
        np.testing.assert_array_equal(up.frames, ep.frames)
        np.testing.assert_allclose(up.intrinsics[0], [50, 40, 30, 20])
        np.testing.assert_allclose(up.c2w[0], c2w[0])


def _fake_episode(name: str):
    return SimpleNamespace(num_frames=5, meta={"src_fps": 30.0, "src_size": [48, 64]}, name=name)


def test_ingest_videos_writes_one_episode_at_a_time(tmp_path, monkeypatch):
    """Each episode reaches the writer right after it is decoded (batch size 1), so one is in
    memory at a time; bad ones are skipped in between; nothing is written when none is good."""
    loaded: list[str] = []

    def fake_load(v, *a, **kw):
        loaded.append(v.name)
        if "bad" in v.name:
            raise BadItem("broken")
        return _fake_episode(v.name)

    seen: list[tuple[str, int]] = []
    calls: list[dict] = []

    def fake_write(episodes, out, codec, text, meta, **kw):
        calls.append(kw)
        for ep in episodes:
            seen.append((ep.name, len(loaded)))
        return len(seen)

    monkeypatch.setattr(ingest_mod, "build_encoders", lambda cfg: (None, None, {}))
    monkeypatch.setattr(ingest_mod, "load_item", fake_load)
    monkeypatch.setattr(ingest_mod, "write_episodes", fake_write)
    cfg = SimpleNamespace(data=SimpleNamespace(height=32, width=32, fps=16, ingest_arrays="stored"))
    videos = [Path(n) for n in ("a.mp4", "bad1.mp4", "b.mp4", "c.mp4")]
    reports = ingest_mod.ingest_videos(cfg, videos, tmp_path / "out")
    assert seen == [("a.mp4", 1), ("b.mp4", 3), ("c.mp4", 4)]
    assert calls == [{"keep_raw": False, "batch_size": 1}]
    assert [r.status for r in reports] == ["ok", "skipped", "ok", "ok"]
    calls.clear()
    assert ingest_mod.ingest_videos(cfg, [Path("bad2.mp4")], tmp_path / "none")[0].status == "skipped"
    assert calls == []


def test_ingest_is_atomic(tmp_path, monkeypatch):
    """`ingest` (one process) writes into OUT.tmp-* and renames at the end: an error after the
    first episode was written leaves nothing at OUT and no temp folder."""
    from titan_world.config import load_config

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        _mp4(src / f"{name}.mp4", 9, 16)
    cfg = load_config(None, ["data.height=32", "data.width=32"])
    real = ingest_mod.load_item

    def failing(v, *a, **kw):
        if v.name == "b.mp4":
            raise RuntimeError("disk on fire")
        return real(v, *a, **kw)

    monkeypatch.setattr(ingest_mod, "load_item", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ingest_mod.ingest(cfg, src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    monkeypatch.setattr(ingest_mod, "load_item", real)
    reports = ingest_mod.ingest(cfg, src, tmp_path / "out")
    assert [r.status for r in reports] == ["ok", "ok"]
    assert (tmp_path / "out" / "index.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
