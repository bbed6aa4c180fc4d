"""Camera pose integrated from the user's actions, with the synthetic world's motion model.

The engine must turn key/mouse input into the camera poses the action adapter was trained on, so
it reuses `titan_world.data.actions.step` (the simulator's own kinematics) frame by frame. The
current state and the poses of the last `history` latent frames are kept (the anchor of a long
session's action poses): O(1) memory however long the session runs.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from titan_world.data.actions import CameraState, Level, c2w_to_state, state_to_c2w, step_within
from titan_world.data.geometry import default_intrinsics


class PoseTracker:
    """`start`: the start image's camera (c2w [4, 4]; default the origin); `level`: the level it is in,
    whose blocks the camera keeps clear of (`step_within`), as the data's cameras did."""

    def __init__(
        self,
        fps: float,
        height: int,
        width: int,
        history: int = 1,
        start: np.ndarray | None = None,
        level: Level | None = None,
    ):
        self.fps, self.history, self.level = fps, history, level
        self.start = CameraState(x=0.0, z=0.0) if start is None else c2w_to_state(np.asarray(start, np.float64))
        self.intrinsics = torch.as_tensor(default_intrinsics(height, width), dtype=torch.float32)
        self.reset()

    def reset(self) -> None:
        self.state = self.start
        self.origin = torch.as_tensor(state_to_c2w(self.state), dtype=torch.float32)
        self._latent: deque[tuple[int, torch.Tensor]] = deque(maxlen=self.history)

    def record(self, first_frame: int, c2w: torch.Tensor) -> None:
        """Remember the poses [n, 4, 4] of latent frames first_frame .. first_frame + n - 1."""
        for i, pose in enumerate(c2w):
            self._latent.append((first_frame + i, pose))

    def at(self, frame: int) -> torch.Tensor:
        """The pose of latent frame `frame` (one of the last `history` recorded)."""
        for f, pose in self._latent:
            if f == frame:
                return pose
        raise KeyError(f"latent frame {frame}: only the last {self.history} poses are kept")

    def current(self) -> torch.Tensor:
        return torch.as_tensor(state_to_c2w(self.state), dtype=torch.float32)

    def advance(self, actions: torch.Tensor) -> torch.Tensor:
        """Apply actions [T, 8] (one per video frame); returns the c2w after each frame [T, 4, 4]."""
        poses = []
        for a in actions.detach().cpu().numpy().astype(np.float64):
            self.state, _ = step_within(self.state, a, self.fps, self.level)
            poses.append(state_to_c2w(self.state))
        return torch.as_tensor(np.stack(poses), dtype=torch.float32)
