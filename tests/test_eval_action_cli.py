"""`titan-world eval action`: held-out synthetic episodes, rolled out by a run, scored and reported."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from launch.cli import main
from titan_world.config import load_config, save_config
from titan_world.data.actions import CameraState, state_to_c2w
from titan_world.data.synth import make_episode
from titan_world.eval.action_following import find_revisits
from titan_world.model import build_model, save_pretrained

SIZE = ["data.height=32", "data.width=32", "model.action.enabled=true"]


def make_run(root, chunk: int) -> None:
    """A tiny run folder as training leaves it: model/ (Wan format) and config.yaml. The head is
    given weights (Wan zero-inits it) so rollouts differ from the first frame."""
    cfg = load_config(None, SIZE)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg.model, causal_chunk_frames=chunk))
    for p in model.head.parameters():
        p.data.normal_(0, 0.02)
    save_pretrained(model, root / "model")
    save_config(cfg, root / "config.yaml")


@pytest.mark.parametrize("chunk", [0, 1, 3])  # bidirectional; students with 4- and 12-frame chunks
def test_eval_action_writes_every_figure_on_the_right_frames(tmp_path, chunk):
    """3 s streams (49 frames, 3 one-second windows); the first 2 s (33 frames) are scored, or the
    whole chunks of a student within them (12-frame chunks: 25 frames)."""
    run = tmp_path / "run"
    make_run(run, chunk)
    clip = 25 if chunk == 3 else 33
    out = tmp_path / "out"
    assert (
        main(
            [
                "eval",
                "action",
                "--checkpoint",
                str(run),
                "--episodes",
                "2",
                "--seed",
                "777",
                "--seconds",
                "3",
                "--window-seconds",
                "1",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rep = json.loads((out / "action_following.json").read_text())
    s = rep["settings"]
    assert s["rollout"] == ("streamed causal student" if chunk else "chunked bidirectional")
    assert s["seeds"] == [777, 778] and s["num_frames"] == clip and s["stream_frames"] == 49
    for k in ("model", "shuffled", "copy_last"):
        assert len(rep["frame_error"][k]["psnr_per_frame"]) == clip - 1
    # copy-last-frame, computed here from the simulator's own episodes: the same frames were scored
    mse = []
    for seed in (777, 778):
        ep = make_episode(seed, 32, 32, seconds=3, fps=16).frames[:clip].astype(np.float64) / 255
        mse.append(((ep[1:] - ep[:1]) ** 2).mean())
    assert rep["frame_error"]["copy_last"]["psnr"] == pytest.approx(-10 * math.log10(np.mean(mse)), abs=1e-9)
    assert rep["frame_error"]["model"]["psnr"] != rep["frame_error"]["copy_last"]["psnr"]
    goals = {g["figure"]: g for g in rep["goals"]}  # the demo's targets, on the same figures
    assert goals["PSNR minus copy-last frame (dB)"]["value"] == rep["beats"]["psnr_vs_copy_last"]
    assert goals["detail ratio, last / first window"]["value"] == rep["drift"]["last_over_first"]["detail_ratio"]
    windows = rep["drift"]["windows"]
    assert len(windows) == 3 and all(w["frames"] == 16 for w in windows)
    assert set(rep["drift"]["last_over_first"]) == {"detail_ratio", "colour_hist_distance"}
    assert all(v is not None and v > 0 for v in rep["drift"]["last_over_first"].values())
    rv = rep["revisits"]
    assert rv["frames"]["revisit"] + rv["frames"]["first_visit"] == 2 * 48  # every scored stream frame, once
    assert set(rv["model"]) == {"revisit", "first_visit"} and len(rep["episodes"]) == 2
    html = (out / "index.html").read_text()
    assert "action_filmstrip.png" in html and "stream_filmstrip.png" in html and "Drift" in html
    assert (out / "plots" / "stream_filmstrip.png").is_file()


def test_revisit_detection_finds_a_known_return():
    """Walk 2 m east, stand, walk back west and turn to face east again: at the end the agent is
    back at its start place and heading, 5 s later; the way out is never a revisit."""
    fps = 4
    states = [CameraState(x=0.5 + 0.1 * i, z=0.5, yaw=math.pi / 2) for i in range(21)]  # east, 5 s
    states += [CameraState(x=2.5 - 0.1 * i, z=0.5, yaw=-math.pi / 2) for i in range(1, 21)]  # back west
    states += [CameraState(x=0.5, z=0.5, yaw=math.pi / 2)] * 4  # turned to face east at the start
    rv = find_revisits(np.stack([state_to_c2w(s) for s in states]), fps, radius=0.3, max_yaw_deg=20, min_gap_seconds=3)
    assert rv["revisit"] == [41, 42, 43, 44]
    assert all(e <= 2 for e in rv["earlier"])  # matched to the start, not to the walk back (wrong heading)
    assert set(rv["first_visit"]) == set(range(41))


def test_bad_arguments_are_named_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "action", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert f"--checkpoint {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
    assert main(["eval", "action", "--checkpoint", str(tmp_path), "--seconds", "1", "--out", str(out)]) == 2
    assert "--seconds 1.0: expected at least the scored clip" in capsys.readouterr().err
    assert not out.exists()


def test_the_shuffled_baseline_is_driven_by_its_own_camera_path():
    """The camera is part of the control: shuffled actions get the path they produce (replayed from the
    first pose, as serving derives it), not the simulator's, which would still tell the model the way."""
    from titan_world.data.actions import integrate_actions
    from titan_world.eval.action_eval import episode_inputs, shuffled_actions

    ep = make_episode(777, 32, 32, seconds=2, fps=16)
    own = episode_inputs(ep, 33)
    assert np.array_equal(own.c2w, ep.c2w[:33]) and np.array_equal(own.actions, ep.actions[:33])
    # the episode's own actions replayed give the simulator's path: only other actions move the camera elsewhere
    np.testing.assert_allclose(integrate_actions(ep.actions[:33], ep.c2w[0], ep.fps), ep.c2w[:33], atol=1e-5)
    shuffled = shuffled_actions(ep.actions[:33])
    got = episode_inputs(ep, 33, shuffled)
    np.testing.assert_allclose(got.c2w, integrate_actions(shuffled, ep.c2w[0], ep.fps), atol=1e-6)
    assert np.abs(got.c2w - ep.c2w[:33]).max() > 0.1 and np.array_equal(got.c2w[0], ep.c2w[0])
