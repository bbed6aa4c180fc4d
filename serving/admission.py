"""Admission control: one GPU set serves one session; a bounded FIFO of clients waits for it."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable


class Busy(Exception):
    """The GPU set is taken and the waiting line is full; the text is sent to the client."""


class Admission:
    """`request(token)` -> a future that resolves when `token` holds the GPU set.

    Positions are 1-based; `on_change` is called (on the event loop) whenever the line moves, so
    waiting clients can be told where they stand.
    """

    def __init__(self, queue_size: int, on_change: Callable[[], None] | None = None):
        self.queue_size = max(0, queue_size)
        self.holder: Hashable | None = None
        self._waiting: deque[tuple[Hashable, asyncio.Future]] = deque()
        self._on_change = on_change or (lambda: None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def request(self, token: Hashable) -> asyncio.Future:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        if self.holder is None and not self._waiting:
            self.holder = token
            fut.set_result(True)
            return fut
        if len(self._waiting) >= self.queue_size:
            detail = f"{self.queue_size} already waiting" if self.queue_size else "this server does not queue"
            raise Busy(f"server busy: the GPU set is serving another session and {detail}; try again later")
        self._waiting.append((token, fut))
        self._on_change()
        return fut

    def position(self, token: Hashable) -> int:
        for i, (t, _) in enumerate(self._waiting):
            if t is token:
                return i + 1
        return 0

    def leave(self, token: Hashable) -> None:
        """Release the GPU set or the place in line, whichever `token` has; idempotent."""
        before = len(self._waiting)
        self._waiting = deque((t, f) for t, f in self._waiting if t is not token)
        changed = len(self._waiting) != before
        if self.holder is token:
            self.holder = None
            while self._waiting:
                t, f = self._waiting.popleft()
                if not f.done():
                    self.holder = t
                    f.set_result(True)
                    break
            changed = True
        if changed:
            self._on_change()
