"""`titan-world post-train {causal,dmd} [--config FILE] [--nproc N] [--resume] [key=value ...]`.

causal: stage 1, diffusion forcing -> a block-causal student (RUN_DIR/model).
dmd:    stage 2, self-rollout + DMD (+ GAN head) -> a few-step causal student (RUN_DIR/model).
With no --config the tiny defaults run on the synthetic world (see docs/posttrain.md).
SIGUSR1/SIGTERM checkpoint and exit 75, Ctrl-C checkpoints and exits 130; a run dir with checkpoints
resumes, `--resume` with nothing to resume is an error (exit 2).
"""

from __future__ import annotations

import argparse
import sys

from launch.cli_common import add_config_arguments, add_job_arguments, check_nproc, config_from_args, resolve_resume

STAGES = ("causal", "dmd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "stage", choices=STAGES, help="causal: diffusion-forcing adaptation; dmd: few-step distillation"
    )
    add_config_arguments(parser)
    add_job_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from launch.torchrun import is_distributed_child, launch_local  # noqa: PLC0415 (CLI starts without torch)
    from titan_world.config import resolve_run_dir  # noqa: PLC0415 (CLI starts without torch)
    from titan_world.data.loader import check_data_path  # noqa: PLC0415 (CLI starts without torch)
    from titan_world.posttrain.loop import (  # noqa: PLC0415 (CLI starts without torch)
        CausalJob,
        DMDJob,
        check_mesh,
        required_path,
        run_stage,
    )

    cfg = config_from_args(args)  # config errors surface before anything starts
    check_nproc(args.nproc)
    check_data_path(cfg)
    resume = resolve_resume(cfg, bool(args.resume), "post-train")
    if args.nproc > 1 and not is_distributed_child():
        check_mesh(cfg, args.nproc)
    for key in (DMDJob if args.stage == "dmd" else CausalJob).inputs:
        required_path(cfg, key)  # a ConfigError naming the key, before any rank starts
    if args.nproc > 1 and not is_distributed_child():
        run_dir = resolve_run_dir(cfg)  # fixed once, so every rank writes to the same one
        # options first: argparse cannot resume positionals after an option
        argv = ["titan_world.posttrain.cli", *(["--config", args.config] if args.config else [])]
        argv += ["--resume"] if resume else []
        argv += [args.stage, *[o for o in args.overrides if not o.startswith("run.dir=")], f"run.dir={run_dir}"]
        return launch_local(args.nproc, argv)
    return run_stage(args.stage, cfg, resume=resume)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="titan-world post-train")
    add_arguments(parser)
    return int(run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
