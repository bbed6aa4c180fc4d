"""Multi-GPU serving in one node: Ulysses over attention heads, one command stream.

Every rank holds the whole model and its share of the heads' KV cache; each model call is a
collective (all-to-all around attention), so all ranks must make the same calls in the same
order. Rank 0 runs the server; its engine is wrapped in `RankedEngine`, which broadcasts every
session call (start / denoise / set_prompt / reset / close) on a gloo control group before
running it locally; ranks > 0 sit in `worker_loop`, replaying them. Decode and JPEG are rank 0
only (not collective). Noise is drawn from the same seeded generator on every rank, so the
ranks agree on x without communication.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from serving.engine import Chunk, StageTimes

log = logging.getLogger("titan_world.serving")


class _Control:
    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def send(self, *cmd: Any) -> None:
        dist.broadcast_object_list([cmd], src=0, group=self.group)

    def recv(self) -> tuple:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class RankedSession:
    """Rank 0's view of a session: every state-changing call is mirrored on the other ranks."""

    def __init__(self, local, control: _Control):
        self.local, self.control = local, control
        self.frames_per_chunk = local.frames_per_chunk

    @property
    def times(self) -> StageTimes:
        return self.local.times

    def denoise(self, actions: torch.Tensor) -> Chunk:
        a = self.local.check_actions(actions)
        self.control.send("denoise", a)
        return self.local.denoise(a)

    def decode(self, chunk: Chunk) -> np.ndarray:
        return self.local.decode(chunk)

    def step(self, actions: torch.Tensor) -> np.ndarray:
        return self.decode(self.denoise(actions))

    def first_frames(self) -> np.ndarray:
        return self.local.first_frames()

    def set_prompt(self, text: str) -> None:
        self.control.send("set_prompt", text)
        self.local.set_prompt(text)

    def reset(self) -> None:
        self.control.send("reset")
        self.local.reset()

    def close(self) -> None:
        self.control.send("close")
        self.local.close()

    def check_actions(self, actions):
        return self.local.check_actions(actions)


class RankedEngine:
    """Wraps rank 0's engine; `shutdown()` releases the workers."""

    def __init__(self, engine, group: dist.ProcessGroup | None = None):
        self.engine, self.control = engine, _Control(group)
        for attr in ("name", "height", "width", "fps", "frames_per_chunk"):
            setattr(self, attr, getattr(engine, attr))

    def start(self, image: np.ndarray | None, prompt: str, seed: int | None = None) -> RankedSession:
        self.control.send("start", image, prompt, seed)
        return RankedSession(self.engine.start(image, prompt, seed), self.control)

    def shutdown(self) -> None:
        self.control.send("shutdown")


def worker_loop(engine, group: dist.ProcessGroup | None = None) -> None:
    """Ranks > 0: replay rank 0's session calls until it sends shutdown."""
    control, session = _Control(group), None
    while True:
        cmd, *args = control.recv()
        try:
            if cmd == "shutdown":
                return
            if cmd == "start":
                session = engine.start(*args)
            elif cmd == "denoise":
                session.denoise(*args)  # the latents are rank 0's to decode
            elif cmd == "set_prompt":
                session.set_prompt(*args)
            elif cmd == "reset":
                session.reset()
            elif cmd == "close":
                session.close()
                session = None
        except Exception:  # rank 0 hits the same error (same inputs) and reports it to its client
            log.exception("rank %d: %s failed", dist.get_rank(), cmd)
