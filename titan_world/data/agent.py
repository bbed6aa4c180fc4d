"""Scripted first-person agent: walks to landmarks and back, turns, looks around, stops, jumps.

The script chooses actions frame by frame from the simulated state and never walks into a wall:
a move that would bring the camera within `CLEARANCE` of a block is replaced by standing still,
and the *stored* action is the one actually applied, so integrating the stored actions always
reproduces the stored poses. Behaviours are logged as events for the dense captions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from titan_world.data.actions import (
    ACTION_DIM,
    MAX_PITCH_DEG_PER_S,
    MAX_YAW_DEG_PER_S,
    MOUSE_DX,
    MOUSE_DY,
    SHIFT,
    SPACE,
    A,
    CameraState,
    D,
    W,
    step_within,
)
from titan_world.data.world import World


@dataclass
class Event:
    start: int  # first frame (inclusive)
    end: int  # last frame (exclusive)
    kind: str  # walk | run | revisit | turn | look | stop | jump | strafe
    detail: dict = field(default_factory=dict)


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


class Agent:
    def __init__(self, world: World, rng: np.random.Generator, fps: float, num_frames: int):
        self.world, self.rng, self.fps, self.n = world, rng, fps, num_frames
        free = world.free_cells()
        r, c = free[int(rng.integers(len(free)))]
        self.state = CameraState(x=c + 0.5, z=r + 0.5, yaw=float(rng.uniform(-math.pi, math.pi)))
        self.states: list[CameraState] = [self.state]
        self.actions: list[np.ndarray] = [np.zeros(ACTION_DIM, np.float32)]
        self.events: list[Event] = []
        self.visited: list[str] = []  # landmark names reached, in order
        self.start_cell = (r, c)

    # -- primitives -------------------------------------------------------------------------
    @property
    def t(self) -> int:
        return len(self.actions)

    def act(self, a: np.ndarray) -> None:
        """Apply one action (dropping movement keys if they would hit a wall) and record it."""
        nxt, a = step_within(self.state, a.astype(np.float32), self.fps, self.world)
        self.state = nxt
        self.states.append(nxt)
        self.actions.append(a)

    def _left(self) -> int:
        return self.n - self.t

    def _yaw_rate(self) -> float:
        return math.radians(MAX_YAW_DEG_PER_S) / self.fps

    def turn_to(self, target_yaw: float, speed: float, keys: dict[int, float] | None = None) -> None:
        while self._left() > 0:
            err = _wrap(target_yaw - self.state.yaw)
            if abs(err) < 1e-6:
                return
            a = np.zeros(ACTION_DIM)
            a[MOUSE_DX] = float(np.clip(err / self._yaw_rate(), -speed, speed))
            for k, v in (keys or {}).items():
                a[k] = v
            self.act(a)

    def pitch_to(self, target: float, speed: float) -> None:
        rate = math.radians(MAX_PITCH_DEG_PER_S) / self.fps
        while self._left() > 0 and abs(target - self.state.pitch) > 1e-6:
            a = np.zeros(ACTION_DIM)
            a[MOUSE_DY] = float(np.clip((self.state.pitch - target) / rate, -speed, speed))
            self.act(a)

    # -- behaviours -------------------------------------------------------------------------
    def walk_to(self, goal: tuple[int, int], run: bool) -> bool:
        here = (int(math.floor(self.state.z)), int(math.floor(self.state.x)))
        path = self.world.shortest_path(here, goal)
        if not path:
            return False
        speed = float(self.rng.uniform(0.5, 1.0))
        for r, c in path:
            tx, tz = c + 0.5, r + 0.5
            guard = 0
            while self._left() > 0 and guard < 200:
                guard += 1
                dx, dz = tx - self.state.x, tz - self.state.z
                dist = math.hypot(dx, dz)
                step_len = 1.6 / self.fps * (2.0 if run else 1.0)
                if dist < step_len * 0.75:
                    break
                err = _wrap(math.atan2(dx, dz) - self.state.yaw)
                a = np.zeros(ACTION_DIM)
                a[MOUSE_DX] = float(np.clip(err / self._yaw_rate(), -speed, speed))
                if abs(err) < math.radians(25):
                    a[W] = 1.0
                    a[SHIFT] = float(run)
                before = (self.state.x, self.state.z)
                self.act(a)
                if a[W] and (self.state.x, self.state.z) == before and abs(err) < 1e-3:
                    return True  # blocked: give up quietly
            if self._left() <= 0:
                return True
        return True

    def look_around(self) -> dict:
        sweep = float(self.rng.uniform(0.6, 1.6)) * self.rng.choice([-1, 1])
        yaw0 = self.state.yaw
        speed = float(self.rng.uniform(0.4, 1.0))
        self.turn_to(yaw0 + sweep, speed)
        vertical = None
        if self.rng.random() < 0.6:
            vertical = "up" if self.rng.random() < 0.6 else "down"
            self.pitch_to(math.radians(30 if vertical == "up" else -30), speed)
            self.pitch_to(0.0, speed)
        self.turn_to(yaw0 - 0.5 * sweep, speed)
        return {"first": "right" if sweep > 0 else "left", "vertical": vertical}

    def run_script(self) -> None:
        """Fill the episode with randomly chosen behaviours until `num_frames` are recorded."""
        w = self.world
        while self._left() > 0:
            start = self.t
            u = self.rng.random()
            if u < 0.45:
                revisit = [l for l in w.landmarks if l.name in self.visited]
                if revisit and self.rng.random() < 0.4:
                    lm, kind = revisit[int(self.rng.integers(len(revisit)))], "revisit"
                else:
                    lm, kind = w.landmarks[int(self.rng.integers(len(w.landmarks)))], "walk"
                run = bool(self.rng.random() < 0.3)
                if not self.walk_to(lm.approach, run):
                    continue
                # face the landmark when arrived
                yaw = math.atan2(lm.cell[1] - lm.approach[1], lm.cell[0] - lm.approach[0])
                self.turn_to(yaw, 0.8)
                self.visited.append(lm.name)
                self.events.append(Event(start, self.t, "run" if run and kind == "walk" else kind, {"target": lm.name}))
            elif u < 0.6:
                turn = float(self.rng.choice([-1, 1])) * float(self.rng.uniform(math.pi / 4, math.pi))
                self.turn_to(self.state.yaw + turn, float(self.rng.uniform(0.4, 1.0)))
                self.events.append(Event(start, self.t, "turn", {"direction": "right" if turn > 0 else "left"}))
            elif u < 0.75:
                self.events.append(Event(start, start, "look", self.look_around()))
                self.events[-1].end = self.t
            elif u < 0.85:
                for _ in range(min(int(self.rng.integers(6, 20)), self._left())):
                    self.act(np.zeros(ACTION_DIM))
                self.events.append(Event(start, self.t, "stop"))
            elif u < 0.93:
                a = np.zeros(ACTION_DIM)
                a[SPACE] = 1.0
                a[W] = float(self.rng.random() < 0.5)
                self.act(a)
                while self._left() > 0 and self.state.lift > 0:
                    b = np.zeros(ACTION_DIM)
                    b[W] = a[W]
                    self.act(b)
                self.events.append(Event(start, self.t, "jump"))
            else:
                key = A if self.rng.random() < 0.5 else D
                for _ in range(min(int(self.rng.integers(4, 10)), self._left())):
                    a = np.zeros(ACTION_DIM)
                    a[key] = 1.0
                    self.act(a)
                self.events.append(Event(start, self.t, "strafe", {"direction": "left" if key == A else "right"}))
        self.events = [e for e in self.events if e.end > e.start]
