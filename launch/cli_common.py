"""Arguments shared by the job commands (train, post-train, ...): config file, overrides, ranks."""

from __future__ import annotations

import argparse

from titan_world.config import TitanConfig, load_config


def add_config_arguments(parser: argparse.ArgumentParser, *, default_config: str = "tiny.yaml") -> None:
    parser.add_argument("--config", default=None, help=f"YAML config (path or name under configs/); default {default_config}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=10 run.dir=runs/a")


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=1, help="local processes (torchrun underneath; gloo on CPU, NCCL on GPU)")
    parser.add_argument("--resume", action="store_true", help="continue the run in run.dir from its last complete checkpoint")


def config_from_args(args: argparse.Namespace, default_config: str = "tiny.yaml") -> TitanConfig:
    return load_config(args.config or default_config, args.overrides)
