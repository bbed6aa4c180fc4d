"""Arguments shared by the job commands (train, post-train, ...): config file, overrides, ranks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from parallel.checkpoint import list_checkpoints
from titan_world.config import ConfigError, TitanConfig, load_config


def add_config_arguments(parser: argparse.ArgumentParser, *, default_config: str = "tiny.yaml") -> None:
    parser.add_argument(
        "--config", default=None, help=f"YAML config (path or name under configs/); default {default_config}"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=10 run.dir=runs/a"
    )


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc", type=int, default=1, help="local processes (torchrun underneath; gloo on CPU, NCCL on GPU)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run.dir (default: the newest runs/* with a checkpoint) from its "
        "newest valid checkpoint; an error when there is none. Without it, a run.dir holding "
        "checkpoints resumes too",
    )


def config_from_args(args: argparse.Namespace, default_config: str = "tiny.yaml") -> TitanConfig:
    return load_config(args.config or default_config, args.overrides)


def check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise ConfigError(f"--nproc={nproc}: expected the number of local processes, >= 1")


def has_checkpoints(run_dir: str | None) -> bool:
    return bool(run_dir) and bool(list_checkpoints(Path(run_dir) / "checkpoints"))


def newest_run_dir(root: str = "runs") -> str | None:
    """The most recently modified runs/* that holds a checkpoint."""
    dirs = [p for p in Path(root).glob("*") if p.is_dir() and has_checkpoints(str(p))] if Path(root).is_dir() else []
    return str(max(dirs, key=lambda p: p.stat().st_mtime)) if dirs else None


def resolve_resume(cfg: TitanConfig, resume: bool, tag: str) -> bool:
    """Whether the job continues a run (and which: fills `run.dir`), decided before any work.

    `--resume` must find something to resume: without run.dir the newest runs/* holding a
    checkpoint, else an error; with run.dir, a run dir without checkpoints is an error (no fresh
    random run that exits 0 as if resumed). Without `--resume`, a run.dir that holds checkpoints
    resumes (how a requeued or restarted job continues); one without checkpoints starts fresh.
    Checkpoints that exist but are all invalid are the checkpointer's error when loading."""
    if resume and not cfg.run.dir:
        cfg.run.dir = newest_run_dir()
        if not cfg.run.dir:
            raise ConfigError(
                "--resume without run.dir: no run under runs/ holds a checkpoint; pass run.dir=RUN_DIR "
                "of the run to continue, or drop --resume to start a new run"
            )
        print(f"[{tag}] --resume: continuing the newest run, {cfg.run.dir}", file=sys.stderr)
    elif resume and not has_checkpoints(cfg.run.dir):
        raise ConfigError(
            f"--resume: nothing to resume in run.dir={cfg.run.dir} (no checkpoint in "
            f"{Path(cfg.run.dir) / 'checkpoints'}); drop --resume to start a new run there"
        )
    elif not resume and has_checkpoints(cfg.run.dir):
        print(f"[{tag}] {cfg.run.dir} has checkpoints: resuming from the newest valid one", file=sys.stderr)
        resume = True
    return resume
