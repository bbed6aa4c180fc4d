"""World-frame poses (model.action.pose_frame=world) and cameras that stay inside their level.

A model of one place gets the camera's pose in that place's frame: its action input then depends on
where the camera stands, not only on how it moved, and a replayed or user-driven camera keeps clear
of the level's blocks as the data's cameras did (`step_within`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from serving.pose import PoseTracker
from titan_world.config import load_config
from titan_world.data.actions import ACTION_DIM, W, c2w_to_state, clear_of_blocks, integrate_actions
from titan_world.data.synth import demo_level, make_episode
from titan_world.model.action import ActionEmbedding, ActionInputs
from titan_world.model.config import ActionConfig, ModelConfig

LEVEL_SIZE = demo_level().cells.shape[0]


def walk_forward(frames: int) -> np.ndarray:
    acts = np.zeros((frames, ACTION_DIM), np.float32)
    acts[1:, W] = 1.0
    return acts


def test_a_camera_replayed_in_its_level_stops_short_of_its_walls():
    ep = make_episode(10_000, 32, 32, seconds=1.0)
    acts = walk_forward(160)  # 10 s of W: 16 m, twice the courtyard
    free = integrate_actions(acts, ep.c2w[0], ep.fps)
    inside = integrate_actions(acts, ep.c2w[0], ep.fps, level=ep.world)
    assert not all(0 < p < LEVEL_SIZE for p in free[-1, [0, 2], 3])  # without the level: through the wall
    assert all(clear_of_blocks(ep.world, c2w_to_state(p)) for p in inside)
    np.testing.assert_allclose(inside[-1], inside[-20])  # it stopped at the wall and stays
    # the scripted agent obeys the same rule: its stored actions replay to its poses inside the level too
    np.testing.assert_allclose(integrate_actions(ep.actions, ep.c2w[0], ep.fps, level=ep.world), ep.c2w, atol=1e-5)


def test_serving_pose_tracker_starts_at_its_camera_and_keeps_to_the_level():
    ep = make_episode(10_000, 32, 32, seconds=1.0)
    acts = walk_forward(160)
    tracker = PoseTracker(ep.fps, 32, 32, start=ep.c2w[0], level=ep.world)
    np.testing.assert_allclose(tracker.origin.numpy(), ep.c2w[0], atol=1e-6)
    walked = tracker.advance(torch.from_numpy(acts[1:])).numpy()
    np.testing.assert_allclose(walked, integrate_actions(acts, ep.c2w[0], ep.fps, level=ep.world)[1:], atol=1e-5)
    tracker.reset()
    np.testing.assert_allclose(tracker.current().numpy(), ep.c2w[0], atol=1e-6)


def embed(world: bool, c2w: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    emb = ActionEmbedding(32, ACTION_DIM, 4, (2, 2), world_frame=world)
    k = torch.tensor([[16.0, 16.0, 8.0, 8.0]]).expand(1, c2w.shape[1], 4)
    return emb(ActionInputs(torch.zeros(1, c2w.shape[1], ACTION_DIM), c2w, k), (c2w.shape[1], 2, 2))


@pytest.mark.parametrize("world", [False, True])
def test_world_frame_input_says_where_the_camera_is(world):
    """The same motion from two places: equal inputs with relative poses, different with world ones."""
    ep = make_episode(10_000, 32, 32, seconds=1.0)
    c2w = torch.from_numpy(ep.c2w[None, :17:4]).double()
    moved = c2w.clone()
    moved[..., 0, 3] += 2.0  # the whole walk 2 m to the east
    a, b = embed(world, c2w), embed(world, moved)
    if world:
        assert (a - b).abs().max() > 1e-2
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pose_frame_is_checked():
    with pytest.raises(ValueError, match=r"model.action.pose_frame='absolute': expected relative or world"):
        dataclasses.replace(ModelConfig(), action=ActionConfig(pose_frame="absolute")).validate()
    assert load_config().model.action.pose_frame == "world"  # the embedded default: one level


def test_a_world_frame_model_with_ray_octaves_reloads_as_itself(tmp_path):
    """pose_frame and ray_frequencies are part of the exported config: the reloaded model gives the
    same output, and its adapter reads 12 x octaves more camera features per token."""
    from titan_world.model import build_model, load_pretrained, save_pretrained
    from titan_world.model.action import camera_features

    cfg = load_config(None, ["model.dim=16", "model.ffn_dim=32", "model.num_heads=2", "model.num_layers=1"])
    cfg.model.action.ray_frequencies = 4
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # a fresh head and adapter are zero-initialised: wake them up so inputs matter
        torch.nn.init.normal_(model.head.head.weight, std=0.2)
        for block in model.blocks:
            torch.nn.init.normal_(block.action_proj.proj.weight, std=0.2)
    assert (
        model.action_embedding.net[0].in_features
        == camera_features(4, (2, 2), 4) + ACTION_DIM
        == 6 * 16 * 4 + 12 * 4 + 8
    )
    save_pretrained(model, tmp_path / "m")
    again = load_pretrained(tmp_path / "m")
    assert again.cfg.action.pose_frame == "world" and again.cfg.action.ray_frequencies == 4
    ep = make_episode(10_000, 16, 16, seconds=0.25)
    acts = ActionInputs.from_video_frames(
        torch.from_numpy(ep.actions[None, :5]),
        torch.from_numpy(ep.c2w[None, :5]),
        torch.from_numpy(ep.intrinsics[None, :5]),
    )
    x, cond = torch.randn(1, 16, 2, 4, 4), torch.zeros(1, 20, 2, 4, 4)
    cond[:, 0, 0] = 1
    ctx = torch.randn(1, 32, 64)
    args = (x, torch.tensor([500.0]), ctx)
    a = model(*args, cond=cond, actions=acts)
    torch.testing.assert_close(again(*args, cond=cond, actions=acts), a)
    moved = ActionInputs(acts.keys, acts.c2w.clone(), acts.intrinsics)
    moved.c2w[..., 0, 3] += 1.0
    assert (model(*args, cond=cond, actions=moved) - a).abs().max() > 1e-4  # where the camera is matters
