"""The action vector shared by the data, the model and serving (fixed contract, CONTRACTS.md).

Per video frame: `[w, a, s, d, space, shift, mouse_dx, mouse_dy]`. Keys are 0/1. Mouse deltas
are normalised so that 1.0 is the largest turn the synthetic world allows in one frame
(`MAX_YAW_DEG_PER_S / fps` degrees of yaw, `MAX_PITCH_DEG_PER_S / fps` of pitch); positive
`mouse_dx` turns right, positive `mouse_dy` (mouse moved down) looks down.

`actions[t]` is what was held between frame t-1 and frame t (so `actions[0]` has no effect on
the trajectory); each frame's camera is `step(state[t-1], actions[t])`: rotate first, then move
in the new heading, then apply the vertical (jump) dynamics. `integrate_actions` replays this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

ACTION_NAMES: list[str] = ["w", "a", "s", "d", "space", "shift", "mouse_dx", "mouse_dy"]
ACTION_DIM: int = 8
KEY_NAMES: list[str] = ACTION_NAMES[:6]
W, A, S, D, SPACE, SHIFT, MOUSE_DX, MOUSE_DY = range(ACTION_DIM)

# Kinematics of the synthetic world (metres, seconds; one map cell = 1 m).
WALK_SPEED = 1.6  # m/s
RUN_FACTOR = 2.0  # shift
MAX_YAW_DEG_PER_S = 120.0
MAX_PITCH_DEG_PER_S = 80.0
PITCH_LIMIT_DEG = 35.0
EYE_HEIGHT = 0.5
JUMP_SPEED = 2.4  # m/s upwards at take-off
GRAVITY = 9.8
CLEARANCE = 0.2  # metres the camera keeps from any block of a level (`step_within`)


class Level(Protocol):
    """What moving through a level needs of it (titan_world.data.world.World)."""

    def is_free(self, row: int, col: int) -> bool: ...


@dataclass(frozen=True)
class CameraState:
    """Agent state: ground position (x, z), height above eye level, heading and vertical speed."""

    x: float
    z: float
    yaw: float = 0.0  # radians, 0 = looking along +z, positive = turned right
    pitch: float = 0.0  # radians, positive = looking up
    lift: float = 0.0  # metres above the standing eye height (jumps)
    vy: float = 0.0  # vertical speed, m/s upwards


def step(state: CameraState, action: np.ndarray, fps: float) -> CameraState:
    """Advance one frame under `action` (length-8 vector)."""
    a = np.asarray(action, dtype=np.float64)
    yaw = state.yaw + float(a[MOUSE_DX]) * math.radians(MAX_YAW_DEG_PER_S) / fps
    lim = math.radians(PITCH_LIMIT_DEG)
    pitch = min(lim, max(-lim, state.pitch - float(a[MOUSE_DY]) * math.radians(MAX_PITCH_DEG_PER_S) / fps))
    fwd = float(a[W] > 0.5) - float(a[S] > 0.5)
    right = float(a[D] > 0.5) - float(a[A] > 0.5)
    norm = math.hypot(fwd, right)
    x, z = state.x, state.z
    if norm > 0:
        dist = WALK_SPEED / fps * (RUN_FACTOR if a[SHIFT] > 0.5 else 1.0) / norm
        sy, cy = math.sin(yaw), math.cos(yaw)
        x += dist * (fwd * sy + right * cy)
        z += dist * (fwd * cy - right * sy)
    lift, vy = state.lift, state.vy
    if a[SPACE] > 0.5 and lift <= 0.0:
        vy = JUMP_SPEED
    if lift > 0.0 or vy > 0.0:
        vy -= GRAVITY / fps
        lift += vy / fps
        if lift <= 0.0:
            lift, vy = 0.0, 0.0
    return replace(state, x=x, z=z, yaw=yaw, pitch=pitch, lift=lift, vy=vy)


def rotation(yaw: float, pitch: float) -> np.ndarray:
    """Camera-to-world rotation (OpenCV camera; world y points down): R_y(yaw) @ R_x(pitch)."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return ry @ rx


def state_to_c2w(state: CameraState) -> np.ndarray:
    """4x4 camera-to-world. World: x east, y down (floor at y = 0), z north; one cell = 1 m."""
    m = np.eye(4)
    m[:3, :3] = rotation(state.yaw, state.pitch)
    m[:3, 3] = (state.x, -(EYE_HEIGHT + state.lift), state.z)
    return m


def c2w_to_state(c2w: np.ndarray, vy: float = 0.0) -> CameraState:
    """Inverse of `state_to_c2w` (vertical speed is not part of a pose; pass it if known)."""
    f = c2w[:3, 2]
    return CameraState(
        x=float(c2w[0, 3]),
        z=float(c2w[2, 3]),
        yaw=math.atan2(f[0], f[2]),
        pitch=math.asin(max(-1.0, min(1.0, -f[1]))),
        lift=float(-c2w[1, 3] - EYE_HEIGHT),
        vy=vy,
    )


def clear_of_blocks(level: Level, state: CameraState, clearance: float = CLEARANCE) -> bool:
    """Whether the camera is at least `clearance` from every block of `level` (the cells under the
    four corners of its clearance square are free)."""
    return all(
        level.is_free(int(math.floor(z)), int(math.floor(x)))
        for x in (state.x - clearance, state.x + clearance)
        for z in (state.z - clearance, state.z + clearance)
    )


def step_within(
    state: CameraState, action: np.ndarray, fps: float, level: Level | None = None
) -> tuple[CameraState, np.ndarray]:
    """`step` inside `level`: a move that would bring the camera within CLEARANCE of a block is
    dropped (turning and jumping still apply), the rule the scripted agent's stored actions obey,
    so a camera replayed or driven by a user stays where the data's cameras were.
    -> (the next state, the action applied)."""
    nxt = step(state, action, fps)
    if level is None or clear_of_blocks(level, nxt):
        return nxt, action
    applied = np.array(action, copy=True)
    applied[[W, A, S, D, SHIFT]] = 0.0
    return step(state, applied, fps), applied


def integrate_actions(
    actions: np.ndarray, c2w0: np.ndarray, fps: float, vy0: float = 0.0, level: Level | None = None
) -> np.ndarray:
    """Replay `actions [T, 8]` from the first pose (inside `level` when given: `step_within`):
    returns c2w [T, 4, 4] (float64)."""
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
        raise ValueError(f"actions have shape {actions.shape}; expected [T, {ACTION_DIM}]")
    state = c2w_to_state(np.asarray(c2w0, dtype=np.float64), vy0)
    out = np.empty((len(actions), 4, 4))
    out[0] = state_to_c2w(state)
    for t in range(1, len(actions)):
        state, _ = step_within(state, actions[t], fps, level)
        out[t] = state_to_c2w(state)
    return out


def shuffled_actions(actions: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same actions in a random order (frame 0's kept): the baseline a model that ignores its
    controls matches (`eval action` and the training action check; replay them with
    `integrate_actions` for the camera path they produce)."""
    perm = np.concatenate([[0], 1 + np.random.default_rng(seed).permutation(len(actions) - 1)])
    return actions[perm]


def describe(action: np.ndarray) -> str:
    """Human-readable action, e.g. 'w+shift dx=0.50'."""
    keys = [n for n, v in zip(KEY_NAMES, action[:6]) if v > 0.5]
    mouse = [f"{n[-2:]}={action[i]:+.2f}" for i, n in ((MOUSE_DX, "dx"), (MOUSE_DY, "dy")) if abs(action[i]) > 1e-6]
    return " ".join(["+".join(keys) or "-"] + mouse)
