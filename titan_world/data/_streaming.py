"""The one place that imports mosaicml-streaming.

`streaming/__init__.py` eagerly imports `streaming.vision`, which needs torchvision (never installed
beside the CPU torch wheel; scripts/install.sh installs streaming without its dependencies). Registering
an empty module first keeps the import light; nothing in titan-world uses the vision datasets.

Shared-memory hygiene: streaming keeps its coordination state in `/dev/shm/<prefix>_*` and
file locks in the temp dir. `streaming.base.util.clean_stale_shared_memory()` unlinks *every*
prefix (live ones of other jobs too), so on a shared machine (or under pytest-xdist) we use
`release_prefix` for our own datasets and `clean_stale_shared_memory` below, which only removes
prefixes that no live process maps. `prefix_lock` + `_agree_on_prefix` close the races of
streaming's prefix choice between jobs and between the ranks of a node.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import re
import socket
import sys
import tempfile
import types
from multiprocessing.shared_memory import SharedMemory

if "streaming.vision" not in sys.modules:
    sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")

from multiprocessing import resource_tracker

import streaming  # noqa: E402
import torch.distributed as dist
from streaming import MDSWriter, StreamingDataLoader, StreamingDataset  # noqa: E402
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN  # noqa: E402
from streaming.base.shared import prefix as _prefix
from streaming.base.util import clean_stale_shared_memory as _clean
from streaming.base.util import merge_index as _merge_index  # noqa: E402

__all__ = [
    "streaming",
    "MDSWriter",
    "StreamingDataLoader",
    "StreamingDataset",
    "release_prefix",
    "clean_stale_shared_memory",
    "streaming_shm_files",
    "merge_index",
    "leaked_shm_files",
    "prefix_lock",
]

PREFIX_LOCK = os.path.join(tempfile.gettempdir(), "titan_world_streaming_prefix.lock")


@contextlib.contextmanager
def prefix_lock(leader: bool):
    """Hold the node-wide lock while a local leader (local rank 0, or a single process) builds a
    dataset, so no other titan-world job on the node registers a streaming prefix between this
    job's scan for a free one and its creation. Other ranks build without it (they only look)."""
    if not leader:
        yield
        return
    try:  # read-only is enough for flock, and opens a lock file another user created (shared /tmp)
        fd = os.open(PREFIX_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:  # cannot even read it: build unlocked, as streaming alone would
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _agree_on_prefix() -> None:
    """Make the ranks of a node agree on the shared-memory prefix of a new dataset.

    streaming lets every rank scan /dev/shm for the first free prefix on its own; the node's local
    leader then registers *its* pick and the others look for *theirs*. When another job on the
    node registers a prefix between two ranks' scans (two jobs starting at once: two SLURM jobs
    sharing a node, or parallel tests), the ranks pick different prefixes and the job dies with
    "shared memory prefix=N was not registered by local leader". Here the ranks exchange their
    picks and every rank takes its local leader's: the leader scanned under `prefix_lock`, so its
    pick is still free when it creates it. One small all-gather per dataset.
    """
    scan = _prefix._check_and_find_retrying
    if getattr(scan, "agreed_by_node", False):
        return

    def agreed(*args, **kwargs) -> int:
        pick = scan(*args, **kwargs)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return pick
        # a node: its host name, and (torchrun's node-major layout) the block of LOCAL_WORLD_SIZE
        # ranks it holds, so containers that share a host name are still told apart
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        node = (socket.gethostname(), dist.get_rank() // local if local > 0 else 0)
        picks: list = [None] * dist.get_world_size()
        dist.all_gather_object(picks, (node, pick))
        return next(p for n, p in picks if n == node)  # the node's lowest rank: its local leader

    agreed.agreed_by_node = True  # type: ignore[attr-defined]
    _prefix._check_and_find_retrying = agreed


_agree_on_prefix()

_SHM_RE = re.compile(rf"^(\d{{6}})_({'|'.join(SHM_TO_CLEAN)})$")


def streaming_shm_files() -> list[str]:
    """Paths of streaming's shared-memory files currently in /dev/shm."""
    return sorted(p for p in glob.glob("/dev/shm/*") if _SHM_RE.match(os.path.basename(p)))


def merge_index(index_files: list[str], out: str) -> None:
    """streaming's `merge_index(list, out)`: one index.json in `out` over sub-folder indexes.

    Its "temporary folder created" message goes to the root logger as a warning on every call;
    it is not one, so warnings are muted for the duration.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        _merge_index(list(index_files), out)
    finally:
        logging.disable(previous)


def release_prefix(prefix_int: int) -> None:
    """Unlink the shared memory and file locks of one streaming prefix (ours, after use)."""
    for name in SHM_TO_CLEAN:
        try:  # open + unlink (not os.remove) so Python's resource tracker forgets it too
            shm = SharedMemory(name=f"{prefix_int:06}_{name}")
        except (OSError, ValueError):
            continue
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:  # another rank released it first; just forget our handle
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    for name in (BARRIER_FILELOCK, CACHE_FILELOCK):
        try:
            os.remove(os.path.join(tempfile.gettempdir(), f"{prefix_int:06}_{name}"))
        except OSError:
            pass


def _mapped_shm_names(exclude_pid: int | None = None) -> set[str] | None:
    """Basenames of /dev/shm files mapped by any live process we can inspect (None: unknown)."""
    if not os.path.isdir("/proc/self"):
        return None
    names: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        if exclude_pid is not None and maps == f"/proc/{exclude_pid}/maps":
            continue
        try:
            with open(maps) as f:
                for line in f:
                    i = line.find("/dev/shm/")
                    if i >= 0:
                        names.add(os.path.basename(line[i:].split(" (deleted)")[0].strip()))
        except OSError:
            continue
    return names


def leaked_shm_files(before: list[str]) -> list[str]:
    """Streaming shm files that appeared since `before` and are this process's or nobody's.

    On a shared machine other jobs create and remove their own prefixes at any time; those are
    mapped by their (live) processes and are left out, so the check sees only our leaks.
    """
    new = set(streaming_shm_files()) - set(before)
    if not new:
        return []
    mapped_elsewhere = _mapped_shm_names(exclude_pid=os.getpid())
    if mapped_elsewhere is None:  # pragma: no cover - non-Linux: cannot tell whose they are
        return sorted(new)
    return sorted(p for p in new if os.path.basename(p) not in mapped_elsewhere)


def clean_stale_shared_memory() -> int:
    """Remove streaming prefixes that no live process maps; returns how many were removed.

    Falls back to streaming's own (unconditional) cleaner where /proc is unavailable.
    """
    mapped = _mapped_shm_names()
    if mapped is None:  # pragma: no cover - non-Linux
        _clean()
        return -1
    by_prefix: dict[int, list[str]] = {}
    for path in streaming_shm_files():
        m = _SHM_RE.match(os.path.basename(path))
        assert m
        by_prefix.setdefault(int(m.group(1)), []).append(os.path.basename(path))
    removed = 0
    for prefix, names in by_prefix.items():
        if not any(n in mapped for n in names):
            release_prefix(prefix)
            removed += 1
    return removed
