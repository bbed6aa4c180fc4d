"""`titan-world data synth` and `prepare_dataset` (what `titan-world train` runs first)."""

from __future__ import annotations

import json
import time

import pytest

from launch.cli import main
from titan_world.config import load_config
from titan_world.data.loader import prepare_dataset

pytestmark = pytest.mark.xdist_group("data_streaming")


def test_synth_cli(tmp_path, capsys):
    out = tmp_path / "ds"
    assert (
        main(
            ["data", "synth", "--out", str(out), "--episodes", "3", "--seconds", "1", "--height", "32", "--width", "48"]
        )
        == 0
    )
    assert "wrote 3 episodes" in capsys.readouterr().out
    meta = json.loads((out / "titan_dataset.json").read_text())
    assert meta["episodes"] == 3 and meta["codec"]["kind"] == "tiny" and (out / "index.json").exists()


def test_prepare_dataset_fast(tmp_path):
    cfg = load_config(None, [f"data.path=synthetic:{tmp_path / 'synthetic'}", "data.synth_episodes=6"])
    t0 = time.perf_counter()
    path = prepare_dataset(cfg, progress=False)
    dt = time.perf_counter() - t0
    assert (tmp_path / "synthetic" / "index.json").exists() and dt < 20
    assert prepare_dataset(cfg) == path  # second call: already there
