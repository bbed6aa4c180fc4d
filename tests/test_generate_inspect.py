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
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--frames",
            "9",
            "--steps",
            "2",
            "--out",
            str(out),
            "--with-reference",
        ]
    )
    assert rc == 0
    frames, fps = read_video(out)
    assert frames.shape == (9, 64, 64, 3) and fps == 16
    ref, _ = read_video(out.with_suffix(".reference.mp4"))
    assert ref.shape == frames.shape
    assert "model:" in capsys.readouterr().out


def test_generate_keeps_the_given_first_frame(tmp_path):
    """The conditioning frame's latent is untouched by sampling: frame 0 is its codec round trip."""
    from titan_world.generate import generate
    from titan_world.model.codec import build_codec, frames_to_video, video_to_frames

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


def test_generate_refuses_bad_arguments_before_sampling(tmp_path, capsys, monkeypatch):
    """Issue 17 W4/W8/T4: NaN actions, --steps 0 / -3, a CUDA device on a CPU build and an unknown
    output extension are errors naming the problem, raised before any model is loaded or sampled."""
    import torch

    import titan_world.generate as gen

    def no_model(*a, **k):
        raise AssertionError("loaded a model despite bad arguments")

    monkeypatch.setattr(gen, "load_generation_model", no_model)
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((9, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"nan.npy: 72 values are NaN or infinite"):
        load_actions(nan)
    inf = tmp_path / "inf.json"
    inf.write_text("[[0, 0, 0, 0, 0, 0, Infinity, 0]]")
    with pytest.raises(ValueError, match=r"inf.json: 1 values are NaN or infinite \(first at frame 0, mouse_dx\)"):
        load_actions(inf)
    out = str(tmp_path / "x.mp4")
    cases = [
        (["--actions", str(nan), "--frames", "9"], "NaN or infinite"),
        (["--steps", "0"], "--steps 0: expected at least 1"),
        (["--steps", "-3"], "--steps -3"),
        (["--out", str(tmp_path / "x.txt")], "unknown extension"),
    ]
    cases.append((["--height", "96"], "set data.height=96"))
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device"))
    for extra, message in cases:
        args = ["generate", "--out", out, *extra] if "--out" not in extra else ["generate", *extra]
        assert main(args) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.txt").exists()


def test_generate_npy_output_and_negative_prompt(tmp_path):
    """--out .npy writes the uint8 frames losslessly; the unconditional branch encodes the negative
    prompt (a different negative prompt gives a different clip under guidance)."""
    import torch

    cfg = load_config()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # a fresh head is zero (velocity 0 whatever the text): make the text matter
        model.head.head.weight.normal_(0, 0.5)
    save_pretrained(model, tmp_path / "ckpt")
    base = [
        "generate",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--frames",
        "5",
        "--steps",
        "2",
        "--guidance",
        "3",
        "--prompt",
        "a red ball",
    ]
    assert main(base + ["--out", str(tmp_path / "a.npy")]) == 0
    assert main(base + ["--out", str(tmp_path / "b.npy"), "--negative-prompt", "blue cube"]) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.dtype == np.uint8 and a.shape == (5, 64, 64, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0


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
