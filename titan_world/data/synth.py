"""One synthetic episode: world + scripted agent + rendering + captions, all from one seed.

Two kinds of level (`data.synth_level`): `demo` is one fixed walled courtyard (`world.courtyard`)
that every episode explores (the seed drives only the agent: start, route, behaviour), one level
for a small model to learn, as game world models do; `random` generates a new town per episode
(the seed drives both), the varied data the pipeline and tests use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from titan_world.data.actions import integrate_actions, state_to_c2w
from titan_world.data.agent import Agent
from titan_world.data.captions import build_captions
from titan_world.data.config import SYNTH_LEVELS
from titan_world.data.geometry import default_intrinsics
from titan_world.data.render import Renderer
from titan_world.data.world import World, courtyard, generate_world

DEMO_LEVEL_SIZE = 9  # a 9 x 9 courtyard: 7 x 7 m of open sand inside four walls


@cache
def demo_level() -> World:
    """The fixed demo level (read-only: agents only walk it)."""
    return courtyard(DEMO_LEVEL_SIZE)


@dataclass
class Episode:
    episode_id: str
    frames: np.ndarray  # uint8 [T, H, W, 3]
    actions: np.ndarray  # float32 [T, 8]
    c2w: np.ndarray  # float32 [T, 4, 4] (OpenCV camera-to-world)
    intrinsics: np.ndarray  # float32 [T, 4] fx, fy, cx, cy (pixels)
    captions: dict
    fps: int
    source: str
    meta: dict
    world: World | None = None  # the level walked (synthetic episodes): where a replayed camera must stay

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def camera_path(self, actions: np.ndarray) -> np.ndarray:
        """c2w float32 [T, 4, 4] that other `actions` produce from this episode's first pose, kept
        inside its level as the simulator would (the shuffled-action baseline's camera)."""
        return integrate_actions(actions, self.c2w[0], self.fps, level=self.world).astype(np.float32)


def episode_frames(seconds: float, fps: int) -> int:
    """Frames of an episode of ~`seconds`: rounded to 1 + 4k so the whole episode is encodable."""
    k = max(1, round(seconds * fps / 4))
    return 1 + 4 * k


def make_episode(
    seed: int,
    height: int = 64,
    width: int = 64,
    seconds: float = 4.0,
    fps: int = 16,
    hfov_deg: float = 90.0,
    level: str = "demo",
) -> Episode:
    """Deterministic given (seed, size, seconds, fps, level)."""
    if level not in SYNTH_LEVELS:
        raise ValueError(f"level={level!r}: expected one of {', '.join(SYNTH_LEVELS)} (data.synth_level)")
    rng = np.random.default_rng([seed, 0x7177])
    world = demo_level() if level == "demo" else generate_world(rng)
    n = episode_frames(seconds, fps)
    agent = Agent(world, rng, fps, n)
    agent.run_script()
    c2w = np.stack([state_to_c2w(s) for s in agent.states])
    k = default_intrinsics(height, width, hfov_deg)
    frames, ids = Renderer(world, height, width, k).render(c2w)
    captions = build_captions(world, agent.events, ids, fps)
    return Episode(
        episode_id=f"synth-{seed:08d}",
        frames=frames,
        actions=np.stack(agent.actions).astype(np.float32),
        c2w=c2w.astype(np.float32),
        intrinsics=np.repeat(k[None].astype(np.float32), n, axis=0),
        captions=captions,
        fps=fps,
        source="synthetic",
        meta={"seed": seed, "level": level, "world": world.description(), "hfov_deg": hfov_deg},
        world=world,
    )
