"""Data-parallel dataset writing: P ranks encode disjoint items, rank 0 merges (docs/data.md).

Item i goes to rank i % P. Each rank writes its own MDS folder `TMP/rank-RRR` with streaming's
MDSWriter (MDS writers cannot share a folder); after a barrier rank 0 merges the sub-indexes
into `TMP/index.json` (`streaming.base.util.merge_index`, which prefixes each shard's file name
with its sub-folder) and renames TMP to the output folder. TMP is `OUT.tmp-*` beside OUT, so a
crash at any point leaves either no dataset or the whole one at OUT, never half of one.

With one process (no torchrun world) the same steps run without a process group and the rank
writes straight into TMP, giving the plain single-folder layout.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from titan_world.data._streaming import merge_index

T = TypeVar("T")

META_FILE = "titan_dataset.json"
# Ranks that finish early wait for the slowest one in the gather; encoding a large folder of
# uneven videos can take hours, so the collective timeout must not be torch's 30 minutes.
# A crashed rank does not make the others wait this long: torchrun stops the whole group.
GATHER_TIMEOUT = timedelta(hours=24)


def part_name(rank: int) -> str:
    return f"rank-{rank:03d}"


def rank_items(n: int, rank: int, world: int) -> list[int]:
    """The indices rank `rank` of `world` handles (round robin: item i -> rank i % world)."""
    return list(range(rank, n, world))


def check_out_free(out: str | os.PathLike) -> None:
    """Refuse to write over something: OUT must not exist or be an empty folder."""
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise FileExistsError(f"--out {p}: already exists and is not an empty folder; remove it or choose another")


class RankGroup:
    """This process's place among the writers: a gloo group from torchrun's env, or alone."""

    def __init__(self) -> None:
        self.rank, self.world, self._owned = 0, 1, False
        if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun rank among others
            if not dist.is_initialized():  # gloo: only Python objects travel, never tensors on a GPU
                dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
                self._owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (also the barrier)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self._owned:
            dist.destroy_process_group()
            self._owned = False


class WriteError(RuntimeError):
    """A rank failed while writing; the message holds each failing rank's error."""


def _guarded(fn: Callable[[], T], rank: int) -> tuple[T | None, str | None]:
    try:
        return fn(), None
    except Exception as e:  # reported to every rank, so no rank waits forever at the gather
        traceback.print_exc(file=sys.stderr)  # the full story stays on the rank that failed
        return None, f"rank {rank}: {type(e).__name__}: {e}"


def _make_tmp(out: Path) -> str:
    check_out_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the renamed dataset private
    return tmp


def merge_parts(root: str | os.PathLike, world: int) -> int:
    """Merge `root/rank-*/index.json` into `root/index.json` and one `titan_dataset.json`.

    Returns the number of episodes (0: no rank wrote any, nothing merged). Ranks that wrote no
    episode have no index and are left out. The encoder metadata of all parts must agree.
    """
    root = Path(root)
    parts = [root / part_name(r) for r in range(world) if (root / part_name(r) / "index.json").is_file()]
    if not parts:
        return 0
    metas = [json.loads((p / META_FILE).read_text()) for p in parts]
    base = {k: v for k, v in metas[0].items() if k != "episodes"}
    for p, m in zip(parts, metas):
        if {k: v for k, v in m.items() if k != "episodes"} != base:
            raise WriteError(f"{p / META_FILE} differs from {parts[0] / META_FILE}; ranks used different encoders")
    merge_index([str(p / "index.json") for p in parts], str(root))
    episodes = sum(int(m["episodes"]) for m in metas)
    (root / META_FILE).write_text(json.dumps({**base, "episodes": episodes, "ranks": world}, indent=1))
    for p in parts:
        (p / META_FILE).unlink()  # one summary per dataset, beside the one index a reader opens
    return episodes


def _finish(tmp: Path, out: Path, world: int) -> int:
    """Rank 0: merge (several ranks) and move TMP to OUT; returns the episode count."""
    if world > 1:
        episodes = merge_parts(tmp, world)
    else:
        meta = tmp / META_FILE
        episodes = json.loads(meta.read_text())["episodes"] if meta.is_file() else 0
    if episodes == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty OUT (made by the user) is replaced; anything else was refused above
    os.replace(tmp, out)
    return episodes


def write_parallel(out: str | os.PathLike, group: RankGroup, write_part: Callable[[Path], T]) -> tuple[list[T], int]:
    """Run `write_part(folder)` on every rank, then merge into `out` atomically.

    `write_part` writes this rank's share as an MDS dataset into `folder` (it may write none).
    Returns every rank's result (rank order, on all ranks) and the dataset's episode count
    (0: nothing was written and OUT was not created). Raises `WriteError` on every rank when
    any rank failed; the temporary folder is removed then.
    """
    out = Path(out).absolute()
    tmp_or_err = group.broadcast(_guarded(lambda: _make_tmp(out), 0) if group.rank == 0 else None)
    if tmp_or_err[1]:
        raise WriteError(tmp_or_err[1])
    tmp = Path(tmp_or_err[0])
    folder = tmp if group.world == 1 else tmp / part_name(group.rank)
    results = group.gather(_guarded(lambda: write_part(folder), group.rank))
    errors = [err for _, err in results if err]
    final: tuple[int | None, str | None] = (None, None)
    if group.rank == 0:
        final = _guarded(lambda: _finish(tmp, out, group.world), 0) if not errors else (None, "; ".join(errors))
        if final[1]:
            shutil.rmtree(tmp, ignore_errors=True)
    final = group.broadcast(final)  # the second barrier: no rank returns before OUT exists
    if final[1]:
        raise WriteError(final[1])
    return [r for r, _ in results], int(final[0] or 0)


def gather_in_order(per_rank: Sequence[Sequence[tuple[int, T]]]) -> list[T]:
    """Flatten (item index, value) lists from all ranks back into item order."""
    return [v for _, v in sorted((iv for rank in per_rank for iv in rank), key=lambda iv: iv[0])]
