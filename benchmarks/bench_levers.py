"""Serving levers: what each costs in quality and buys in speed, measured together in one run.

    python -m benchmarks.bench_levers [--episodes 4] [--seconds 4] [--config C] [key=value ...]

Streams held-out synthetic episodes (seeds the training set never uses) through the real
serving engine (`serving.loading.build_engine`: the demo student unless serving.checkpoint is
given), with the episode's first frame as the start image and the simulator's own actions, and
scores every streamed frame against the simulator (PSNR, and the camera yaw error of
`titan_world.eval.action_following`), next to the copy-last-frame baseline. Each lever is the
baseline with one serving setting changed:

  kv_refresh=last_step   the last denoising step writes the cache: one pass per chunk fewer
  window_frames=W/2      a tighter attention window: fewer keys per pass, less memory
  steps=...              fewer denoising passes per chunk (a subset of the trained timesteps)
  float8=rowwise|tensorwise   FP8 GEMMs in the blocks (torchao; on a CPU FP8 is emulated, so
                         only the quality columns mean anything there)
  cuda_graphs=true       replay full-cache passes from CUDA graphs (GPU only: the same numbers,
                         listed for its speed)
  light_decoder          with --light-decoder PATH: decode with a distilled light decoder
                         (`titan-world distill-decoder`) instead of the codec's own

Speed is the serial frame rate (denoise + KV refresh + decode) on this device, as a ratio to the
baseline measured in the same run; quality is the change in PSNR next to `detail` (the frames'
neighbouring-pixel differences over the simulator's): PSNR alone rewards blur, so a lever that
raises PSNR by washing out detail shows it there. On a busy CPU the speed column is noisy: read
the ratios, not the absolute fps.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch

from benchmarks.common import parse_serving_args, write_json


def _levers(sc, sigmas: list[float], device: torch.device, light_decoder: str | None = None) -> list[tuple[str, dict]]:
    """(name, serving overrides) pairs; the first is the baseline (the student's own settings).
    Fewer steps keep the first of the student's trained timesteps and spread the rest evenly
    over the trained ones (4 -> 3: 1.0, 0.5, 0.25; 4 -> 2: 1.0, 0.25)."""
    out = [("baseline", {})]
    if sc.kv_refresh != "last_step":
        out.append(("kv_refresh=last_step", {"kv_refresh": "last_step"}))
    if sc.window_frames >= 2:
        out.append((f"window_frames={sc.window_frames // 2}", {"window_frames": sc.window_frames // 2}))
    for steps in (3, 2):
        if steps < len(sigmas):
            keep = np.linspace(0, len(sigmas) - 1, steps).round().astype(int)
            subset = [float(sigmas[i]) for i in keep]
            out.append((f"steps={','.join(f'{x:g}' for x in subset)}", {"denoise_steps": steps, "sigmas": subset}))
    if sc.float8 == "none":
        out += [(f"float8={recipe}", {"float8": recipe}) for recipe in ("rowwise", "tensorwise")]
    if device.type == "cuda" and not sc.cuda_graphs:
        out.append(("cuda_graphs=true", {"cuda_graphs": True}))
    if light_decoder and not sc.light_decoder:
        out.append(("light_decoder", {"light_decoder": light_decoder}))
    return out


def detail(frames: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels of uint8 frames [T, H, W, 3]: how much
    fine structure they carry. PSNR rewards blur (the conditional mean), so every lever is also
    reported as its frames' detail over the simulator's (1.0 = as sharp as the truth)."""
    f = frames.astype(np.float32)
    return float(np.abs(np.diff(f, axis=1)).mean() + np.abs(np.diff(f, axis=2)).mean())


def stream_episode(engine, episode, offset: int, frames: int, seed: int) -> tuple[np.ndarray, float]:
    """Frames [offset, offset + frames) of `episode` as the engine streams them from its frame
    `offset` and its actions; returns (uint8 [T, H, W, 3], seconds spent in step())."""
    session = engine.start(episode.frames[offset], episode.captions["narrative"], seed)
    out = [session.first_frames()[-1:]]
    n = engine.frames_per_chunk
    spent = 0.0
    try:
        for i in range(offset + 1, offset + frames, n):
            actions = torch.from_numpy(episode.actions[i : i + n]).float()
            if len(actions) < n:
                break
            t0 = time.perf_counter()
            out.append(session.step(actions))
            spent += time.perf_counter() - t0
    finally:
        session.close()
    return np.concatenate(out), spent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0, help="streamed length per episode")
    p.add_argument("--offset", type=int, default=16, help="start frame in the episode (its first second barely moves)")
    p.add_argument(
        "--light-decoder", default=None, help="add the light-decoder lever: a `titan-world distill-decoder` run dir"
    )
    args, cfg = parse_serving_args(p, argv)
    from serving.loading import build_engine
    from titan_world.data.synth import make_episode
    from titan_world.eval.action_following import action_following_report
    from titan_world.train.action_check import HELD_OUT_SEED

    base = build_engine(cfg)
    sc, dev = base.cfg, base.device
    frames = 1 + int(args.seconds * sc.fps) // base.frames_per_chunk * base.frames_per_chunk
    d = cfg.data
    episodes = [
        make_episode(HELD_OUT_SEED + i, d.height, d.width, (args.offset + frames) / d.fps + 0.5, d.fps)
        for i in range(args.episodes)
    ]
    print(
        f"serving levers: {base.source} on {dev} ({torch.get_num_threads()} threads); {args.episodes} held-out "
        "episodes x "
        f"{frames} frames at {sc.width}x{sc.height}; baseline: {len(base.sigmas)} steps, kv_refresh={sc.kv_refresh}, "
        f"sink {sc.sink_frames} + window {sc.window_frames}"
    )
    rows = []
    for name, change in _levers(sc, [float(x) for x in base.sigmas], dev, args.light_decoder):
        lever_cfg = copy.deepcopy(cfg)
        lever_cfg.serving.force_geometry = True  # a lever is a setting the student was not trained for, on purpose
        for k, v in change.items():
            setattr(lever_cfg.serving, k, v)
        engine = base if not change else build_engine(lever_cfg)
        psnr, copy_psnr, yaw, sharp, spent, n = [], [], [], [], 0.0, 0
        stream_episode(engine, episodes[0], args.offset, 1 + 2 * engine.frames_per_chunk, seed=0)  # warm-up
        for j, ep in enumerate(episodes):
            gen, s = stream_episode(engine, ep, args.offset, frames, seed=j)
            true = ep.frames[args.offset : args.offset + len(gen)]
            rep = action_following_report(
                gen,
                true,
                context_frames=1,
                poses=ep.c2w[args.offset : args.offset + len(gen)],
                intrinsics=ep.intrinsics[0],
            )
            psnr.append(rep["frame_error"]["model"]["psnr"])
            sharp.append(detail(gen[1:]) / detail(true[1:]))
            copy_psnr.append(rep["frame_error"]["copy_last"]["psnr"])
            if rep["camera"]["model"]["yaw_mae_deg"] is not None:
                yaw.append(rep["camera"]["model"]["yaw_mae_deg"])
            spent, n = spent + s, n + len(gen) - 1
        rows.append(
            {
                "lever": name,
                "fps": n / spent,
                "psnr": float(np.mean(psnr)),
                "copy_last_psnr": float(np.mean(copy_psnr)),
                "yaw_mae_deg": float(np.mean(yaw)) if yaw else None,
                "detail_vs_truth": float(np.mean(sharp)),
                "passes_per_chunk": len(engine.sigmas) + (engine.cfg.kv_refresh == "clean"),
            }
        )
    b = rows[0]
    print(
        f"{'lever':<22} {'passes':>6} {'fps':>8} {'speed':>6} {'PSNR dB':>8} {'ΔPSNR':>6} {'detail':>6} {'yaw err°':>8}"
    )
    for r in rows:
        r["speed_vs_baseline"], r["dpsnr"] = r["fps"] / b["fps"], r["psnr"] - b["psnr"]
        yaw_s = f"{r['yaw_mae_deg']:.2f}" if r["yaw_mae_deg"] is not None else "-"
        print(
            f"{r['lever']:<22} {r['passes_per_chunk']:>6} {r['fps']:>8.1f} {r['speed_vs_baseline']:>5.2f}x "
            f"{r['psnr']:>8.2f} {r['dpsnr']:>+6.2f} {r['detail_vs_truth']:>6.2f} {yaw_s:>8}"
        )
    print(f"(copy-last-frame baseline: {b['copy_last_psnr']:.2f} dB)")
    write_json(
        args.json,
        {"device": str(dev), "source": base.source, "frames": frames, "episodes": args.episodes, "rows": rows},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
