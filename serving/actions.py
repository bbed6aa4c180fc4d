"""Turning client input messages into per-frame action vectors.

The client sends the *held* keys and the mouse movement since its last message (normalised: 1.0 =
the maximum turn per frame of the synthetic world). Between chunks the server accumulates them;
each chunk takes the keys held now and spreads the accumulated mouse movement over its frames
(clamped to one maximum turn per frame, the rest is dropped, never queued: no unbounded lag).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from titan_world.data.actions import ACTION_DIM, KEY_NAMES

MAX_KEYS = 16


class ActionError(ValueError):
    """A malformed action message; the text is sent to the client."""


@dataclass
class ParsedAction:
    keys: list[str]
    mouse: tuple[float, float]


def parse_action(msg: dict) -> ParsedAction:
    """Validate {"type": "action", "keys": [...], "mouse": [dx, dy]}; unknown key names are ignored."""
    keys = msg.get("keys", [])
    mouse = msg.get("mouse", [0.0, 0.0])
    if not isinstance(keys, list) or len(keys) > MAX_KEYS or not all(isinstance(k, str) for k in keys):
        raise ActionError(f'"keys" must be a list of at most {MAX_KEYS} strings, e.g. ["w", "shift"]')
    if (
        not isinstance(mouse, list)
        or len(mouse) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mouse)
    ):
        raise ActionError('"mouse" must be [dx, dy], two finite numbers')
    names = [k.lower() if k != " " else "space" for k in keys]
    return ParsedAction([k for k in names if k in KEY_NAMES], (float(mouse[0]), float(mouse[1])))


@dataclass
class ActionAccumulator:
    """Latest held keys + summed mouse since the last chunk. Thread-safe (loop writes, worker reads)."""

    max_mouse: float = 64.0  # cap on the accumulated movement (in max-turns), so a burst cannot lag
    _keys: list[str] = field(default_factory=list)
    _mouse: list[float] = field(default_factory=lambda: [0.0, 0.0])
    _lock: threading.Lock = field(default_factory=threading.Lock)
    updates: int = 0

    def update(self, action: ParsedAction) -> None:
        with self._lock:
            self._keys = list(action.keys)
            for i in (0, 1):
                self._mouse[i] = max(-self.max_mouse, min(self.max_mouse, self._mouse[i] + action.mouse[i]))
            self.updates += 1

    def clear(self) -> None:
        with self._lock:
            self._keys, self._mouse = [], [0.0, 0.0]

    def take(self, num_frames: int) -> torch.Tensor:
        """Actions [num_frames, 8] for the next chunk; resets the mouse accumulator."""
        with self._lock:
            keys, (dx, dy) = list(self._keys), self._mouse
            self._mouse = [0.0, 0.0]
        out = torch.zeros(num_frames, ACTION_DIM)
        for k in keys:
            out[:, KEY_NAMES.index(k)] = 1.0
        out[:, 6] = max(-1.0, min(1.0, dx / num_frames))
        out[:, 7] = max(-1.0, min(1.0, dy / num_frames))
        return out

    def snapshot(self) -> dict:
        with self._lock:
            return {"keys": list(self._keys), "mouse": list(self._mouse), "updates": self.updates}
