"""Parallel benchmarks: step time / model-TFLOP/s under a mesh, and the Ulysses all-to-all cost.

  python -m benchmarks.bench_parallel plan   [--model wan2.2-i2v-a14b]      memory plan per stage
  python -m benchmarks.bench_parallel a2a    [--model ...] [--frames 961]   all-to-all cost model, cp 8..64
  python -m benchmarks.bench_parallel cluster [--nodes 8] [--tflops 397]    predicted step on N x 8 H100, 5 s / 60 s
  torchrun --nproc-per-node N -m benchmarks.bench_parallel step [--model wan2.1-1.3b] [--frames 81]
       [--height 480 --width 832] [--cp 1] [--ac full] [--steps 5]     measured step time + peak memory

The communication and cluster models (all-to-all, FSDP traffic, bandwidths) are in
parallel/planner.py, next to the memory model they share a mesh with.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import model_config
from parallel.planner import GPUS_PER_NODE, IB_GBS, NVLINK_GBS
from titan_world.model.codec import latent_frames


def model_flops_per_step(cfg, frames: int, height: int, width: int) -> float:
    """Train-step model FLOPs of one sample, from the project's one formula (titan_world.model.flops)."""
    from titan_world.model.flops import sample_flops

    return sample_flops(cfg, latent_frames(frames), height // 8, width // 8).train_step


def cmd_plan(a) -> None:
    from parallel.planner import format_plan, format_recommendations, plan, recommend

    cfg = model_config(a.model)
    print(format_plan(plan(cfg, 81, a.height, a.width, dp_shard=8, ac=a.ac)))
    print()
    print(format_plan(plan(cfg, 961, a.height, a.width, cp=8, ac=a.ac)))
    print()
    stages = [("5s", 81), ("10s", 161), ("20s", 321), ("30s", 481), ("60s", 961)]
    print(format_recommendations(recommend(cfg, stages, a.height, a.width, ac=a.ac)))


def cmd_a2a(a) -> None:
    from parallel.planner import a2a_cost, num_tokens

    cfg = model_config(a.model)
    tokens = num_tokens(a.frames, a.height, a.width)
    flops = model_flops_per_step(cfg, a.frames, a.height, a.width)
    print(f"{a.model}: {tokens:,} tokens, {flops / 1e15:.1f} PFLOP per sample-step")
    for cp in sorted({8, 16, 32, 64} | {c for c in range(8, 65) if cfg.num_heads % c == 0}):
        if cfg.num_heads % cp:
            print(f"cp={cp:>2}: not a divisor of {cfg.num_heads} heads (pad heads or use ring attention)")
            continue
        c = a2a_cost(cfg, tokens, cp, a.ac)
        compute = flops / cp / (a.tflops * 1e12)
        print(
            f"cp={cp:>2}: {c['bytes_per_gpu_GB']:7.1f} GB/GPU, {c['seconds_per_step']:6.2f} s at "
            f"{c['bandwidth_GBs']:.0f} GB/s "
            f"vs compute {compute:6.2f} s at {a.tflops:.0f} TFLOP/s"
        )


def cmd_cluster(a) -> None:
    from parallel.planner import cluster_prediction

    cfg = model_config(a.model)
    gpus = a.nodes * GPUS_PER_NODE
    print(
        f"{a.model} on {a.nodes} x {GPUS_PER_NODE} H100 ({gpus} GPUs), {a.height}x{a.width}, AC {a.ac}, "
        f"assumed {a.tflops:.0f} achieved model-TFLOP/s per GPU, NVLink {NVLINK_GBS:.0f} / IB {IB_GBS:.0f} GB/s per GPU"
    )
    print(
        f"{'clip':>5} {'tokens':>8} {'cp':>3} {'dp_shard':>8} {'GB/GPU':>7} {'batch':>5} {'compute':>8} {'a2a':>6} "
        f"{'fsdp':>6} {'step':>7} {'samples/s':>9} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>5}"
    )
    for name, frames in (("5s", 81), ("60s", 961)):
        flops = model_flops_per_step(cfg, frames, a.height, a.width)
        r = cluster_prediction(cfg, frames, gpus, a.height, a.width, flops, a.tflops, a.ac)
        if r is None:
            print(f"{name:>5} does not fit on {gpus} GPUs")
            continue
        print(
            f"{name:>5} {r['tokens']:>8,} {r['cp']:>3} {r['dp_shard']:>8} {r['gb_per_gpu']:>7.1f} "
            f"{r['global_batch']:>5} "
            f"{r['compute_s']:>7.2f}s {r['a2a_s']:>5.2f}s {r['fsdp_comm_s']:>5.2f}s {r['step_s']:>6.2f}s "
            f"{r['samples_per_s']:>9.2f} {r['tokens_per_s']:>9,.0f} {r['model_tflops_per_gpu']:>8.0f} {r['mfu']:>5.0%}"
        )
    print(
        "(one sample per cp group per step; raise the global batch with gradient accumulation: the FSDP traffic is "
        "paid once per step)"
    )


def cmd_step(a) -> None:
    import torch

    from parallel import apply_activation_checkpointing, apply_fsdp, build_mesh, destroy, init_distributed
    from parallel.config import ParallelConfig
    from parallel.ulysses import UlyssesContext
    from titan_world.model import build_model

    rank, world, device = init_distributed()
    cfg = model_config(a.model)
    pc = ParallelConfig(cp=a.cp, activation_checkpoint=a.ac)
    mesh = build_mesh(pc)
    with torch.device("meta"):
        model = build_model(cfg)
    model.set_context_parallel(UlyssesContext.from_mesh(mesh))
    apply_activation_checkpointing(model, pc)
    apply_fsdp(model, mesh, pc)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    f = latent_frames(a.frames)
    x = torch.randn(1, cfg.out_dim, f, a.height // 8, a.width // 8, device=device)
    cond = torch.randn(1, cfg.in_dim - cfg.out_dim, *x.shape[2:], device=device)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=device)
    t = torch.tensor([500.0], device=device)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = model(x, t, ctx, cond=cond).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    from parallel.planner import num_tokens

    tokens = num_tokens(a.frames, a.height, a.width)
    step = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    out = {
        "model": a.model,
        "gpus": world,
        "cp": a.cp,
        "ac": a.ac,
        "tokens": tokens,
        "step_s": step,
        "model_tflops_per_gpu": model_flops_per_step(cfg, a.frames, a.height, a.width) / step / world / 1e12,
    }
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if rank == 0:
        print(json.dumps(out))
    destroy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["plan", "a2a", "cluster", "step"])
    ap.add_argument("--model", default="wan2.2-i2v-a14b")
    ap.add_argument("--frames", type=int, default=961)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--ac", default="full")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--tflops", type=float, default=300.0, help="achieved model TFLOP/s per GPU for the compute comparison"
    )
    ap.add_argument("--nodes", type=int, default=8, help="cluster mode: nodes of 8 GPUs")
    a = ap.parse_args(argv)
    {"plan": cmd_plan, "a2a": cmd_a2a, "cluster": cmd_cluster, "step": cmd_step}[a.mode](a)


if __name__ == "__main__":
    main()
