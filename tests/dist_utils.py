"""Run a function in N real processes (gloo, CPU) reliably.

- No port races: the parent hosts the TCPStore on an OS-assigned port (port=0) and the children
  join it as clients exactly as under torchrun (TORCHELASTIC_USE_AGENT_STORE=True), so the normal
  `init_distributed()` env:// path is exercised.
- Timeouts: the whole run is bounded; on timeout or the first failure every child is killed (by
  its pid, process group included) and the error with the child's traceback is raised.
- Results: each rank's return value is pickled into a temp dir and returned as a list by rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist


def _child(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, args: tuple, kwargs: dict) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RESTART_COUNT="0",
        OMP_NUM_THREADS="1",
        TORCHINDUCTOR_COMPILE_THREADS="1",  # no compile-worker pool: fewer processes/semaphores to leak
    )
    import torch

    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException:  # report everything, including SystemExit from a worker
        result = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    with open(path, "wb") as f:
        pickle.dump(result, f)
    if result[0] == "error":
        raise SystemExit(1)  # non-zero exit: the parent stops waiting for the other ranks


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
    """Call `fn(*args, **kwargs)` on `world_size` spawned ranks; return their results by rank.

    `fn` must be importable (module level) and call `parallel.init_distributed()` itself.
    """
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=timeout), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="titan-dist-") as out_dir:
        procs = [
            ctx.Process(target=_child, args=(fn, r, world_size, store.port, out_dir, args, kwargs), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in procs):
                failed = [p for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            results: list[Any] = []
            errors: list[str] = []
            for r, p in enumerate(procs):
                path = Path(out_dir) / f"rank{r}.pkl"
                if path.exists():
                    status, value = pickle.loads(path.read_bytes())
                    if status == "error":
                        errors.append(f"--- rank {r} ---\n{value}")
                    results.append(value)
                else:
                    state = "timed out" if p.is_alive() else f"exit code {p.exitcode}"
                    errors.append(f"--- rank {r}: no result ({state}) ---")
                    results.append(None)
            if errors:
                raise RuntimeError(
                    f"distributed run of {fn.__name__} on {world_size} ranks failed:\n" + "\n".join(errors)
                )
            return results
        finally:
            _reap(procs)
            del store


def _reap(procs: list) -> None:
    """Terminate, then kill, any child still alive; always join so no zombie is left."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=5)
