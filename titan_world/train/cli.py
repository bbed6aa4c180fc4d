"""`titan-world train [--config FILE] [--nproc N] [--resume] [key=value ...]`.

Config errors surface here, before any process is launched or any data is generated. With
`--nproc N > 1` the run dir is fixed first (so every rank writes to the same one) and the same
command is re-run on N torchrun ranks. A run dir that already holds checkpoints is resumed
automatically (as `--resume` does); `--resume` without `run.dir` picks the newest runs/* dir with
a checkpoint, and `--resume` with nothing to resume is an error (exit 2).
"""

from __future__ import annotations

import argparse

from launch.cli_common import add_config_arguments, add_job_arguments, check_nproc, config_from_args, resolve_resume


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        (parser.description or "") + ". Trains the tiny model on the synthetic world by default (configs/tiny.yaml); "
        "start from Wan weights: train.base_checkpoint=WAN_FOLDER (train.expert=high|low picks one expert of a "
        "two-expert folder); "
        "action finetuning: --config configs/train/tiny_action.yaml train.base_checkpoint=RUN_DIR. "
        "SIGUSR1/SIGTERM checkpoint and exit 75; see docs/train.md."
    )
    add_config_arguments(parser)
    add_job_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from launch.torchrun import is_distributed_child, launch_local  # noqa: PLC0415 (CLI starts without torch)
    from titan_world.config import resolve_run_dir  # noqa: PLC0415 (CLI starts without torch)
    from titan_world.data.loader import check_data_path  # noqa: PLC0415 (CLI starts without torch)
    from titan_world.train.loop import check_train_config, train  # noqa: PLC0415 (CLI starts without torch)

    cfg = config_from_args(args)
    check_nproc(args.nproc)
    check_data_path(cfg)
    resume = resolve_resume(cfg, bool(args.resume), "train")
    if args.nproc > 1 and not is_distributed_child():
        check_train_config(cfg, args.nproc, resuming=resume)
        run_dir = resolve_run_dir(cfg)
        argv = [
            "launch.cli",
            "train",
            *(["--config", args.config] if args.config else []),
            *args.overrides,
            f"run.dir={run_dir}",
        ]
        return launch_local(args.nproc, argv + (["--resume"] if resume else []))
    return train(cfg, resume=resume)
