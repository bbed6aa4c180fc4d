"""VBench dimensions: exact values for weight-free parts, tiny models for shapes and skips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from titan_world.eval import dimensions as D
from titan_world.eval.config import EvalConfig
from titan_world.eval.preprocess import Padder, center_crop, middle_indices, resize_shorter
from titan_world.eval.tiny_models import TinyFlow, TinyInterp, write_tiny_models
from titan_world.eval.vbench import run_vbench
from titan_world.eval.video_io import write_video


def _alternating(t: int = 9, h: int = 16, w: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.choice(np.array([0, 255], np.uint8), (h, w, 3))
    b = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return np.stack([a if i % 2 == 0 else b for i in range(t)]), a, b


def test_temporal_flickering_constant_is_one():
    assert D.temporal_flickering(np.full((10, 8, 8, 3), 77, np.uint8)) == 1.0


def test_temporal_flickering_alternating_exact_formula():
    v, a, b = _alternating()
    mad = np.abs(a.astype(float) - b.astype(float)).mean()
    assert D.temporal_flickering(v) == pytest.approx((255 - mad) / 255, abs=1e-12)
    with pytest.raises(D.DimensionError, match="at least 2"):
        D.temporal_flickering(v[:1])


class ConstFlow(nn.Module):
    def __init__(self, mag: float):
        super().__init__()
        self.mag = mag

    def forward(self, a, b):
        return torch.full((a.shape[0], 2, a.shape[2], a.shape[3]), self.mag / 2**0.5)


def test_dynamic_degree_threshold_rule():
    v = np.zeros((33, 64, 64, 3), np.uint8)  # 16 fps -> every 2nd frame: 17 samples
    thres, count = D.dynamic_degree_params((64, 64), 17)
    assert thres == 1.5 and count == 4
    assert D.dynamic_degree(v, 16.0, ConstFlow(2.0)) == 1.0
    assert D.dynamic_degree(v, 16.0, ConstFlow(1.0)) == 0.0
    out = D.dynamic_degree(v[:20, :20, :28], 16.0, TinyFlow())  # odd size: padded to 8, tuple output
    assert out in (0.0, 1.0)


def test_motion_smoothness_formula_with_ideal_interpolator():
    v, a, b = _alternating()  # evens all `a` (values 0/255: exact in float), odds `b`
    mad = np.abs(a.astype(float) - b.astype(float)).mean()
    ms = D.motion_smoothness(v, lambda x, y, t: x * (1 - t) + y * t)
    assert ms == pytest.approx((255 - mad) / 255, abs=1e-12)
    const = np.full((6, 15, 21, 3), 255, np.uint8)
    assert D.motion_smoothness(const, TinyInterp()) == pytest.approx(1.0, abs=0.06)


def test_preprocessing_matches_torchvision_conventions():
    x = torch.rand(1, 3, 30, 40)
    assert resize_shorter(x, 20).shape[-2:] == (20, 26)
    assert center_crop(torch.arange(25.0).view(1, 1, 5, 5), 3)[0, 0, 0].tolist() == [6, 7, 8]
    assert middle_indices(8, 80) == [4, 14, 24, 34, 44, 54, 64, 74]
    assert middle_indices(4, 2) == [0, 1, 1, 1]
    p = Padder((30, 41), 8)
    y = p.pad(torch.rand(1, 3, 30, 41))
    assert y.shape[-2:] == (32, 48) and p.unpad(y).shape[-2:] == (30, 41)


def test_all_dimensions_with_tiny_models_and_skips(tmp_path):
    rng = np.random.default_rng(1)
    vids = tmp_path / "videos"
    for i in range(2):
        v = np.clip(128 + np.cumsum(rng.integers(-4, 5, (24, 20, 28, 3)), 0), 0, 255).astype(np.uint8)
        write_video(vids / f"a cat-{i}.mp4", v, 8)
    paths = write_tiny_models(tmp_path / "models")
    cfg = dataclasses.replace(EvalConfig(window_seconds=1.0), **paths)
    res = run_vbench(sorted(vids.glob("*.mp4")), cfg)
    for d, info in res["dimensions"].items():
        assert info["status"] == "ok", (d, info)
        assert np.isfinite(info["mean"]) and info["num_videos"] == 2
        assert len(info["window_mean"]["mean"]) == 3  # 3 s at 8 fps, 1 s windows
    assert 0 <= res["dimensions"]["aesthetic_quality"]["mean"] <= 1
    assert res["videos"]["a cat-0.mp4"]["prompt"] == "a cat"
    # missing paths: skipped, never a number, the path it needs is named
    cfg2 = dataclasses.replace(cfg, raft_path=str(tmp_path / "missing.pt"), clip_path=None, amt_path=None)
    res2 = run_vbench(sorted(vids.glob("*.mp4")), cfg2, ["dynamic_degree", "aesthetic_quality", "temporal_flickering"])
    dd = res2["dimensions"]["dynamic_degree"]
    assert dd["status"] == "skipped" and "mean" not in dd and "missing.pt" in dd["reason"]
    assert dd["needs"]["raft_path"]["path"].endswith("missing.pt")
    assert "clip_path" in res2["dimensions"]["aesthetic_quality"]["needs"]
    assert all("dynamic_degree" not in v["scores"] for v in res2["videos"].values())
    # a state dict without a factory is refused with a message naming the file
    sd = tmp_path / "raft_sd.pth"
    torch.save(TinyFlow().state_dict(), sd)
    res3 = run_vbench(sorted(vids.glob("*.mp4")), dataclasses.replace(cfg, raft_path=str(sd)), ["dynamic_degree"])
    assert res3["dimensions"]["dynamic_degree"]["status"] == "skipped"
    assert "factory" in res3["dimensions"]["dynamic_degree"]["reason"]


def test_vbench_long_protocol_averages_clips(tmp_path):
    v = np.zeros((32, 8, 8, 3), np.uint8)
    v[16:] = 255  # one jump between clip 1 and 2 (2 s clips at 8 fps): inside no clip
    write_video(tmp_path / "v.mp4", v, 8)
    cfg = EvalConfig(protocol="vbench-long", window_seconds=0)
    res = run_vbench([tmp_path / "v.mp4"], cfg, ["temporal_flickering"])
    assert res["videos"]["v.mp4"]["scores"]["temporal_flickering"] == 1.0
    res = run_vbench([tmp_path / "v.mp4"], dataclasses.replace(cfg, protocol="vbench"), ["temporal_flickering"])
    assert res["videos"]["v.mp4"]["scores"]["temporal_flickering"] == pytest.approx(1 - 1 / 31)
