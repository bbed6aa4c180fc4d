"""Per-GPU memory model for FSDP2 + Ulysses CP training of a Wan-style DiT, and a CP/node advisor.

A first-order analytic model (what `titan-world inspect --plan` prints). Assumptions, per GPU:
- Parameter counts from the model itself, built on the meta device (1.42B for Wan2.1-1.3B, 14.29B per
  A14B expert).
- Mixed precision as `apply_fsdp`: fp32 master params, fp32 grads and AdamW's two fp32 moments,
  all sharded over dp_shard x cp (16 bytes/param / N); plus unsharded bf16 params and grads of
  `inflight_blocks` blocks (current + prefetched) during forward/backward.
- Activations in bf16. Without AC a block keeps ~(20 d + 2 ffn) values per token (q/k/v, RoPE'd
  q/k, attention out, modulated inputs, FFN hidden pre/post GELU, residuals; fp32 modulation
  temporaries counted twice) on S/cp tokens. Full AC keeps only each block's input (d values per
  token) plus one block's recompute working set. Selective every n-th keeps full activations of
  the other blocks. Attention itself is flash/cuDNN style (no S^2 score matrix).
- `reserve_gb` (CUDA context, NCCL buffers, allocator fragmentation) is added as a constant.
- Tokens: frames -> 1 + (frames-1)/4 latent frames, height/width / 8 (Wan VAE), patch 1x2x2; so
  480x832 x 81 frames = 32,760 tokens and 961 frames (60 s at 16 fps) = 375,960 tokens.
Not modelled: the text encoder/VAE (run offline or on other GPUs), optimizer-step temporaries,
activation memory of the loss (small). Check against a measured peak before trusting the margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from parallel.checkpointing import checkpointed_block_ids
from titan_world.model.codec import latent_frames
from titan_world.model.dit import WanDiT

GB = 1e9
# Per-GPU, one-direction bandwidths: NVLink4 inside a node of 8, InfiniBand NDR 400 Gb/s across.
NVLINK_GBS, IB_GBS, GPUS_PER_NODE = 450.0, 50.0, 8


def num_tokens(frames: int, height: int, width: int, patch=(1, 2, 2), vae_stride=(4, 8, 8)) -> int:
    lat_f = latent_frames(frames)
    return (lat_f // patch[0]) * (height // vae_stride[1] // patch[1]) * (width // vae_stride[2] // patch[2])


_META_EXPERTS: dict[str, nn.Module] = {}


def param_count(cfg, part: str = "") -> int:
    """Parameters of one expert (or of its submodule `part`, e.g. "blocks.0"), counted on the model built on the
    meta device: exact for any architecture, no memory (~0.5 s for a 14B expert, once per config)."""
    key = repr(cfg)
    if key not in _META_EXPERTS:
        with torch.device("meta"):
            _META_EXPERTS[key] = WanDiT(cfg)
    return sum(p.numel() for p in _META_EXPERTS[key].get_submodule(part).parameters())


@dataclass
class Plan:
    model: str
    params: int
    tokens: int
    dp_replicate: int
    dp_shard: int
    cp: int
    ac: str
    micro_batch: int
    gpu_mem_gb: float
    gb: dict[str, float] = field(default_factory=dict)  # params, grads, optimizer, activations, reserve

    @property
    def total_gb(self) -> float:
        return sum(self.gb.values())

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.gpu_mem_gb

    @property
    def gpus(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp


def plan(
    model_cfg,
    frames: int,
    height: int,
    width: int,
    dp_replicate: int = 1,
    dp_shard: int = 1,
    cp: int = 1,
    ac: str = "full",
    gpu_mem_gb: float = 80.0,
    *,
    ac_every: int = 2,
    ac_skip_last: int = 0,
    micro_batch: int = 1,
    inflight_blocks: int = 2,
    reserve_gb: float = 4.0,
    vae_stride=(4, 8, 8),
) -> Plan:
    """Estimated per-GPU memory of one training step (see the module docstring for assumptions)."""
    if model_cfg.num_heads % cp:
        raise ValueError(f"cp={cp}: model.num_heads={model_cfg.num_heads} must be divisible by it")
    n = param_count(model_cfg)
    shard = dp_shard * cp
    d, ffn, layers = model_cfg.dim, model_cfg.ffn_dim, model_cfg.num_layers
    block = param_count(model_cfg, "blocks.0")
    tokens = num_tokens(frames, height, width, tuple(model_cfg.patch_size), vae_stride)
    local_tokens = micro_batch * math.ceil(tokens / cp)
    full_per_block = local_tokens * (20 * d + 2 * ffn) * 2
    input_per_block = local_tokens * d * 2
    if ac not in ("none", "full", "selective", "attention"):
        raise ValueError(f"ac={ac!r}: expected none, full, selective or attention")
    # a checkpointed block keeps its input (attention mode: + the attention output); the others
    # keep everything; one block's full working set is live during a recompute
    ckpt = len(checkpointed_block_ids(layers, ac, ac_every, ac_skip_last))
    kept = (2 if ac == "attention" else 1) * input_per_block
    act = ckpt * kept + (layers - ckpt) * full_per_block + (full_per_block if ckpt else 0)
    act += local_tokens * (model_cfg.in_dim + model_cfg.out_dim) * 4 + tokens * micro_batch * model_cfg.out_dim * 4 * 2
    gb = {
        "params": (4 * n / shard + 2 * block * inflight_blocks) / GB,
        "grads": (4 * n / shard + 2 * block * inflight_blocks) / GB,
        "optimizer": 8 * n / shard / GB,
        "activations": act / GB,
        "reserve": reserve_gb,
    }
    return Plan(
        getattr(model_cfg, "name", "model"), n, tokens, dp_replicate, dp_shard, cp, ac, micro_batch, gpu_mem_gb, gb
    )


def max_ac_skip(model_cfg, frames: int, height: int, width: int, **plan_kw) -> int | None:
    """The most blocks `parallel.ac_skip_last` can leave un-checkpointed while the plan still fits
    (what spare memory buys: every skipped block saves its recompute); None if even 0 does not fit."""
    fits = lambda k: plan(model_cfg, frames, height, width, ac_skip_last=k, **plan_kw).fits  # noqa: E731
    if not fits(0):
        return None
    lo, hi = 0, model_cfg.num_layers  # memory grows with k: binary search for the last k that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def format_plan(p: Plan) -> str:
    rows = [
        f"model {p.model}: {p.params / 1e9:.2f}B params, {p.tokens:,} tokens/sample, micro-batch {p.micro_batch}",
        f"mesh dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} cp={p.cp} ({p.gpus} GPUs), AC={p.ac}",
        "per GPU:",
    ]
    rows += [f"  {k:<12} {v:8.1f} GB" for k, v in p.gb.items()]
    verdict = "fits" if p.fits else "does NOT fit"
    rows.append(f"  {'total':<12} {p.total_gb:8.1f} GB  -> {verdict} in {p.gpu_mem_gb:.0f} GB")
    return "\n".join(rows)


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def recommend(
    model_cfg,
    stages: list[tuple[str, int]],
    height: int = 480,
    width: int = 832,
    ac: str = "full",
    gpu_mem_gb: float = 80.0,
    gpus_per_node: int = 8,
    max_gpus: int = 4096,
    **plan_kw,
) -> list[tuple[str, Plan | None]]:
    """For each (stage name, frames): the smallest mesh (fewest GPUs, then smallest cp: the
    all-to-all is cheapest inside a node) that fits. cp must divide the heads and either divide
    `gpus_per_node` or be a multiple of it (no half-empty nodes); dp_shard runs over powers of two."""
    out: list[tuple[str, Plan | None]] = []
    cps = [c for c in _divisors(model_cfg.num_heads) if gpus_per_node % c == 0 or c % gpus_per_node == 0]
    for name, frames in stages:
        best: Plan | None = None
        for cp in cps:
            s = 1
            while cp * s <= max_gpus:
                p = plan(model_cfg, frames, height, width, 1, s, cp, ac, gpu_mem_gb, **plan_kw)
                if p.fits:
                    if best is None or (p.gpus, p.cp) < (best.gpus, best.cp):
                        best = p
                    break
                s *= 2
        out.append((name, best))
    return out


def format_recommendations(recs: list[tuple[str, Plan | None]], gpus_per_node: int = 8) -> str:
    rows = [f"{'stage':<8} {'tokens':>9} {'cp':>3} {'dp_shard':>8} {'GPUs':>5} {'nodes':>5} {'GB/GPU':>7}  AC"]
    for name, p in recs:
        if p is None:
            rows.append(f"{name:<8} does not fit within the GPU limit")
            continue
        nodes = math.ceil(p.gpus / gpus_per_node)
        note = "  (cp spans nodes: all-to-all over InfiniBand)" if p.cp > gpus_per_node else ""
        rows.append(
            f"{name:<8} {p.tokens:>9,} {p.cp:>3} {p.dp_shard:>8} {p.gpus:>5} {nodes:>5} {p.total_gb:>7.1f}  "
            f"{p.ac}{note}"
        )
    rows.append(
        "(minimum mesh per stage; add dp_shard/dp_replicate for throughput: it lowers the per-GPU share of "
        "params/optimizer)"
    )
    return "\n".join(rows)


def a2a_cost(cfg, tokens: int, cp: int, ac: str = "full") -> dict[str, float]:
    """Ulysses traffic per GPU per step: per attention layer 4 all-to-alls (q, k, v in; out back),
    each sending (cp-1)/cp of a [S/cp, d] bf16 shard; backward repeats them and full AC recomputes
    the forward ones (x3). A group wider than a node runs at its slowest link. Latency ignored."""
    shard_bytes = tokens / cp * cfg.dim * 2
    per_a2a = shard_bytes * (cp - 1) / cp
    passes = 3 if ac == "full" else 2
    total = per_a2a * 4 * cfg.num_layers * passes
    bw = NVLINK_GBS if cp <= GPUS_PER_NODE else IB_GBS
    return {"cp": cp, "bytes_per_gpu_GB": total / 1e9, "bandwidth_GBs": bw, "seconds_per_step": total / (bw * 1e9)}


def fsdp_comm_cost(params: int, shard: int, gpus_per_node: int = GPUS_PER_NODE) -> dict[str, float]:
    """FSDP2 traffic per GPU per optimizer step (one gradient sync): bf16 all-gather in forward and
    again in backward (blocks reshard after forward) + fp32 reduce-scatter of the gradients, each
    moving (shard-1)/shard of the full size through every GPU. A shard group wider than a node
    runs at InfiniBand speed. Unlike the Ulysses all-to-all this overlaps with compute (prefetch)."""
    total = params * (2 + 2 + 4) * (shard - 1) / shard
    bw = NVLINK_GBS if shard <= gpus_per_node else IB_GBS
    return {"bytes_per_gpu_GB": total / 1e9, "bandwidth_GBs": bw, "seconds_per_step": total / (bw * 1e9)}


def cluster_prediction(
    cfg,
    frames: int,
    gpus: int,
    height: int,
    width: int,
    flops_per_sample: float,
    tflops: float,
    ac: str = "full",
    peak_tflops: float = 989.0,
) -> dict | None:
    """First-order training-step prediction on `gpus` GPUs, one sample per CP group per step.

    Mesh: the smallest cp (inside a node, dividing the heads) for which cp x dp_shard = gpus fits
    this module's memory model. Time: `flops_per_sample` (model FLOPs of fwd + bwd) at `tflops`
    achieved per GPU, plus the Ulysses all-to-all (on the critical path), plus FSDP traffic only
    where it outlasts compute (it is prefetched). None when no mesh fits."""
    cps = [
        c for c in range(1, GPUS_PER_NODE + 1) if cfg.num_heads % c == 0 and gpus % c == 0 and GPUS_PER_NODE % c == 0
    ]
    p = next((q for c in cps if (q := plan(cfg, frames, height, width, dp_shard=gpus // c, cp=c, ac=ac)).fits), None)
    if p is None:
        return None
    compute = flops_per_sample / p.cp / (tflops * 1e12)
    a2a = a2a_cost(cfg, p.tokens, p.cp, ac)["seconds_per_step"] if p.cp > 1 else 0.0
    fsdp = fsdp_comm_cost(p.params, gpus)["seconds_per_step"]
    step = compute + a2a + max(0.0, fsdp - compute)
    samples = gpus // p.cp
    achieved = samples * flops_per_sample / step / gpus / 1e12
    return {
        "frames": frames,
        "tokens": p.tokens,
        "cp": p.cp,
        "dp_shard": p.dp_shard,
        "gb_per_gpu": p.total_gb,
        "global_batch": samples,
        "compute_s": compute,
        "a2a_s": a2a,
        "fsdp_comm_s": fsdp,
        "step_s": step,
        "samples_per_s": samples / step,
        "tokens_per_s": samples * p.tokens / step,
        "model_tflops_per_gpu": achieved,
        "mfu": achieved / peak_tflops,
    }
