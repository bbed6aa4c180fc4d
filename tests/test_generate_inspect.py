"""`titan-world generate` writes a playable clip; `titan-world inspect` reports sizes and FLOPs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from launch.cli import main
from titan_world.config import load_config
from titan_world.eval.video_io import read_video
from titan_world.generate import build_inputs, load_actions
from titan_world.model import build_model, save_pretrained


def test_generate_tiny_clip_from_checkpoint(tmp_path, capsys):
    cfg = load_config()
    save_pretrained(build_model(cfg.model), tmp_path / "ckpt")
    out = tmp_path / "clip.mp4"
    rc = main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--frames", "9", "--steps", "2", "--out", str(out), "--with-reference"])
    assert rc == 0
    frames, fps = read_video(out)
    assert frames.shape == (9, 64, 64, 3) and fps == 16
    ref, _ = read_video(out.with_suffix(".reference.mp4"))
    assert ref.shape == frames.shape
    assert "model:" in capsys.readouterr().out


def test_generate_keeps_the_given_first_frame(tmp_path):
    """The conditioning frame's latent is untouched by sampling: frame 0 is its codec round trip."""
    from titan_world.model.codec import frames_to_video, video_to_frames
    from titan_world.generate import generate
    from titan_world.model.codec import build_codec

    cfg = load_config()
    save_pretrained(build_model(cfg.model), tmp_path / "ckpt")
    inputs = build_inputs(cfg, image=None, prompt=None, actions=None, frames=5, episode_seed=3)
    video, _ = generate(cfg, str(tmp_path / "ckpt"), inputs, steps=2, device="cpu")
    codec = build_codec("tiny", 4, channels=cfg.data.codec.channels)
    expected = video_to_frames(codec.decode(codec.encode(frames_to_video(inputs.first_frame[None, None]))))[0, 0]
    assert np.abs(video[0].astype(int) - expected.astype(int)).max() <= 1


def test_actions_file_formats_and_errors(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(json.dumps([{"keys": ["w", "shift"], "mouse": [0.5, 0]}, {"keys": []}]))
    arr = load_actions(good)
    assert arr.shape == (2, 8) and arr[0, 0] == 1 and arr[0, 5] == 1 and arr[0, 6] == 0.5
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps([{"keys": ["jump"]}]))
    with pytest.raises(ValueError, match="unknown key 'jump'"):
        load_actions(bad)
    np.save(tmp_path / "c.npy", np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"expected \[T, 8\]"):
        load_actions(tmp_path / "c.npy")
    assert main(["generate", "--frames", "8"]) == 2  # not 1 + 4k


def test_inspect_reports_a14b_and_tokens(capsys):
    assert main(["inspect", "wan2.2-i2v-a14b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_per_expert"] == 14_288_901_184 and info["experts"] == 2
    assert info["clip"]["tokens"] == 32_760
    assert main(["inspect", "wan2.1-1.3b", "--frames", "961"]) == 0
    assert "375,960 tokens" in capsys.readouterr().out  # 60 s: 241 latent frames x 30 x 52
    assert main(["inspect", "wan2.1-1.3b", "--frames", "80"]) == 2
    assert "1 + 4k" in capsys.readouterr().err


def test_inspect_checkpoint_folder(tmp_path, capsys):
    cfg = load_config()
    save_pretrained(build_model(cfg.model), tmp_path / "ckpt")
    assert main(["inspect", str(tmp_path / "ckpt"), "--frames", "17", "--height", "64", "--width", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "f32" and info["clip"]["tokens"] == 5 * 8 * 8


def test_inspect_plan_per_stage_and_for_a_mesh(capsys):
    assert main(["inspect", "wan2.2-i2v-a14b", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "60s" in out and "375,960" in out
    assert main(["inspect", "wan2.2-i2v-a14b", "--plan", "--cp", "8", "--gpus", "64", "--frames", "961", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["cp"] == 8 and plan["dp_shard"] == 8 and plan["tokens"] == 375_960
    assert main(["inspect", "wan2.2-i2v-a14b", "--plan", "--cp", "3"]) == 2  # 40 heads
    assert main(["inspect", "wan2.1-1.3b", "--plan", "--cp", "1", "--gpus", "1", "--ac", "attention", "--json"]) == 0
    one_gpu = json.loads(capsys.readouterr().out)["plan"]  # 36 GB with every block checkpointed: spare memory to spend
    assert 0 < one_gpu["max_ac_skip_last"] < 30
