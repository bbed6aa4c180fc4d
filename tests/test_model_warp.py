"""model.action.warp_cond: generated frames see their source frame re-projected to their camera."""

from __future__ import annotations

import numpy as np
import torch

from titan_world.conditioning import i2v_condition
from titan_world.data.actions import ACTION_DIM, MOUSE_DX, MOUSE_DY, integrate_actions
from titan_world.data.render import Renderer
from titan_world.data.synth import demo_level, make_episode
from titan_world.model.action import ActionInputs, warp_condition
from titan_world.model.codec import TinyCodec, frames_to_video

CODEC = TinyCodec(4, 16)


def turn(axis: int, rate: float) -> tuple[torch.Tensor, torch.Tensor, ActionInputs]:
    """A 17-frame turn in place in the demo level from a held-out start: (latents, i2v cond, actions)."""
    ep = make_episode(10000, 64, 64, seconds=1.2)
    acts = np.zeros((17, ACTION_DIM), np.float32)
    acts[1:, axis] = rate
    c2w = integrate_actions(acts, ep.c2w[0], 16).astype(np.float32)
    frames, _ = Renderer(demo_level(), 64, 64, ep.intrinsics[0]).render(c2w)
    latents = CODEC.encode(frames_to_video(frames[None]))
    given = torch.zeros(1, latents.shape[2], dtype=torch.bool)
    given[:, 0] = True
    a = ActionInputs.from_video_frames(
        torch.as_tensor(acts[None]), torch.as_tensor(c2w[None]), torch.as_tensor(ep.intrinsics[None, :17])
    )
    return latents, i2v_condition(latents, given), a


def in_view_errors(warped: torch.Tensor, latents: torch.Tensor, frame: int) -> tuple[float, float]:
    """(warped, copied) squared error against the true latent frame, on the tokens the warp fills."""
    w = warped[0, 4:, frame]
    seen = w.abs().sum(0) > 0
    true = latents[0, :, frame]
    return float(((w - true) ** 2)[:, seen].mean()), float(((latents[0, :, 0] - true) ** 2)[:, seen].mean())


def test_turning_warps_the_start_frame_toward_each_new_view():
    for axis, rate in ((MOUSE_DX, 0.5), (MOUSE_DX, -0.8), (MOUSE_DY, 0.6)):
        latents, cond, a = turn(axis, rate)
        warped = warp_condition(cond, a, 4)
        assert torch.equal(warped[:, :, 0], cond[:, :, 0])  # the given frame and every mask channel: as given
        assert torch.equal(warped[:, :4], cond[:, :4])
        for frame in (1, 2):
            err, copy = in_view_errors(warped, latents, frame)
            assert err < 0.8 * copy, (axis, rate, frame, err, copy)
        # the poses of the opposite turn move the picture the wrong way: worse than the right warp
        _, _, wrong = turn(axis, -rate)
        err_wrong, _ = in_view_errors(warp_condition(cond, wrong, 4), latents, 1)
        assert err_wrong > in_view_errors(warped, latents, 1)[0], (axis, rate)


def test_a_still_camera_copies_the_source_and_frames_without_one_stay_empty():
    latents, cond, a = turn(MOUSE_DX, 0.0)
    warped = warp_condition(cond, a, 4)
    for frame in range(1, latents.shape[2]):
        assert torch.allclose(warped[0, 4:, frame], latents[0, :, 0], atol=1e-5)
    nothing_given = cond.clone()
    nothing_given[:, :4] = 0  # the mask says no frame is given (a streamed chunk past the start)
    out = warp_condition(nothing_given, a, 4)
    assert torch.equal(out, nothing_given)  # nothing to re-project: the generated frames keep zeros
    assert out[:, 4:, 0].abs().sum() > 0  # (frame 0's channels hold latents, yet are no source)
