"""`titan-world eval {vbench,action,compare,report}`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from omegaconf import OmegaConf

from titan_world.config import ConfigError
from titan_world.data.ingest import list_videos
from titan_world.eval import report
from titan_world.eval.action_eval import evaluate_action_following
from titan_world.eval.config import ALL_DIMENSIONS, EvalConfig
from titan_world.eval.vbench import PromptsError, run_vbench, summary
from titan_world.generate import generate_to_dir
from titan_world.model.io import CheckpointError

MODEL_FLAGS = (
    "raft_path",
    "raft_factory",
    "amt_path",
    "amt_factory",
    "musiq_path",
    "musiq_factory",
    "clip_path",
    "aesthetic_head_path",
    "viclip_path",
    "viclip_factory",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="{vbench,action,compare,report}", required=True)
    vb = sub.add_parser("vbench", help="score a folder of mp4 files on VBench dimensions")
    vb.add_argument("--videos", required=True, help="folder of videos (or the output folder with --generate)")
    vb.add_argument(
        "--dimensions",
        nargs="+",
        default=None,
        metavar="DIM",
        help=f"subset of: {' '.join(ALL_DIMENSIONS)} (comma- or space-separated)",
    )
    vb.add_argument("--out", default=None, help="write results.json + report here (default: <videos>/eval)")
    vb.add_argument("--window-seconds", type=float, default=None, help="per-window metrics over time (0: off)")
    vb.add_argument("--protocol", choices=["vbench", "vbench-long"], default=None)
    vb.add_argument("--config", default=None, help="YAML with EvalConfig fields (top level or under `eval:`)")
    vb.add_argument(
        "--prompts",
        default=None,
        help="JSON {file name: prompt} for overall_consistency (with --generate: also one prompt per line)",
    )
    vb.add_argument("--device", default=None)
    vb.add_argument("--batch-size", type=int, default=None)
    for f in MODEL_FLAGS:
        vb.add_argument("--" + f.replace("_", "-"), default=None, dest=f)
    vb.add_argument(
        "--generate",
        default=None,
        metavar="CHECKPOINT",
        help="first generate videos into --videos from this checkpoint: one per prompt of --prompts "
        "(JSON {file: prompt} or one prompt per line), else 4 synthetic-world clips; "
        "their prompts go to VIDEOS/prompts.json, which scoring then reads",
    )
    vb.add_argument("--no-report", action="store_true", help="JSON only (no markdown/HTML/PNGs)")
    ac = sub.add_parser("action", help="action following on held-out synthetic-world episodes (JSON + HTML report)")
    ac.add_argument(
        "--checkpoint",
        required=True,
        help="a run dir (its model/ and config.yaml) or an exported model folder; bidirectional models "
        "are rolled out in clips, block-causal students streamed as `serve` streams them",
    )
    ac.add_argument("--episodes", type=int, default=4, help="held-out episodes (default 4)")
    ac.add_argument(
        "--seed",
        type=int,
        default=10_000,
        help="agent seed of the first episode (episode i: SEED + i); choose seeds that differ from "
        "training's (data.synth_seed .. + data.synth_episodes - 1, 0..47 by default) (default 10000)",
    )
    ac.add_argument(
        "--seconds",
        type=float,
        default=2.0,
        help="length of each rollout; the first 2 s are scored against the baselines, the whole stream "
        "in windows (drift) and at revisits (e.g. 60; default 2)",
    )
    ac.add_argument("--window-seconds", type=float, default=10.0, help="drift window length (default 10)")
    ac.add_argument("--steps", type=int, default=20, help="sampling steps of a bidirectional model (default 20)")
    ac.add_argument(
        "--shift",
        type=float,
        default=None,
        help="flow shift of a bidirectional model's sampling (default: the shift of its last training stage)",
    )
    ac.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    ac.add_argument("--out", required=True, help="writes OUT/action_following.json, OUT/index.html, OUT/plots/")
    cp = sub.add_parser("compare", help="runs side by side with LingBot-World's published numbers")
    cp.add_argument("runs", nargs="+", help="results.json files or folders holding one")
    cp.add_argument("--names", nargs="+", default=None, help="display name per run")
    cp.add_argument("--out", required=True)
    rp = sub.add_parser("report", help="render markdown/HTML/PNG from a results JSON")
    rp.add_argument("--results", required=True)
    rp.add_argument("--out", required=True)


def build_config(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig from --config YAML, then explicit flags."""
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
    try:
        generate_to_dir(checkpoint, prompts, out_dir)
    except (CheckpointError, OSError, ValueError) as e:
        raise RuntimeError(f"--generate {checkpoint}: {e}") from None


def run(args: argparse.Namespace) -> int:
    if args.eval_command == "compare":
        files = report.compare_runs(args.runs, args.out, args.names)
        print(files["md"].read_text())
        print(f"wrote {', '.join(str(p) for p in files.values())}")
        return 0
    if args.eval_command == "report":
        files = report.write_report(args.results, args.out)
        print(f"wrote {', '.join(str(p) for p in files.values())}")
        return 0
    if args.eval_command == "action":
        return run_action(args)
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
        print(
            f"titan-world eval: {len(failed)} of {len(videos)} videos could not be read (listed under "
            f"failed_videos in {files['json']}); exit 1",
            file=sys.stderr,
        )
        return 1
    return 0


def run_action(args: argparse.Namespace) -> int:
    try:
        rep = evaluate_action_following(
            args.checkpoint,
            args.out,
            episodes=args.episodes,
            seed=args.seed,
            seconds=args.seconds,
            window_seconds=args.window_seconds,
            steps=args.steps,
            shift=args.shift,
            device=args.device,
            progress=lambda m: print(f"[eval action] {m}", flush=True),
        )
    except (CheckpointError, ConfigError, OSError, ValueError) as e:
        print(f"titan-world eval action: {e}", file=sys.stderr)
        return 2
    print("action following (PSNR vs simulator over the first 2 s, higher is better):")
    for k, v in rep["frame_error"].items():
        print(f"  {k:<12} {v['psnr']:6.2f} dB")
    num = lambda x, unit="": "—" if x is None else f"{x:.2f}{unit}"  # noqa: E731
    print(
        "drift, last window / first: " + ", ".join(f"{k} {num(v)}" for k, v in rep["drift"]["last_over_first"].items())
    )
    rv = rep["revisits"]["model"]
    print(
        f"revisits: {rep['revisits']['frames']['revisit']} frames, PSNR {num(rv['revisit']['psnr'], ' dB')} "
        f"vs first visits {num(rv['first_visit']['psnr'], ' dB')}"
    )
    print(f"wrote {Path(args.out) / 'action_following.json'}, {Path(args.out) / 'index.html'}")
    return 0
