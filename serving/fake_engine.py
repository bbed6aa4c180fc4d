"""TEST DOUBLE: a deterministic, model-free engine for server and browser tests.

Never used by `titan-world serve` unless `--engine fake` is asked for explicitly. Frames are a
flat colour (from the prompt) with a white square whose position integrates the actions, so a
test can see that input reached the engine. It can be told to be slow or to fail, to exercise
the server's error and disconnect paths.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque

import numpy as np
import torch

from serving.engine import BaseSession, Chunk, EngineError
from titan_world.model.codec import TEMPORAL_STRIDE


def _prompt_color(prompt: str) -> np.ndarray:
    h = hashlib.sha1(prompt.encode()).digest()
    return np.array([64 + h[0] % 160, 64 + h[1] % 160, 64 + h[2] % 160], dtype=np.uint8)


class FakeSession(BaseSession):
    def __init__(self, engine: FakeEngine, image: np.ndarray | None, prompt: str, seed: int):
        super().__init__()
        self.engine, self.image, self.seed = engine, image, seed
        self.frames_per_chunk = engine.frames_per_chunk
        self.prompt = prompt
        self.reset()

    def reset(self) -> None:
        self.x, self.y, self.chunks = self.engine.width / 2, self.engine.height / 2, 0

    def set_prompt(self, text: str) -> None:
        if "explode" in text:
            raise EngineError("the fake engine was told to fail on this prompt")
        self.prompt = text

    def first_frames(self) -> np.ndarray:
        if self.image is not None:
            return np.asarray(self.image, dtype=np.uint8)[None]
        return self._render(self.x, self.y)[None]

    def denoise(self, actions: torch.Tensor) -> Chunk:
        a = self.check_actions(actions)
        e = self.engine
        with e.lock:
            e.received.append(a.clone())
            e.chunks_total += 1
        if e.delay_s:
            time.sleep(e.delay_s)
        if e.fail_on_chunk is not None and self.chunks == e.fail_on_chunk:
            raise RuntimeError(f"fake generation failure at chunk {self.chunks}")
        positions = []
        for f in range(a.shape[0]):
            self.x = (self.x + 2.0 * (a[f, 3] - a[f, 1]).item() + 4.0 * a[f, 6].item()) % e.width
            self.y = (self.y + 2.0 * (a[f, 2] - a[f, 0]).item() + 4.0 * a[f, 7].item()) % e.height
            positions.append((self.x, self.y))
        chunk = Chunk(self.chunks, positions, a.shape[0])
        self.chunks += 1
        return chunk

    def decode(self, chunk: Chunk) -> np.ndarray:
        return np.stack([self._render(x, y) for x, y in chunk.payload])

    def _render(self, x: float, y: float) -> np.ndarray:
        e = self.engine
        frame = np.empty((e.height, e.width, 3), dtype=np.uint8)
        frame[:] = _prompt_color(self.prompt)
        s = max(2, e.width // 8)
        x0, y0 = int(x) % e.width, int(y) % e.height
        frame[y0 : y0 + s, x0 : x0 + s] = 255
        return frame


class FakeEngine:
    """TEST DOUBLE (see module docstring). `received` keeps the last 256 action chunks."""

    name = "fake"

    def __init__(
        self,
        height: int = 64,
        width: int = 64,
        fps: float = 16.0,
        chunk_frames: int = 1,
        delay_s: float = 0.0,
        fail_on_chunk: int | None = None,
    ):
        self.height, self.width, self.fps = height, width, fps
        self.frames_per_chunk = TEMPORAL_STRIDE * chunk_frames
        self.delay_s, self.fail_on_chunk = delay_s, fail_on_chunk
        self.received: deque[torch.Tensor] = deque(maxlen=256)
        self.chunks_total = 0
        self.lock = threading.Lock()

    def start(self, image: np.ndarray | None, prompt: str, seed: int | None = None) -> FakeSession:
        if "explode" in prompt:
            raise EngineError("the fake engine was told to fail on this prompt")
        return FakeSession(self, image, prompt, seed or 0)
