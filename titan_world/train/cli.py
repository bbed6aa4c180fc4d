"""`titan-world train [--config FILE] [--nproc N] [--resume] [key=value ...]`.

Config errors surface here, before any process is launched or any data is generated. With
`--nproc N > 1` the run dir is fixed first (so every rank writes to the same one) and the same
command is re-run on N torchrun ranks. A run dir that already holds checkpoints is resumed
automatically (as `--resume` does); `--resume` without `run.dir` picks the newest runs/* dir.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.cli_common import add_config_arguments, add_job_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        (parser.description or "")
        + ". Trains the tiny model on the synthetic world by default (configs/tiny.yaml); "
        "start from Wan weights: train.base_checkpoint=WAN_FOLDER (train.expert=high|low picks one expert of a two-expert folder); "
        "action finetuning: --config configs/train/tiny_action.yaml train.base_checkpoint=RUN_DIR. "
        "SIGUSR1/SIGTERM checkpoint and exit 75; see docs/train.md."
    )
    add_config_arguments(parser)
    add_job_arguments(parser)


def _has_checkpoints(run_dir: str | None) -> bool:
    from parallel.checkpoint import list_checkpoints

    return bool(run_dir) and bool(list_checkpoints(Path(run_dir) / "checkpoints"))


def _newest_run_dir(root: str = "runs") -> str | None:
    dirs = [p for p in Path(root).glob("*") if p.is_dir() and _has_checkpoints(str(p))] if Path(root).is_dir() else []
    return str(max(dirs, key=lambda p: p.stat().st_mtime)) if dirs else None


def run(args: argparse.Namespace) -> int:
    from launch.torchrun import is_distributed_child, launch_local
    from titan_world.config import resolve_run_dir
    from titan_world.data.loader import check_data_path
    from titan_world.train.loop import check_train_config, train

    cfg = config_from_args(args)
    check_data_path(cfg)
    resume = bool(args.resume)
    if resume and not cfg.run.dir:
        cfg.run.dir = _newest_run_dir()
        if cfg.run.dir:
            print(f"[train] --resume: continuing the newest run, {cfg.run.dir}", file=sys.stderr)
    elif not resume and _has_checkpoints(cfg.run.dir):
        print(f"[train] {cfg.run.dir} has checkpoints: resuming from the newest complete one", file=sys.stderr)
        resume = True
    if args.nproc > 1 and not is_distributed_child():
        check_train_config(cfg, args.nproc, resuming=resume and _has_checkpoints(cfg.run.dir))
        run_dir = resolve_run_dir(cfg)
        argv = ["launch.cli", "train", *(["--config", args.config] if args.config else []), *args.overrides, f"run.dir={run_dir}"]
        return launch_local(args.nproc, argv + (["--resume"] if resume else []))
    return train(cfg, resume=resume)
