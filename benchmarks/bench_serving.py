"""Serving benchmark: first-chunk latency, steady fps incl. decode, per-stage times, memory.

    python -m benchmarks.bench_serving [--chunks 300] [--config C] [key=value ...]

Defaults: the tiny model (random weights unless serving.checkpoint / runs/demo has a student) on
CPU. GPU example (the lead's runs):
    python -m benchmarks.bench_serving --config wan2.1-1.3b.yaml serving.height=480 serving.width=832 \\
        serving.chunk_frames=3 data.codec.kind=wan_vae data.codec.path=/weights/vae
Levers to compare: serving.kv_refresh=last_step, serving.window_frames=N, serving.denoise_steps=N
(settings a student was not trained with: add serving.force_geometry=true), serving.compile=true,
serving.cuda_graphs=true. Without VAE weights, `--random-vae` decodes with the
Wan2.1 VAE's architecture (random weights, same cost).

Reports: start (prompt encode + first-frame cache write) and first-chunk latency (start -> first
chunk's frames JPEG-encoded); per-stage medians (denoise, KV refresh, decode, JPEG); fps run
serially and pipelined the way the server runs it (denoise thread || decode+JPEG thread); peak
and steady memory over the session, whose growth must be 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import resource
import statistics
import sys
import time

import torch

from benchmarks.common import parse_serving_args, write_json


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _actions(i: int) -> torch.Tensor:
    a = torch.zeros(4, 8)
    a[:, 0] = 1.0
    a[:, 6] = 0.2 if (i // 20) % 2 else -0.2
    return a


def random_wan_vae() -> str:
    """A temp folder holding diffusers' default `AutoencoderKLWan` (the Wan2.1 VAE's architecture)
    with random weights: decode cost does not depend on the weights."""
    import atexit
    import shutil
    import tempfile

    from diffusers import AutoencoderKLWan

    root = tempfile.mkdtemp(prefix="titan-vae-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # ~0.5 GB of random weights
    path = os.path.join(root, "vae")
    AutoencoderKLWan().save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=300, help="chunks in the long session (memory + steady fps)")
    p.add_argument(
        "--random-vae",
        action="store_true",
        help="decode with a random-weight Wan2.1 VAE (diffusers' default AutoencoderKLWan: the real architecture "
        "and cost) when no VAE weights are at hand; sets data.codec.kind=wan_vae",
    )
    args, cfg = parse_serving_args(p, argv)
    if args.random_vae:
        cfg.data.codec.kind, cfg.data.codec.path = "wan_vae", random_wan_vae()
    from serving.loading import build_engine
    from serving.server import encode_jpeg

    engine = build_engine(cfg)
    sc, dev = engine.cfg, engine.device
    cuda = dev.type == "cuda"
    jpeg = lambda frames: [encode_jpeg(f, sc.jpeg_quality) for f in frames]  # noqa: E731
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    # warm-up session (allocator, kernels, compile), then a fresh one for the first-chunk latency
    warm = engine.start(None, sc.default_prompt, 0)
    for i in range(3):
        jpeg(warm.step(_actions(i)))
    warm.close()
    del warm
    t0 = time.perf_counter()
    session = engine.start(None, sc.default_prompt, 1)
    t_start = time.perf_counter() - t0
    jpeg(session.step(_actions(0)))
    t_first = time.perf_counter() - t0

    # serial: every stage timed
    stages: dict[str, list[float]] = {"denoise": [], "kv_refresh": [], "decode": [], "jpeg": []}
    rss, state = [], []
    serial_n = max(1, args.chunks // 2)  # the rest run pipelined
    t0 = time.perf_counter()
    for i in range(serial_n):
        chunk = session.denoise(_actions(i))
        frames = session.decode(chunk)
        tj = time.perf_counter()
        jpeg(frames)
        stages["jpeg"].append(time.perf_counter() - tj)
        for k in ("denoise", "kv_refresh", "decode"):
            stages[k].append(getattr(session.times, k))
        if i >= 10 and (i - 10) % 25 == 0:  # from chunk 10: the cache is full and graphs are captured
            rss.append(_rss_mb())
            state.append(session.state_bytes())
    serial_s = time.perf_counter() - t0
    n_frames = serial_n * engine.frames_per_chunk

    # pipelined like the server: chunk N decodes + encodes while chunk N+1 denoises
    pipe_n = args.chunks - serial_n
    gpu, dec = cf.ThreadPoolExecutor(1), cf.ThreadPoolExecutor(1)
    t0 = time.perf_counter()
    pending = None
    for i in range(pipe_n):
        chunk = gpu.submit(session.denoise, _actions(i)).result()
        if pending is not None:
            pending.result()
        pending = dec.submit(lambda c=chunk: jpeg(session.decode(c)))
        if i % 25 == 0:
            rss.append(_rss_mb())
            state.append(session.state_bytes())
    if pending is not None:
        pending.result()
    pipe_s = time.perf_counter() - t0
    gpu.shutdown()
    dec.shutdown()
    rss.append(_rss_mb())
    state.append(session.state_bytes())

    med = {k: 1e3 * statistics.median(v) for k, v in stages.items()}
    res = {
        "device": str(dev),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "model": f"{cfg.model.name} ({sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}M params, "
        f"{engine.source})",
        "geometry": f"{sc.width}x{sc.height}, {engine.frames_per_chunk} frames/chunk, {len(engine.sigmas)} steps, "
        f"sink {sc.sink_frames} + window {sc.window_frames} latent frames, kv_refresh={sc.kv_refresh}, "
        f"compile={sc.compile}, cuda_graphs={sc.cuda_graphs}",
        "graph_replays": session.graphs.replays if session.graphs is not None else 0,
        "graph_failure": session.graphs.failed if session.graphs is not None else None,
        "start_ms": 1e3 * t_start,
        "first_chunk_ms": 1e3 * t_first,
        "stage_median_ms": med,
        "serial_fps": n_frames / serial_s,
        "pipelined_fps": pipe_n * engine.frames_per_chunk / pipe_s if pipe_n else None,
        "chunks": args.chunks,
        "kv_cache_mb": session.cache.nbytes() / 2**20,
        "session_state_mb": state[-1] / 2**20,
        "session_state_growth_bytes": state[-1] - state[0],
        "rss_mb_first_last": [rss[0], rss[-1]],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if cuda:
        res["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        res["cuda_allocated_mb"] = torch.cuda.memory_allocated(dev) / 2**20
    print(f"serving benchmark: {res['model']} on {res['device']} {res['dtype']} ({res['threads']} threads)")
    print(f"  {res['geometry']}")
    if sc.cuda_graphs:
        print(
            f"  CUDA graphs: {res['graph_replays']} passes replayed"
            + (f", capture failed: {res['graph_failure']}" if res["graph_failure"] else "")
        )
    print(f"  start {res['start_ms']:.1f} ms, first chunk {res['first_chunk_ms']:.1f} ms (start -> JPEG frames)")
    print("  per chunk (median): " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
    print(
        f"  fps incl. decode + JPEG: serial {res['serial_fps']:.1f}, pipelined {res['pipelined_fps'] or 0:.1f} "
        f"(target: serving fps {sc.fps:.0f})"
    )
    print(
        f"  memory over {args.chunks} chunks: KV cache {res['kv_cache_mb']:.2f} MB, session state "
        f"{res['session_state_mb']:.2f} MB (growth {res['session_state_growth_bytes']} B), RSS "
        f"{rss[0]:.0f} -> {rss[-1]:.0f} MB, peak RSS {res['peak_rss_mb']:.0f} MB"
        + (f", CUDA peak {res['cuda_peak_allocated_mb']:.0f} MB" if cuda else "")
    )
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
