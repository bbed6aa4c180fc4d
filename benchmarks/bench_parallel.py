"""Parallel benchmarks: step time / model-TFLOP/s under a mesh, and the Ulysses all-to-all cost.

  python -m benchmarks.bench_parallel plan   [--model wan2.2-i2v-a14b]      memory plan per stage
  python -m benchmarks.bench_parallel a2a    [--model ...] [--frames 961]   all-to-all cost model, cp 8..64
  torchrun --nproc-per-node N -m benchmarks.bench_parallel step [--model wan2.1-1.3b] [--frames 81]
       [--height 480 --width 832] [--cp 1] [--ac full] [--steps 5]     measured step time + peak memory

The a2a model: per attention layer Ulysses does 4 all-to-alls (q, k, v in; out back), each
sending (P-1)/P of a [S/P, d] bf16 shard per GPU; backward repeats them, full AC recomputes the
forward ones once more (x3 total). Bandwidths (per GPU, one direction): NVLink4 450 GB/s inside a
node of 8, InfiniBand NDR 400 Gb/s = 50 GB/s across nodes (a group wider than a node is limited
by its slowest link). Latency terms are ignored (messages are MBs).
"""

from __future__ import annotations

import argparse
import json
import time

NVLINK_GBS, IB_GBS, GPUS_PER_NODE = 450.0, 50.0, 8


def _model_cfg(name: str):
    from omegaconf import OmegaConf

    from titan_world.config import resolve_config_path
    from titan_world.model.config import ModelConfig

    path = resolve_config_path(f"model/{name}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def a2a_cost(cfg, tokens: int, cp: int, ac: str = "full") -> dict[str, float]:
    shard_bytes = tokens / cp * cfg.dim * 2
    per_a2a = shard_bytes * (cp - 1) / cp
    passes = 3 if ac == "full" else 2
    total = per_a2a * 4 * cfg.num_layers * passes
    bw = NVLINK_GBS if cp <= GPUS_PER_NODE else IB_GBS
    return {"cp": cp, "bytes_per_gpu_GB": total / 1e9, "bandwidth_GBs": bw, "seconds_per_step": total / (bw * 1e9)}


def model_flops_per_step(cfg, frames: int, height: int, width: int) -> float:
    """Train-step model FLOPs of one sample, from the project's one formula (titan_world.train.flops)."""
    from titan_world.train.flops import sample_flops

    return sample_flops(cfg, 1 + (frames - 1) // 4, height // 8, width // 8).train_step


def cmd_plan(a) -> None:
    from parallel.planner import format_plan, format_recommendations, plan, recommend

    cfg = _model_cfg(a.model)
    print(format_plan(plan(cfg, 81, a.height, a.width, dp_shard=8, ac=a.ac)))
    print()
    print(format_plan(plan(cfg, 961, a.height, a.width, cp=8, ac=a.ac)))
    print()
    stages = [("5s", 81), ("10s", 161), ("20s", 321), ("30s", 481), ("60s", 961)]
    print(format_recommendations(recommend(cfg, stages, a.height, a.width, ac=a.ac)))


def cmd_a2a(a) -> None:
    from parallel.planner import num_tokens

    cfg = _model_cfg(a.model)
    tokens = num_tokens(a.frames, a.height, a.width)
    flops = model_flops_per_step(cfg, a.frames, a.height, a.width)
    print(f"{a.model}: {tokens:,} tokens, {flops / 1e15:.1f} PFLOP per sample-step")
    for cp in sorted({8, 16, 32, 64} | {c for c in range(8, 65) if cfg.num_heads % c == 0}):
        if cfg.num_heads % cp:
            print(f"cp={cp:>2}: not a divisor of {cfg.num_heads} heads (pad heads or use ring attention)")
            continue
        c = a2a_cost(cfg, tokens, cp, a.ac)
        compute = flops / cp / (a.tflops * 1e12)
        print(f"cp={cp:>2}: {c['bytes_per_gpu_GB']:7.1f} GB/GPU, {c['seconds_per_step']:6.2f} s at {c['bandwidth_GBs']:.0f} GB/s "
              f"vs compute {compute:6.2f} s at {a.tflops:.0f} TFLOP/s")


def cmd_step(a) -> None:
    import torch

    from parallel import apply_activation_checkpointing, apply_fsdp, build_mesh, destroy, init_distributed
    from parallel.config import ParallelConfig
    from parallel.ulysses import UlyssesContext
    from titan_world.model import build_model

    rank, world, device = init_distributed()
    cfg = _model_cfg(a.model)
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
    f = 1 + (a.frames - 1) // 4
    x = torch.randn(1, cfg.out_dim, f, a.height // 8, a.width // 8, device=device)
    cond = torch.randn(1, cfg.in_dim - cfg.out_dim, *x.shape[2:], device=device)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=device)
    t = torch.tensor([500.0], device=device)
    times = []
    for i in range(a.steps):
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
    out = {"model": a.model, "gpus": world, "cp": a.cp, "ac": a.ac, "tokens": tokens, "step_s": step,
           "model_tflops_per_gpu": model_flops_per_step(cfg, a.frames, a.height, a.width) / step / world / 1e12}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if rank == 0:
        print(json.dumps(out))
    destroy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["plan", "a2a", "step"])
    ap.add_argument("--model", default="wan2.2-i2v-a14b")
    ap.add_argument("--frames", type=int, default=961)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--ac", default="full")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tflops", type=float, default=300.0, help="achieved model TFLOP/s per GPU for the compute comparison")
    a = ap.parse_args(argv)
    {"plan": cmd_plan, "a2a": cmd_a2a, "step": cmd_step}[a.mode](a)


if __name__ == "__main__":
    main()
