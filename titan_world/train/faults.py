"""What a training loop does about faults, shared by `train` and `post-train`.

* `StopFlag`: SIGUSR1/SIGTERM (preemption) and the first Ctrl-C ask the loop to finish its step,
  write a checkpoint and exit (EXIT_PREEMPTED, or EXIT_INTERRUPTED after a Ctrl-C); a second
  Ctrl-C exits at once (KeyboardInterrupt). The previous handlers are restored on exit.
* `NonFiniteGuard`: a step whose loss or gradient norm is not finite is skipped (no optimizer
  step, no checkpoint inside a streak of them); more than `train.max_bad_steps` in a row stop
  the run with EXIT_DIVERGED, naming the last good checkpoint.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from titan_world.exit_codes import EXIT_INTERRUPTED, EXIT_PREEMPTED
from titan_world.model.io import CheckpointError

PREEMPT, INTERRUPT = 1.0, 2.0  # StopFlag.code values (the larger wins across ranks)


class StopFlag:
    """SIGUSR1/SIGTERM -> finish the step, checkpoint, exit EXIT_PREEMPTED. SIGINT (Ctrl-C): the
    same, exit EXIT_INTERRUPTED; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.code = 0.0  # 0: run on; PREEMPT; INTERRUPT
        self.previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.code > 0

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if signum != signal.SIGINT:
            self.code = max(self.code, PREEMPT)
            return
        if self.code == INTERRUPT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, progress since the last checkpoint is lost
        self.code = INTERRUPT
        print(
            f"\n[{self.tag}] Ctrl-C: writing a checkpoint at the end of this step, then exiting "
            "(press Ctrl-C again to exit at once without one)",
            file=sys.stderr,
            flush=True,
        )

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self.previous.clear()


def stop_exit_code(code: float) -> int:
    """The exit code after the checkpoint a stop request asked for."""
    return EXIT_INTERRUPTED if code >= INTERRUPT else EXIT_PREEMPTED


def stop_message(tag: str, code: float, checkpoint: object) -> str:
    why = "interrupted (Ctrl-C)" if code >= INTERRUPT else "preempted"
    return f"[{tag}] {why}: checkpoint {checkpoint} written; exiting {stop_exit_code(code)} (continue with --resume)"


def finite_on_all_ranks(values: Iterable[float], device: torch.device) -> bool:
    """True when every value (a loss, a gradient norm) is finite on every rank: the ranks agree on
    skipping an update (one tiny all-reduce when there are several)."""
    bad = torch.tensor([float(not all(math.isfinite(v) for v in values))], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


class NonFiniteGuard:
    """Counts skipped (non-finite) steps in `position` ('skipped', 'bad_streak'; checkpointed with
    it) and decides when the run stops. `log` prints on rank 0; `last_checkpoint` names the newest
    good checkpoint for the stop message."""

    def __init__(
        self,
        position: dict,
        max_bad_steps: int,
        tag: str,
        log: Callable[[str], None],
        last_checkpoint: Callable[[], object],
    ) -> None:
        position.setdefault("skipped", 0)
        position.setdefault("bad_streak", 0)
        self.position, self.max_bad, self.tag = position, max_bad_steps, tag
        self.log, self.last_checkpoint = log, last_checkpoint

    @property
    def in_streak(self) -> bool:
        """Inside a run of skipped steps: no periodic checkpoint (the last one stays the last good one)."""
        return self.position["bad_streak"] > 0

    def after_step(self, step: int, loss: float, skipped: bool) -> bool:
        """Record step `step`; True when the run must stop (exit EXIT_DIVERGED)."""
        pos = self.position
        if not skipped:
            pos["bad_streak"] = 0
            return False
        pos["skipped"] += 1
        pos["bad_streak"] += 1
        streak = pos["bad_streak"]
        self.log(f"[{self.tag}] step {step}: non-finite loss/grad ({loss}), step skipped ({streak} in a row)")
        if streak <= self.max_bad:
            return False
        try:
            last = self.last_checkpoint()
        except CheckpointError:  # every checkpoint failed validation (each was logged by the checkpointer)
            last = None
        self.log(
            f"[{self.tag}] stopping at step {step}: {streak} consecutive non-finite losses "
            f"(train.max_bad_steps={self.max_bad}). The last good checkpoint is {last or '(none saved yet)'}; "
            "lower the learning rate or check the data, then --resume."
        )
        return True
