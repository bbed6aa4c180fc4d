"""`titan-world serve`: stream an action-controlled world over WebSocket to a browser.

    titan-world serve [--port P] [--checkpoint PATH] [--gpus N] [--config C] [serving.key=value ...]

`--gpus N > 1` relaunches itself on N local ranks (torchrun): Ulysses over attention heads,
rank 0 serves, the others follow its command stream (serving/distributed.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch.distributed as dist

from launch.cli_common import add_config_arguments, config_from_args
from launch.torchrun import is_distributed_child, launch_local
from parallel.distributed import destroy, init_distributed
from parallel.ulysses import UlyssesContext
from serving.config import ServingConfig
from serving.distributed import RankedEngine, worker_loop
from serving.engine import EngineError
from serving.fake_engine import FakeEngine
from serving.loading import build_engine, resolved_serving
from serving.server import StreamServer, serve_forever
from titan_world.config import ConfigError, load_config
from titan_world.data.synth import Episode, make_episode
from titan_world.eval.action_eval import run_config_path

log = logging.getLogger("titan_world.serving")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--host", default=None, help="interface to listen on (default serving.host, 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=None, help="TCP port (default serving.port, 8765; 0 picks a free one)"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="Wan-format student folder (default: the demo student, else random weights)"
    )
    parser.add_argument(
        "--gpus", type=int, default=None, help="GPUs of this node to shard attention heads over (Ulysses)"
    )
    parser.add_argument(
        "--queue",
        type=int,
        default=None,
        help="clients that may wait while the GPU set is busy (default serving.queue_size)",
    )
    parser.add_argument(
        "--engine",
        choices=["model", "fake"],
        default="model",
        help="fake: a model-free test double (for trying the client and protocol only)",
    )
    parser.add_argument(
        "--allow-bidirectional",
        action="store_true",
        help="stream a bidirectional (not post-trained) checkpoint anyway, as a baseline; "
        "by default only a block-causal student is served",
    )


def _config(args: argparse.Namespace):
    cfg = config_from_args(args)
    sc = cfg.serving
    for name, key in (
        ("host", "host"),
        ("port", "port"),
        ("checkpoint", "checkpoint"),
        ("gpus", "gpus"),
        ("queue", "queue_size"),
    ):
        if getattr(args, name) is not None:
            setattr(sc, key, getattr(args, name))
    if sc.gpus < 1:
        raise ConfigError(f"serving.gpus={sc.gpus}: expected >= 1")
    if not 0 <= sc.port < 65536:
        raise ConfigError(f"serving.port={sc.port}: expected 0..65535")
    return cfg


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    cfg = _config(args)
    if cfg.serving.gpus > 1 and not is_distributed_child():
        if args.engine == "fake":
            print("titan-world serve: --engine fake runs on one process; drop --gpus", file=sys.stderr)
            return 2
        return launch_local(cfg.serving.gpus, ["serving.cli", *_relaunch_argv(args)])
    return _serve(cfg, args.engine, require_causal=not args.allow_bidirectional)


def _relaunch_argv(args: argparse.Namespace) -> list[str]:
    """The same command for the ranks (rebuilt from the parsed arguments, not sys.argv)."""
    out = ["--config", args.config] if args.config else []
    for name in ("host", "port", "checkpoint", "gpus", "queue"):
        if getattr(args, name) is not None:
            out += [f"--{name}", str(getattr(args, name))]
    if args.allow_bidirectional:
        out.append("--allow-bidirectional")
    return out + ["--engine", args.engine, *args.overrides]


SYNTHETIC_START_SEED = 10_000  # an agent seed outside the default training set (0 .. data.synth_episodes - 1)


def run_config(source: str, serve_cfg):
    """The config the served model was trained with: config.yaml of its run (next to it, or above
    an exported model/ folder); for random weights the serve config itself; None if unknown."""
    if source == "random":
        return serve_cfg
    path = run_config_path(source)
    if path is None:
        return None
    try:
        return load_config(path)
    except ConfigError as e:
        log.warning("%s: unreadable (%s); serving without the synthetic-world start", path, e)
        return None


def trained_on_synthetic_world(cfg) -> bool:
    """data.path `synthetic[:DIR]`, or a dataset folder whose titan_dataset.json says source synthetic."""
    path = cfg.data.path
    if path == "synthetic" or path.startswith("synthetic:"):
        return True
    marker = Path(path) / "titan_dataset.json"
    try:
        return json.loads(marker.read_text()).get("source") == "synthetic"
    except (OSError, ValueError, AttributeError):
        return False


def synthetic_start(cfg, height: int = 0, width: int = 0) -> Episode:
    """A held-out episode of the model's synthetic world (its fps and episode length; rendered at the
    stream's `height` x `width`, 0: the data size): sessions start from its first frame, at its first
    camera, in its level, with its caption (the kind of prompt the model was trained on)."""
    d = cfg.data
    seed = SYNTHETIC_START_SEED
    if d.synth_seed <= seed < d.synth_seed + d.synth_episodes:
        seed = d.synth_seed + d.synth_episodes
    ep = make_episode(
        seed, height or d.height, width or d.width, seconds=d.synth_seconds, fps=d.fps, level=d.synth_level
    )
    return ep


def start_defaults(serve_cfg, sc: ServingConfig, source: str) -> tuple[ServingConfig, Episode | None]:
    """For a model trained on the synthetic world: the start episode (`synthetic_start`) and its
    caption as the default prompt (unless serving.default_prompt was set); otherwise the serve config
    as it is and None."""
    run_cfg = run_config(source, serve_cfg)
    if run_cfg is None or not trained_on_synthetic_world(run_cfg):
        return sc, None
    start = synthetic_start(run_cfg, sc.height, sc.width)
    if sc.default_prompt == ServingConfig.default_prompt:
        sc = replace(sc, default_prompt=start.captions["narrative"])
    log.warning(
        "start: %s was trained on the synthetic world; sessions start in a held-out episode of it: %r",
        source,
        sc.default_prompt,
    )
    return sc, start


def start_image(engine, start: Episode | None) -> np.ndarray | None:
    """Place the engine's sessions where the start episode begins (its camera, its level) and return
    the start image (None: the serve config's own default)."""
    if start is None:
        return None
    if hasattr(engine, "place"):
        engine.place(start.c2w[0], start.world)
    return start.frames[0]


def _serve(cfg, engine_kind: str, *, require_causal: bool) -> int:
    sc = resolved_serving(cfg)
    if engine_kind == "fake":
        engine = FakeEngine(sc.height, sc.width, sc.fps, sc.chunk_frames or 1)
        asyncio.run(serve_forever(StreamServer(engine, sc), sc.host, sc.port))
        return 0
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _serve_ranked(cfg, sc, require_causal=require_causal)
    try:
        engine = build_engine(cfg, require_causal=require_causal)
    except EngineError as e:
        print(f"titan-world serve: {e}", file=sys.stderr)
        return 2
    sc, start = start_defaults(cfg, sc, getattr(engine, "source", "random"))
    asyncio.run(serve_forever(StreamServer(engine, sc, start_image(engine, start)), sc.host, sc.port))
    return 0


def _serve_ranked(cfg, sc, *, require_causal: bool) -> int:
    rank, world, device = init_distributed()
    control = dist.new_group(backend="gloo")
    engine = build_engine(
        cfg, local_rank=device.index or 0, cp=UlyssesContext(dist.group.WORLD), require_causal=require_causal
    )
    sc, start = start_defaults(cfg, sc, getattr(engine, "source", "random"))
    image = start_image(engine, start)  # every rank's sessions start at the same camera
    try:
        if rank == 0:
            ranked = RankedEngine(engine, control)
            try:
                asyncio.run(serve_forever(StreamServer(ranked, sc, image), sc.host, sc.port))
            finally:
                try:
                    ranked.shutdown()
                except Exception:  # workers already gone (e.g. torchrun forwarded SIGTERM to them)
                    pass
        else:
            worker_loop(engine, control)
    finally:
        destroy()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="titan-world serve")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
