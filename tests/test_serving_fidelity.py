"""What is trained is what is served: serving streams a student with its post-training geometry
(posttrain.json), refuses other geometry unless forced, and its stream equals post-training's
self-rollout exactly (same noise, actions and exit steps)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from test_serving_engine import TINY, keys, make_engine

from serving.config import ServingConfig
from serving.engine import EngineError
from serving.loading import build_engine
from serving.pose import PoseTracker
from serving.streaming import StreamingEngine
from titan_world.config import load_config
from titan_world.data.synth import demo_level, make_episode
from titan_world.model import build_model, save_pretrained
from titan_world.model.action import ActionInputs
from titan_world.model.kv_cache import KVCache
from titan_world.posttrain.causal import ChunkLayout
from titan_world.posttrain.rollout import RolloutInputs, self_rollout, student_sigmas

# Tiny stand-ins for the 14B student's sink 3 / window 18 / chunk 3: none equals serving's fallbacks.
TRAINED = {"chunk_frames": 2, "denoise_steps": [1000, 600, 300], "sink_frames": 2, "window_frames": 3}
SERVE = ["serving.height=16", "serving.width=16", "serving.fps=16", "serving.device=cpu", "data.text_encoder.kind=tiny"]


def tiny_student(root: Path, meta: dict = TRAINED) -> Path:
    """A post-trained-looking student: Wan folder with causal_chunk_frames and posttrain.json."""
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg.model, causal_chunk_frames=meta["chunk_frames"]))
    with torch.no_grad():  # a fresh model predicts v = 0 (zero head) and ignores actions: wake both up
        torch.nn.init.normal_(model.head.head.weight, std=0.2)
        for block in model.blocks:
            torch.nn.init.normal_(block.action_proj.proj.weight, std=0.2)
    out = root / "model"
    save_pretrained(model, out)
    (out / "posttrain.json").write_text(json.dumps(meta))
    return out


def engine_for(folder: Path, *overrides: str) -> StreamingEngine:
    return build_engine(load_config(None, [*TINY, *SERVE, f"serving.checkpoint={folder}", *overrides]))


def test_student_is_served_with_its_training_geometry(tmp_path):
    eng = engine_for(tiny_student(tmp_path))
    sc = eng.cfg
    assert (sc.chunk_frames, sc.sink_frames, sc.window_frames, sc.kv_refresh) == (2, 2, 3, "clean")
    assert eng.sigmas == [1.0, 0.6, 0.3]
    cache = eng.start(None, "p", 0).cache
    assert (cache.chunk, cache.sink, cache.window) == (2, 2, 3)


@pytest.mark.parametrize(
    "override, key",
    [
        ("serving.window_frames=8", "serving.window_frames=8"),
        ("serving.sink_frames=1", "serving.sink_frames=1"),
        ("serving.chunk_frames=1", "serving.chunk_frames=1"),
        ("serving.denoise_steps=4", "serving.sigmas"),
        ("serving.kv_refresh=last_step", "serving.kv_refresh='last_step'"),
    ],
)
def test_untrained_geometry_is_refused_unless_forced(tmp_path, caplog, override, key):
    student = tiny_student(tmp_path)
    with pytest.raises(EngineError, match="not trained for") as err:
        engine_for(student, override)
    assert key in str(err.value) and "force_geometry" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="titan_world.serving"):
        eng = engine_for(student, override, "serving.force_geometry=true")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert key in warned
    if "kv_refresh" in override:
        assert "trade-off" in warned
    eng.start(None, "p", 0).step(torch.zeros(8))
    assert engine_for(student, "serving.window_frames=3").cfg.window_frames == 3  # the trained value is no override


def test_window_smaller_than_a_chunk_is_refused():
    with pytest.raises(ValueError, match=r"serving.window_frames=1 < serving.chunk_frames=2"):
        ServingConfig(chunk_frames=2, window_frames=1).validate()
    with pytest.raises(EngineError, match=r"serving.window_frames=1 < serving.chunk_frames=2"):
        make_engine(chunk_frames=2, window_frames=1)
    with pytest.raises(ValueError, match=r"window_frames=2 < chunk_frames=3"):
        KVCache(1, 1, 1, 4, 4, sink_frames=1, window_frames=2, chunk_frames=3)


@pytest.mark.parametrize("placed", [False, True])
def test_serving_stream_equals_posttraining_self_rollout(tmp_path, placed):
    """Exact equality: the engine's chunks == `self_rollout` of the same student, from the same
    start latents, prompt, seed (noise), per-video-frame actions (encoded by training's
    `ActionInputs.from_video_frames`, poses integrated as the engine does) and exit steps. Placed:
    sessions start at a camera of the demo level and keep to it (`StreamingEngine.place`), which a
    student of world-frame poses (the tiny default) sees: its stream then differs from the origin's."""
    eng = engine_for(tiny_student(tmp_path))
    assert eng.model.cfg.action.pose_frame == "world"
    chunks, seed, prompt = 4, 7, "a red house"
    start, level = (make_episode(10_000, 16, 16, seconds=1.0).c2w[0], demo_level()) if placed else (None, None)
    eng.place(start, level)
    session = eng.start(None, prompt, seed=seed)
    gen = torch.Generator().manual_seed(0)
    per_chunk = []
    for _ in range(chunks):
        a = torch.rand(eng.frames_per_chunk, 8, generator=gen)
        a[:, 6:] = a[:, 6:] * 2 - 1
        per_chunk.append(a)
    served = torch.cat([session.denoise(a).payload.latents for a in per_chunk], dim=2)

    video_actions = torch.cat([torch.zeros(1, 8), *per_chunk])  # the start frame has no action
    pose = PoseTracker(eng.cfg.fps, eng.height, eng.width, start=start, level=level)
    c2w = torch.cat([pose.origin[None], pose.advance(video_actions[1:])])
    intrinsics = pose.intrinsics.expand(len(video_actions), 4)
    acts = ActionInputs.from_video_frames(video_actions[None], c2w[None], intrinsics[None])
    given = session.start_latents
    layout = ChunkLayout(given.shape[2] + chunks * eng.cfg.chunk_frames, given.shape[2], eng.cfg.chunk_frames)
    context = eng.text_encoder.encode([prompt])
    inp = RolloutInputs(given, context, acts, layout, eng.model.cfg.cond_channels > 0)
    sigmas = student_sigmas(TRAINED["denoise_steps"])
    with torch.no_grad():
        rolled = self_rollout(
            eng.model,
            inp,
            sigmas,
            torch.Generator().manual_seed(seed),
            exit_steps=[len(sigmas) - 1] * chunks,
            sink_frames=TRAINED["sink_frames"],
            window_frames=TRAINED["window_frames"],
            horizon_frames=eng.cfg.horizon_frames,
        ).latents
    assert rolled.shape[2] > TRAINED["sink_frames"] + TRAINED["window_frames"]  # the window really rolls
    assert rolled.shape[2] > eng.cfg.horizon_frames == 7  # and the last chunk is past the horizon (sink held)
    assert torch.equal(served, rolled[:, :, given.shape[2] :]), (served - rolled[:, :, given.shape[2] :]).abs().max()
    if placed:
        eng.place(None)
        at_origin = eng.start(None, prompt, seed=seed)
        other = torch.cat([at_origin.denoise(a).payload.latents for a in per_chunk], dim=2)
        assert (other - served).abs().max() > 1e-3


def jump(session, frames: int) -> None:
    """Make `session` the same session `frames` latent frames later with the same last window (a
    10,000-chunk session costs minutes on 2 CPU cores; this is its state at a fraction of the cost):
    counters advanced, the window's stored keys rotated `frames` further (RoPE: a key J frames later
    is the same key rotated by J), pose history relabelled. `frames` is a multiple of the window so
    every frame keeps its ring slot; the sink is frames 0..S-1 in both."""
    from titan_world.model.rope import apply_rope, rope_angles

    cache = session.cache
    assert frames % cache.window == 0
    cos, sin = rope_angles((1, 1, 1), cache.k.shape[-1], frame_offset=frames, theta=cache.rope_theta)
    ring = slice((cache.chunk + cache.sink) * cache.tpf, None)
    for layer in range(cache.k.shape[0]):
        cache.k[layer, :, ring] = apply_rope(cache.k[layer, :, ring], cos, sin)
    cache.committed_frames += frames
    session.frame += frames
    session.pose._latent = type(session.pose._latent)(
        ((f + frames, p) for f, p in session.pose._latent), maxlen=session.pose.history
    )


def relative_translation(session) -> torch.Tensor:
    """Translation of the current camera relative to the pose the next chunk's actions are anchored to."""
    return (torch.linalg.inv(session._origin[0]) @ session.pose.current())[:3, 3]


@pytest.mark.parametrize("hold", [True, False])
def test_long_session_attends_like_chunk_50(hold):
    """Chunk 10,000 of a session sees its sink at the trained distance, so with the same last
    window it gives chunk 50's latents (to float rounding of the larger RoPE angles); without the
    horizon (the old absolute positions) the sink drifts away and the output changes. Action poses
    are re-anchored, so walking forward keeps the pose input bounded."""
    horizon = None if hold else 10**9  # 10**9: never held (the old behaviour)
    eng = make_engine(denoise_steps=1, horizon_frames=horizon)
    near, far = eng.start(None, "p", 3), eng.start(None, "p", 3)
    walk = keys("w")
    for i in range(50):
        near.denoise(walk)
        far.denoise(walk)
        if i == 30:
            moved_30 = relative_translation(near)
    moved_50 = relative_translation(near)
    state = far.state_bytes()
    jump(far, 10_000 * eng.cfg.chunk_frames)
    a, b = near.denoise(walk).payload.latents, far.denoise(walk).payload.latents
    assert far.frame == near.frame + 10_000 and torch.isfinite(b).all()
    assert far.state_bytes() == state and len(far.pose._latent) <= far.pose.history  # flat memory
    if hold:
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        torch.testing.assert_close(moved_50, moved_30, rtol=0, atol=1e-5)  # steady walk: same relative pose
    else:
        assert (b - a).abs().max() > 1e-3
        assert moved_50.norm() > moved_30.norm() + 0.1  # relative to the session start: grows without bound


def test_generate_reports_an_untrained_geometry_in_one_line(tmp_path, capsys):
    """`generate` streams a student through the same settings check; a refusal is exit 2, no traceback."""
    from launch.cli import main

    rc = main(
        [
            "generate",
            "--checkpoint",
            str(tiny_student(tmp_path)),
            "--frames",
            "5",
            "--out",
            str(tmp_path / "x.mp4"),
            *TINY,
            "serving.window_frames=4",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "serving.window_frames=4 vs the student's 3" in err and "Traceback" not in err, err
    assert not (tmp_path / "x.mp4").exists()
