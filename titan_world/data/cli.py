"""`titan-world data synth|ingest|info`: build MDS datasets (docs/data.md)."""

from __future__ import annotations

import argparse
import sys
import time

from launch.cli_common import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{synth,ingest}", required=True)
    s = sub.add_parser("synth", help="render episodes of the procedural world into an MDS dataset")
    s.add_argument("--out", required=True, help="output folder (MDS shards)")
    s.add_argument("--episodes", type=int, default=None, help="episodes (default data.synth_episodes)")
    s.add_argument("--seconds", type=float, default=None, help="seconds per episode (default data.synth_seconds; rounded to 1+4k frames)")
    s.add_argument("--keep-raw", action="store_true", help="also store the raw uint8 frames (column `frames`)")
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--seed", type=int, default=0, help="episode i uses seed + i")
    add_config_arguments(s)
    g = sub.add_parser("ingest", help="validate and encode a folder of videos (+ poses/intrinsics/actions/captions)")
    g.add_argument("--src", required=True, help="folder with videos and optional <name>.poses.npy etc.")
    g.add_argument("--out", required=True, help="output folder (MDS shards)")
    g.add_argument("--keep-raw", action="store_true", help="also store the raw uint8 frames")
    add_config_arguments(g)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if getattr(args, "height", None):
        cfg.data.height = args.height
    if getattr(args, "width", None):
        cfg.data.width = args.width
    s = cfg.data.codec.spatial_stride
    if cfg.data.height % s or cfg.data.width % s:
        print(f"titan-world data: --height/--width {cfg.data.height}x{cfg.data.width} must be multiples of the codec stride {s}", file=sys.stderr)
        return 2
    if args.data_command == "synth":
        from titan_world.data.writer import synthesize

        n = args.episodes if args.episodes is not None else cfg.data.synth_episodes
        secs = args.seconds if args.seconds is not None else cfg.data.synth_seconds
        stats = synthesize(cfg, args.out, n, secs, keep_raw=args.keep_raw, seed=args.seed, progress=True)
        print(f"wrote {stats['episodes']} episodes ({stats['frames']} frames at {cfg.data.height}x{cfg.data.width}, "
              f"{cfg.data.fps} fps) to {args.out} in {stats['total_s']:.1f} s; rendering {stats['frames'] / max(stats['render_s'], 1e-9):.0f} frames/s")
        return 0
    from titan_world.data.ingest import format_summary, ingest

    t0 = time.perf_counter()
    try:
        reports = ingest(cfg, args.src, args.out, keep_raw=args.keep_raw)
    except FileNotFoundError as e:
        print(f"titan-world data ingest: {e}", file=sys.stderr)
        return 2
    print(format_summary(reports))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0 if any(r.status == "ok" for r in reports) else 1
