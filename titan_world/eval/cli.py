"""`titan-world eval {vbench,compare,report}`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from titan_world.eval.config import ALL_DIMENSIONS, EvalConfig

MODEL_FLAGS = ("raft_path", "raft_factory", "amt_path", "amt_factory", "musiq_path", "musiq_factory",
               "clip_path", "aesthetic_head_path", "viclip_path", "viclip_factory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="{vbench,compare,report}", required=True)
    vb = sub.add_parser("vbench", help="score a folder of mp4 files on VBench dimensions")
    vb.add_argument("--videos", required=True, help="folder of videos (or the output folder with --generate)")
    vb.add_argument("--dimensions", nargs="+", default=None, metavar="DIM",
                    help=f"subset of: {' '.join(ALL_DIMENSIONS)} (comma- or space-separated)")
    vb.add_argument("--out", default=None, help="write results.json + report here (default: <videos>/eval)")
    vb.add_argument("--window-seconds", type=float, default=None, help="per-window metrics over time (0: off)")
    vb.add_argument("--protocol", choices=["vbench", "vbench-long"], default=None)
    vb.add_argument("--config", default=None, help="YAML with EvalConfig fields (top level or under `eval:`)")
    vb.add_argument("--prompts", default=None, help="JSON {file name: prompt} for overall_consistency (with --generate: "
                                                    "also one prompt per line)")
    vb.add_argument("--device", default=None)
    vb.add_argument("--batch-size", type=int, default=None)
    for f in MODEL_FLAGS:
        vb.add_argument("--" + f.replace("_", "-"), default=None, dest=f)
    vb.add_argument("--generate", default=None, metavar="CHECKPOINT",
                    help="first generate videos into --videos from this checkpoint: one per prompt of --prompts "
                         "(JSON {file: prompt} or one prompt per line), else 4 synthetic-world clips; "
                         "their prompts go to VIDEOS/prompts.json, which scoring then reads")
    vb.add_argument("--no-report", action="store_true", help="JSON only (no markdown/HTML/PNGs)")
    cp = sub.add_parser("compare", help="runs side by side with LingBot-World's published numbers")
    cp.add_argument("runs", nargs="+", help="results.json files or folders holding one")
    cp.add_argument("--names", nargs="+", default=None, help="display name per run")
    cp.add_argument("--out", required=True)
    rp = sub.add_parser("report", help="render markdown/HTML/PNG from a results JSON")
    rp.add_argument("--results", required=True)
    rp.add_argument("--out", required=True)


def build_config(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig from --config YAML, then explicit flags."""
    from omegaconf import OmegaConf

    from titan_world.config import ConfigError

    cfg = OmegaConf.structured(EvalConfig)
    if args.config:
        p = Path(args.config)
        if not p.is_file():
            raise ConfigError(f"--config {p}: file does not exist")
        node = OmegaConf.load(p)
        node = node.get("eval", node)
        try:
            cfg = OmegaConf.merge(cfg, node)
        except Exception as e:
            raise ConfigError(f"--config {p}: {e}") from e
    ec: EvalConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    updates = {f: getattr(args, f) for f in MODEL_FLAGS if getattr(args, f) is not None}
    for f in ("window_seconds", "protocol", "prompts", "device", "batch_size"):
        if getattr(args, f) is not None:
            updates[f] = getattr(args, f)
    if args.dimensions:
        updates["dimensions"] = [d for item in args.dimensions for d in item.split(",") if d]
    ec = dataclasses.replace(ec, **updates)
    bad = [d for d in ec.dimensions if d not in ALL_DIMENSIONS]
    if bad:
        raise ConfigError(f"dimensions={bad}: expected a subset of {list(ALL_DIMENSIONS)}")
    return ec


def generate_videos(checkpoint: str, prompts: str | None, out_dir: Path) -> None:
    """Generate the clips to score first (`titan_world.generate.generate_to_dir`)."""
    from titan_world.generate import generate_to_dir
    from titan_world.model.io import CheckpointError

    try:
        generate_to_dir(checkpoint, prompts, out_dir)
    except (CheckpointError, OSError, ValueError) as e:
        raise RuntimeError(f"--generate {checkpoint}: {e}") from None


def run(args: argparse.Namespace) -> int:
    from titan_world.eval import report

    if args.eval_command == "compare":
        files = report.compare_runs(args.runs, args.out, args.names)
        print(files["md"].read_text())
        print(f"wrote {', '.join(str(p) for p in files.values())}")
        return 0
    if args.eval_command == "report":
        files = report.write_report(args.results, args.out)
        print(f"wrote {', '.join(str(p) for p in files.values())}")
        return 0
    from titan_world.eval.vbench import PromptsError, run_vbench, summary
    from titan_world.eval.video_io import list_videos

    cfg = build_config(args)
    videos_dir = Path(args.videos)
    if args.generate:
        try:
            generate_videos(args.generate, cfg.prompts, videos_dir)
        except RuntimeError as e:
            print(f"titan-world eval: {e}", file=sys.stderr)
            return 2
        cfg = dataclasses.replace(cfg, prompts=None)  # the clips' own VIDEOS/prompts.json says what each was made from
    try:
        videos = list_videos(videos_dir)
    except FileNotFoundError as e:
        print(f"titan-world eval: {e}", file=sys.stderr)
        return 2
    if not videos:
        print(f"titan-world eval: no video files in {videos_dir}", file=sys.stderr)
        return 2
    try:
        results = run_vbench(videos, cfg, progress=lambda m: print(f"[eval] {m}", flush=True))
    except PromptsError as e:
        print(f"titan-world eval: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else videos_dir / "eval"
    if args.no_report:
        files = {"json": report.write_json(results, out / "results.json")}
    else:
        files = report.write_vbench_report(results, out)
    for d, v in summary(results).items():
        print(f"{d:22s} {'skipped' if v is None else f'{v:.4f}'}")
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    failed = results["failed_videos"]
    for name, f in failed.items():
        print(f"titan-world eval: {name} not scored: {f['reason']}", file=sys.stderr)
    if failed:  # the others are scored and written; a partial evaluation must not look complete to a script
        print(f"titan-world eval: {len(failed)} of {len(videos)} videos could not be read (listed under "
              f"failed_videos in {files['json']}); exit 1", file=sys.stderr)
        return 1
    return 0
