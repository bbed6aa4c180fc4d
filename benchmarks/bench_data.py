"""Data benchmark: synth frames/s (one core) and loader samples/s. `python -m benchmarks.bench_data`."""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--episodes", type=int, default=48)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=17, help="loader clip length (1 + 4k)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from titan_world.config import load_config
    from titan_world.data.loader import build_train_loader
    from titan_world.data.synth import make_episode
    from titan_world.data.writer import synthesize

    make_episode(0, args.size, args.size, 1.0)  # warm texture caches
    t0 = time.perf_counter()
    n = sum(make_episode(s, args.size, args.size, args.seconds).num_frames for s in range(8))
    print(
        f"synth render: {n / (time.perf_counter() - t0):.0f} frames/s at {args.size}x{args.size} (world + agent + "
        "raycast + captions, 1 thread)"
    )
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(None, [f"data.path={d}/ds", f"data.height={args.size}", f"data.width={args.size}"])
        stats = synthesize(cfg, f"{d}/ds", args.episodes, args.seconds, progress=False)
        print(
            f"synth dataset: {stats['episodes']} episodes, {stats['frames']} frames in {stats['total_s']:.1f} s "
            f"({stats['frames'] / stats['total_s']:.0f} frames/s incl. encoding and MDS writing)"
        )
        loader = build_train_loader(cfg, args.frames, 0, 1, seed=0, batch_size=4)
        list(loader)  # first epoch warms the shard files
        t0 = time.perf_counter()
        count = sum(len(b["captions"]) for _ in range(3) for b in loader)
        print(
            f"loader: {count / (time.perf_counter() - t0):.0f} samples/s ({args.frames}-frame clips, batch 4, 0 "
            "workers)"
        )
        loader.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
