"""`titan-world` — one command line for every stage of the platform.

Each subcommand lives beside the code it drives (a module with `add_arguments(parser)` and
`run(args) -> int`); this file only routes, so `titan-world --help` stays fast (modules are
imported when their subcommand runs).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": (
        "titan_world.data.cli",
        "build datasets: `synth` (procedural world) and `ingest` (real videos) into MDS shards",
    ),
    "train": ("titan_world.train.cli", "pre/middle-training and action finetuning over a curriculum (FSDP2 + Ulysses)"),
    "post-train": (
        "titan_world.posttrain.cli",
        "causal adaptation (diffusion forcing) and DMD + GAN + self-rollout distillation",
    ),
    "distill-decoder": (
        "titan_world.train.light_decoder",
        "distill a light streaming decoder from the codec's (serving.light_decoder)",
    ),
    "generate": ("titan_world.generate", "generate an mp4 from an image, a prompt and optional actions"),
    "serve": ("serving.cli", "serve an interactive world over WebSocket with a browser client"),
    "eval": ("titan_world.eval.cli", "VBench dimensions, action following and long-horizon drift reports"),
    "slurm": ("launch.slurm_cli", "submit, follow and cancel SLURM jobs with preemption-safe requeue"),
    "convert": ("titan_world.model.convert", "convert checkpoints: diffusers <-> Wan native, DCP -> safetensors"),
    "inspect": (
        "titan_world.model.inspect_cli",
        "parameters, shapes, tokens, FLOPs and a memory plan of a config/checkpoint",
    ),
}


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="titan-world",
        description="Train, post-train, evaluate and serve mixture-of-experts video world models.",
        epilog="Run `titan-world COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, _ = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"titan-world {name}", description=help_text)
    module.add_arguments(sub_parser)
    # Intermixed parsing lets options follow `key=value` overrides (`train a=1 --nproc 2`);
    # argparse cannot do that for commands that have sub-commands of their own.
    has_subcommands = any(isinstance(a, argparse._SubParsersAction) for a in sub_parser._actions)
    args = sub_parser.parse_args(argv[1:]) if has_subcommands else sub_parser.parse_intermixed_args(argv[1:])
    from titan_world.config import ConfigError  # noqa: PLC0415 (the router stays light: `titan-world --help` imports no torch)
    from titan_world.model.io import CheckpointError  # noqa: PLC0415 (the router stays light: `titan-world --help` imports no torch)

    try:
        return int(module.run(args) or 0)
    except ConfigError as e:
        print(f"titan-world {name}: config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # a checkpoint path given by the user that does not fit
        print(f"titan-world {name}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:  # disk full: the checkpointer's message says where and how much
            raise
        print(f"titan-world {name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"titan-world {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
