"""The stateful streaming API every serving engine implements.

`engine.start(image|video|None, prompt, seed) -> Session`; `session.step(actions) -> frames`.
A step is split into `denoise` (the model, owns the GPU set) and `decode` (codec + uint8), so the
server can pipeline them: chunk N is decoded while chunk N+1 is being denoised. Only one thread
calls `denoise`/`set_prompt`/`reset` of a session (the GPU worker); `decode` may run on another
thread and must only touch the chunk it is given plus decoder state it owns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from titan_world.data.actions import ACTION_DIM
from titan_world.model.codec import TEMPORAL_STRIDE


class EngineError(RuntimeError):
    """A user-facing generation problem (bad input, model failure); the server reports its text."""


@dataclass
class StageTimes:
    """Seconds spent per stage for the last chunk (for status messages and the benchmark)."""

    denoise: float = 0.0
    kv_refresh: float = 0.0
    decode: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Chunk:
    """What `denoise` hands to `decode`: latents (or anything the engine's decode understands)."""

    index: int
    payload: Any
    num_frames: int
    created: float = field(default_factory=time.perf_counter)


@runtime_checkable
class Session(Protocol):
    frames_per_chunk: int
    times: StageTimes

    def denoise(self, actions: torch.Tensor) -> Chunk: ...
    def decode(self, chunk: Chunk) -> np.ndarray: ...
    def step(self, actions: torch.Tensor) -> np.ndarray: ...
    def first_frames(self) -> np.ndarray: ...
    def set_prompt(self, text: str) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    name: str
    height: int
    width: int
    fps: float
    frames_per_chunk: int

    def start(self, image: np.ndarray | None, prompt: str, seed: int | None = None) -> Session: ...


class BaseSession:
    """Shared plumbing: action validation and `step = decode(denoise(actions))`."""

    frames_per_chunk: int = TEMPORAL_STRIDE

    def __init__(self) -> None:
        self.times = StageTimes()

    def check_actions(self, actions: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Actions for the chunk's video frames: [N, 8] (N = frames_per_chunk); [8] repeats."""
        a = torch.as_tensor(np.asarray(actions, dtype=np.float32) if not torch.is_tensor(actions) else actions).float()
        if a.ndim == 1:
            a = a.unsqueeze(0)
        if a.ndim != 2 or a.shape[1] != ACTION_DIM:
            raise EngineError(f"actions have shape {tuple(a.shape)}; expected [N, {ACTION_DIM}] per video frame")
        n = self.frames_per_chunk
        if a.shape[0] < n:  # hold the last action for the rest of the chunk
            a = torch.cat([a, a[-1:].expand(n - a.shape[0], -1)])
        a = a[:n].clone()
        a[:, :6] = a[:, :6].clamp(0, 1)
        a[:, 6:] = a[:, 6:].clamp(-1, 1)
        return a

    def step(self, actions: torch.Tensor) -> np.ndarray:
        return self.decode(self.denoise(actions))  # type: ignore[attr-defined]

    def close(self) -> None:
        pass


def image_to_tensor(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [H, W, 3] (or [T, H, W, 3]) -> float [1, 3, T, height, width] in [-1, 1], resized."""
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise EngineError(f"image has shape {arr.shape} dtype {arr.dtype}; expected uint8 [H, W, 3] or [T, H, W, 3]")
    x = torch.from_numpy(arr).permute(3, 0, 1, 2).float() / 127.5 - 1  # 3, T, H, W
    if x.shape[-2:] != (height, width):
        x = torch.nn.functional.interpolate(
            x, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
    return x.unsqueeze(0).clamp(-1, 1)
