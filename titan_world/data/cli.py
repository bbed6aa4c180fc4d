"""`titan-world data synth|ingest`: build MDS datasets (docs/data.md).

Both write atomically (into `OUT.tmp-*`, renamed at the end). With `--nproc P > 1` the same
command is re-run on P torchrun ranks (gloo); each encodes items i with i % P == rank and rank 0
merges the per-rank folders into one dataset (`titan_world.data.parallel_write`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from launch.cli_common import add_config_arguments, config_from_args
from launch.torchrun import is_distributed_child, launch_local
from titan_world.data.ingest import format_summary, ingest_videos, list_videos
from titan_world.data.parallel_write import (
    RankGroup,
    WriteError,
    check_out_free,
    gather_in_order,
    rank_items,
    write_parallel,
)
from titan_world.data.writer import synthesize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{synth,ingest}", required=True)
    s = sub.add_parser("synth", help="render episodes of the procedural world into an MDS dataset")
    s.add_argument("--out", required=True, help="output folder (MDS shards); must not exist or be empty")
    s.add_argument("--episodes", type=int, default=None, help="episodes (default data.synth_episodes)")
    s.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds per episode (default data.synth_seconds; rounded to 1+4k frames)",
    )
    s.add_argument("--keep-raw", action="store_true", help="also store the raw uint8 frames (column `frames`)")
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--seed", type=int, default=0, help="episode i uses seed + i")
    _add_nproc(s)
    add_config_arguments(s)
    g = sub.add_parser("ingest", help="validate and encode a folder of videos (+ poses/intrinsics/actions/captions)")
    g.add_argument("--src", required=True, help="folder with videos and optional <name>.poses.npy etc.")
    g.add_argument("--out", required=True, help="output folder (MDS shards); must not exist or be empty")
    g.add_argument("--keep-raw", action="store_true", help="also store the raw uint8 frames")
    _add_nproc(g)
    add_config_arguments(g)


def _add_nproc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="local writer processes (torchrun, gloo): item i is encoded by rank i %% nproc, rank 0 merges",
    )


def _child_argv(args: argparse.Namespace, cfg) -> list[str]:
    """The same command for the torchrun ranks, with every default resolved here once.

    No `--nproc`: the ranks know the world from torchrun's env, and torchrun's own parser would
    take `--nproc` for an abbreviation of its `--nproc-per-node`.
    """
    argv = ["launch.cli", "data", args.data_command, "--out", os.path.abspath(args.out)]
    if args.data_command == "synth":
        argv += [
            "--episodes",
            str(_episodes(args, cfg)),
            "--seconds",
            repr(_seconds(args, cfg)),
            "--seed",
            str(args.seed),
            "--height",
            str(cfg.data.height),
            "--width",
            str(cfg.data.width),
        ]
    else:
        argv += ["--src", os.path.abspath(args.src)]
    argv += ["--keep-raw"] if args.keep_raw else []
    argv += ["--config", args.config] if args.config else []
    return argv + list(args.overrides)


def _episodes(args: argparse.Namespace, cfg) -> int:
    return args.episodes if args.episodes is not None else cfg.data.synth_episodes


def _seconds(args: argparse.Namespace, cfg) -> float:
    return args.seconds if args.seconds is not None else cfg.data.synth_seconds


def _error(msg: str) -> int:
    print(f"titan-world data: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if getattr(args, "height", None):
        cfg.data.height = args.height
    if getattr(args, "width", None):
        cfg.data.width = args.width
    s = cfg.data.codec.spatial_stride
    if cfg.data.height % s or cfg.data.width % s:
        return _error(f"--height/--width {cfg.data.height}x{cfg.data.width} must be multiples of the codec stride {s}")
    if args.nproc < 1:
        return _error(f"--nproc={args.nproc}: expected >= 1")
    if args.data_command == "ingest" and not os.path.isdir(args.src):
        return _error(f"ingest: --src {args.src}: not a directory")
    if not is_distributed_child():
        try:  # checked before any rank starts (rank 0 checks again when it creates the temp folder)
            check_out_free(args.out)
        except FileExistsError as e:
            return _error(str(e))
        if args.nproc > 1:
            return launch_local(args.nproc, _child_argv(args, cfg))
    try:
        return _synth(cfg, args) if args.data_command == "synth" else _ingest(cfg, args)
    except WriteError as e:  # every rank gets it; the temp folder is gone and OUT untouched
        if not is_distributed_child() or os.environ.get("RANK") == "0":
            print(f"titan-world data {args.data_command}: failed, nothing written to {args.out}: {e}", file=sys.stderr)
        return 1


def _synth(cfg, args: argparse.Namespace) -> int:
    n, secs = _episodes(args, cfg), _seconds(args, cfg)
    if n < 1 or secs <= 0:
        print(
            f"titan-world data synth: --episodes {n} / --seconds {secs}: expected at least 1 episode of > 0 s",
            file=sys.stderr,
        )
        return 2
    group = RankGroup()
    try:
        mine = rank_items(n, group.rank, group.world)

        def write_part(folder) -> dict:
            if not mine:  # more ranks than episodes: this rank writes no folder
                return {"episodes": 0, "frames": 0, "render_s": 0.0, "total_s": 0.0}
            return synthesize(
                cfg, folder, n, secs, keep_raw=args.keep_raw, seed=args.seed, progress=group.rank == 0, indices=mine
            )

        t0 = time.perf_counter()
        stats, episodes = write_parallel(args.out, group, write_part)
        if group.rank == 0:
            frames, render_s = sum(st["frames"] for st in stats), sum(st["render_s"] for st in stats)
            print(
                f"wrote {episodes} episodes ({frames} frames at {cfg.data.height}x{cfg.data.width}, {cfg.data.fps} "
                "fps) "
                f"to {args.out} in {time.perf_counter() - t0:.1f} s on {group.world} rank(s); "
                f"rendering {frames / max(render_s, 1e-9):.0f} frames/s per rank"
            )
        return 0
    finally:
        group.close()


def _ingest(cfg, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    group = RankGroup()
    try:
        videos = group.broadcast(list_videos(args.src) if group.rank == 0 else None)  # one listing for all ranks
        mine = rank_items(len(videos), group.rank, group.world)

        def write_part(folder) -> list:
            reports = ingest_videos(cfg, [videos[i] for i in mine], folder, keep_raw=args.keep_raw)
            return list(zip(mine, reports))  # one report per video, in the rank's order

        per_rank, _ = write_parallel(args.out, group, write_part)
        reports = gather_in_order(per_rank)
        if group.rank == 0:
            print(format_summary(reports))
            print(f"({time.perf_counter() - t0:.1f} s on {group.world} rank(s))")
        return 0 if any(r.status == "ok" for r in reports) else 1
    finally:
        group.close()
