"""Observability on rank 0: metrics.jsonl, a tqdm bar with ETA, wandb (offline by default),
plus peak memory and an optional torch.profiler window."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from titan_world.config import to_dict


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak allocated memory since the last reset (GPU), else the process's max RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:
        return None


class MetricsLogger:
    """Writes one JSON object per logged step; no-ops on ranks other than 0."""

    def __init__(self, run_dir: Path, cfg, *, rank: int, total_steps: int, initial_step: int, resumed: bool):
        self.enabled = rank == 0
        self.bar = None
        self.wandb = None
        if not self.enabled:
            return
        path = run_dir / "metrics.jsonl"
        if resumed:
            _drop_records_from(path, initial_step)  # steps past the checkpoint are redone
        else:
            _set_aside(path)
        self.file = open(path, "a")
        if cfg.run.progress:
            self.bar = tqdm(
                total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
            )
        if cfg.run.wandb != "disabled":
            self.wandb = _start_wandb(run_dir, cfg)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}, step=record["step"]
            )

    def progress(self, n: int, postfix: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            with contextlib.suppress(Exception):
                self.wandb.finish(quiet=True)


def _drop_records_from(path: Path, step: int) -> None:
    """Remove the records of steps >= `step` (the resumed run redoes them); every other line stays.
    Rewritten atomically (a crash leaves the old file), and only when there is something to change."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) is None or _step_of(line) < step]
    unterminated = bool(kept) and not kept[-1].endswith("\n")  # a line cut by a kill: end it, so appends stay lines
    if len(kept) == len(lines) and not unterminated:
        return
    if unterminated:
        kept[-1] += "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # not a record (a partial last line after a kill): kept as is


def _set_aside(path: Path) -> None:
    """A new run in a run dir whose earlier run left records but no checkpoint: its records move to
    metrics.prev-N.jsonl (never overwritten) instead of being truncated."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    n = 1
    while (aside := path.with_name(f"metrics.prev-{n}.jsonl")).exists():
        n += 1
    os.replace(path, aside)
    print(f"[train] {path} held records of an earlier run without a checkpoint; moved to {aside}", file=sys.stderr)


def _start_wandb(run_dir: Path, cfg):
    """wandb in offline mode unless run.wandb=online; any wandb failure only disables it."""
    try:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # noqa: PLC0415 (slow to import: only when run.wandb is on)

        return wandb.init(
            project="titan-world",
            name=cfg.run.name,
            dir=str(run_dir),
            mode=cfg.run.wandb,
            config=to_dict(cfg),
            resume="allow",
            id=_wandb_id(run_dir),
        )
    except Exception as e:  # no network, no package, bad key: training goes on
        print(f"[train] wandb disabled: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run dir, so a resumed run appends to the same wandb run."""
    path = run_dir / "wandb_id"
    if not path.exists():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


class ProfilerWindow:
    """torch.profiler over steps [start, end) (train.profile_steps); trace to RUN_DIR/profile/."""

    def __init__(self, steps: list[int], run_dir: Path, rank: int, device: torch.device):
        self.start, self.end = (steps + [None, None])[:2] if steps else (None, None)
        self.out = run_dir / "profile" / f"trace_rank{rank}.json"
        self.device = device
        self.prof = None

    def step_begin(self, step: int) -> None:
        if self.start is not None and step == self.start and self.prof is None:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=acts, record_shapes=True, with_stack=False)
            self.prof.__enter__()

    def step_end(self, step: int) -> str | None:
        """Returns the trace path when the window closes at this step."""
        if self.prof is None or step + 1 < (self.end or self.start + 1):
            return None
        self.prof.__exit__(None, None, None)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out))
        self.prof = None
        return str(self.out)
