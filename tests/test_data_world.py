"""Synthetic world: determinism, action integration, Plücker consistency, render speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from titan_world.config import ConfigError, load_config
from titan_world.data.actions import ACTION_DIM, ACTION_NAMES, integrate_actions
from titan_world.data.loader import SYNTHETIC_CACHE, data_source
from titan_world.data.synth import make_episode
from titan_world.model.action import plucker_rays


def test_action_contract():
    assert ACTION_NAMES == ["w", "a", "s", "d", "space", "shift", "mouse_dx", "mouse_dy"] and ACTION_DIM == 8


def test_episode_deterministic_and_shapes():
    a, b = make_episode(3, 32, 48, 2.0), make_episode(3, 32, 48, 2.0)
    assert a.frames.shape == (33, 32, 48, 3) and a.frames.dtype == np.uint8
    assert a.actions.shape == (33, 8) and a.c2w.shape == (33, 4, 4) and a.intrinsics.shape == (33, 4)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.actions, b.actions)
    assert a.captions == b.captions and a.captions["narrative"] and a.captions["events"]
    assert not np.array_equal(a.frames, make_episode(4, 32, 48, 2.0).frames)
    assert set(np.unique(a.actions[:, :6])) <= {0.0, 1.0} and np.abs(a.actions[:, 6:]).max() <= 1.0


def test_integrating_actions_reproduces_poses():
    for seed in range(6):
        ep = make_episode(seed, 16, 16, 4.0)
        replay = integrate_actions(ep.actions, ep.c2w[0], ep.fps)
        np.testing.assert_allclose(replay, ep.c2w, atol=1e-5)
        moved = np.linalg.norm(np.diff(ep.c2w[:, :3, 3], axis=0), axis=1)
        walking = (ep.actions[1:, [0, 1, 2, 3]] > 0).any(1)
        assert (moved[~walking & (ep.c2w[1:, 1, 3] == ep.c2w[:-1, 1, 3])] < 1e-6).all()  # no keys, no jump: no move
        # the scripted agent never gets closer than CLEARANCE to a block
        cells = np.array(ep.meta["world"]["size"])
        assert cells.shape == (2,)
        assert ep.c2w[:, 1, 3].max() < 0  # camera above the floor (y down)


def test_forward_key_moves_along_camera_z():
    act = np.zeros((3, 8), np.float32)
    act[1:, 0] = 1.0
    c2w0 = np.eye(4)
    c2w0[:3, 3] = (2.5, -0.5, 2.5)
    poses = integrate_actions(act, c2w0, 16)
    step = poses[2, :3, 3] - poses[1, :3, 3]
    assert np.allclose(step / np.linalg.norm(step), poses[1, :3, 2])  # forward is the camera z axis
    turn = np.zeros((2, 8), np.float32)
    turn[1, 6] = 1.0  # mouse right -> yaw right: new forward has +x component when starting along +z
    assert integrate_actions(turn, c2w0, 16)[1, 0, 2] > 0


def test_plucker_rays_consistent_with_stored_poses():
    ep = make_episode(1, 16, 16, 1.0)
    c2w, k = torch.from_numpy(ep.c2w).double(), torch.from_numpy(ep.intrinsics).double()
    rays = plucker_rays(c2w, k, 16, 16)
    assert rays.shape == (len(c2w), 6, 16, 16)
    d = rays[:, 3:]
    assert torch.allclose(d.norm(dim=1), torch.ones(()).double())
    # pixel centres (7.5, 7.5) and (8.5, 8.5) straddle the principal point (8, 8): their mean
    # direction is the camera z axis in world coordinates
    centre = d[:, :, 7, 7] + d[:, :, 8, 8] + d[:, :, 7, 8] + d[:, :, 8, 7]
    centre = centre / centre.norm(dim=1, keepdim=True)
    assert torch.allclose(centre, c2w[:, :3, 2], atol=1e-6)
    # moments: o x d with o the camera centre, so m . d = 0 and d x m recovers o's component
    o = c2w[:, :3, 3, None, None].expand(-1, -1, 16, 16)
    assert torch.allclose(rays[:, :3], torch.cross(o, d, dim=1), atol=1e-9)
    assert torch.allclose((rays[:, :3] * d).sum(1), torch.zeros(()).double(), atol=1e-9)
    # any point o + s d is on the ray: its moment is the same
    assert torch.allclose(torch.cross(o + 2.0 * d, d, dim=1), rays[:, :3], atol=1e-9)


def test_plucker_rays_keep_float32_under_autocast():
    """Mixed-precision training (autocast bf16, the default on CUDA) computes the rays in the poses'
    precision: before, the einsum went bf16 and `torch.cross` refused the fp32 origin."""
    ep = make_episode(2, 16, 16, 0.5)
    c2w, k = torch.from_numpy(ep.c2w).float(), torch.from_numpy(ep.intrinsics).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rays = plucker_rays(c2w, k, 16, 16)
    assert rays.dtype == torch.float32
    assert torch.equal(rays, plucker_rays(c2w, k, 16, 16))


def test_render_speed_64():
    make_episode(0, 64, 64, 1.0)  # warm caches (textures)
    t0 = time.perf_counter()
    n = sum(make_episode(s, 64, 64, 4.0).num_frames for s in range(3))
    fps = n / (time.perf_counter() - t0)
    assert fps > 150, f"synth renders {fps:.0f} frames/s at 64x64"  # ~1000 on an idle core; loose for busy CI


def test_demo_level_is_one_map_walked_by_different_agents():
    """data.synth_level=demo (the default): every seed walks the same town (only the agent
    differs), so held-out seeds are new trajectories through the level the model learned;
    random: a new town per seed."""
    a, b = make_episode(0, 16, 16, 1.0), make_episode(7, 16, 16, 1.0)
    assert a.meta["world"] == b.meta["world"] and a.meta["level"] == "demo"
    assert not np.array_equal(a.c2w[0], b.c2w[0])  # another start and route
    r, s = make_episode(0, 16, 16, 1.0, level="random"), make_episode(7, 16, 16, 1.0, level="random")
    assert r.meta["world"] != s.meta["world"]
    with pytest.raises(ValueError, match="level='town': expected one of demo, random"):
        make_episode(0, 16, 16, 1.0, level="town")


def test_synth_level_is_checked_and_keys_the_dataset_cache():
    with pytest.raises(ConfigError, match="data.synth_level='town': expected one of demo, random"):
        load_config(None, ["data.synth_level=town"])
    demo, rand = (data_source(load_config(None, [f"data.synth_level={lv}"])).path for lv in ("demo", "random"))
    assert demo != rand and demo.startswith(str(SYNTHETIC_CACHE / "synthetic-"))
