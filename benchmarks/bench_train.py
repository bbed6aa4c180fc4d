"""One training step (fwd + bwd + AdamW) of a model config at a given clip size.

    python -m benchmarks.bench_train                                   # tiny config, CPU
    python -m benchmarks.bench_train --device cuda --config wan2.1-1.3b --frames 81 --height 480 --width 832 \
        --grad-ckpt [--compile] [--no-diffusers]

Prints model-TFLOP/s (titan_world.model.flops: the formula the trainer logs), MFU (device peak
table), tokens/s, step time and peak memory for our WanDiT and, when diffusers is importable, for
diffusers' WanTransformer3DModel built from the same config and trained the same way (random
weights, bf16 on GPU, same loss, AdamW), and the step-rate ratio. Latents are random: VAE stride
4x8x8 (16 ch) for real configs, the TinyCodec (stride 4, 16 low-frequency channels) for the tiny one.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn

from benchmarks.common import model_config, write_json
from titan_world.model.codec import latent_frames


def _shapes(cfg, frames: int, height: int, width: int) -> tuple[int, int, int]:
    tiny = cfg.name == "tiny"
    s = 4 if tiny else 8
    return latent_frames(frames), height // s, width // s


def _step_timer(step_fn, warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def _train_step_fn(forward, params, batch, device, amp: bool):
    opt = (
        torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        if device.type == "cuda"
        else torch.optim.AdamW(params, lr=1e-5, foreach=True)
    )
    x, target = batch

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = forward(x)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _measure(
    name: str, model: nn.Module, forward, batch, device, amp, flops: float, peak, warmup: int, iters: int, tokens: int
) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dt = _step_timer(
        _train_step_fn(forward, [p for p in model.parameters() if p.requires_grad], batch, device, amp),
        warmup,
        iters,
        device,
    )
    tflops = flops / dt / 1e12
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "model": name,
        "step_s": dt,
        "model_tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "tokens_per_s": tokens / dt,
        "peak_mem_gb": mem,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="model config name under configs/model/ (or a path)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grad-ckpt", action="store_true", help="full activation checkpointing (both models)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our blocks")
    ap.add_argument("--attn-backend", default=None, help="override model.attn_backend (sdpa, flex, flash, ...)")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from parallel.checkpointing import apply_activation_checkpointing
    from parallel.compile import compile_blocks
    from parallel.config import ParallelConfig
    from titan_world.model import WanDiT
    from titan_world.model.flops import device_peak_tflops, train_step_flops

    device = torch.device(args.device)
    amp = device.type == "cuda"
    dtype = torch.bfloat16 if amp else torch.float32
    cfg = model_config(args.config)
    cfg.num_experts = 1
    if args.attn_backend:
        cfg.attn_backend = args.attn_backend
    f, h, w = _shapes(cfg, args.frames, args.height, args.width)
    flops = train_step_flops(cfg, args.batch, f, h, w)
    tokens = args.batch * f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    peak = device_peak_tflops(device, args.peak_tflops)
    print(
        f"[bench_train] {cfg.name}: {tokens} tokens/sample-batch ({f}x{h}x{w} latents), {flops / 1e12:.1f} "
        "model-TFLOP per step, "
        f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, peak {peak} "
        "TFLOP/s"
    )

    torch.manual_seed(0)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, cfg.out_dim, f, h, w, generator=g).to(device, dtype)
    cond = (
        torch.randn(args.batch, cfg.in_dim - cfg.out_dim, f, h, w, generator=g).to(device, dtype)
        if cfg.in_dim > cfg.out_dim
        else None
    )
    ctx = torch.randn(args.batch, cfg.text_len, cfg.text_dim, generator=g).to(device, dtype)
    t = torch.full((args.batch,), 500.0, device=device)
    target = torch.randn(args.batch, cfg.out_dim, f, h, w, generator=g).to(device)
    results = []

    with torch.device(device):
        ours = WanDiT(cfg)
    ours.set_attn_backend(cfg.attn_backend, device.type)
    if args.grad_ckpt:
        apply_activation_checkpointing(ours, ParallelConfig(activation_checkpoint="full"))
    if args.compile:
        compile_blocks(ours)
    results.append(
        _measure(
            "titan_world.WanDiT",
            ours,
            lambda inp, model=ours: model(inp, t, ctx, cond=cond),  # bound now: `ours` is deleted below
            (x, target),
            device,
            amp,
            flops,
            peak,
            args.warmup,
            args.iters,
            tokens,
        )
    )
    print(json.dumps(results[-1]))
    del ours
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.no_diffusers:
        try:
            from diffusers import WanTransformer3DModel
        except Exception as e:  # optional
            print(f"[bench_train] diffusers not importable ({type(e).__name__}); skipping the comparison")
        else:
            with torch.device(device):
                ref = WanTransformer3DModel(
                    patch_size=tuple(cfg.patch_size),
                    num_attention_heads=cfg.num_heads,
                    attention_head_dim=cfg.head_dim,
                    in_channels=cfg.in_dim,
                    out_channels=cfg.out_dim,
                    text_dim=cfg.text_dim,
                    freq_dim=cfg.freq_dim,
                    ffn_dim=cfg.ffn_dim,
                    num_layers=cfg.num_layers,
                    cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads",
                    eps=cfg.eps,
                )
            if args.grad_ckpt:
                ref.enable_gradient_checkpointing()
            inp_cond = (lambda inp: torch.cat([inp, cond], 1)) if cond is not None else (lambda inp: inp)
            results.append(
                _measure(
                    "diffusers.WanTransformer3DModel",
                    ref,
                    lambda inp: ref(inp_cond(inp), t, ctx, return_dict=False)[0],
                    (x, target),
                    device,
                    amp,
                    flops,
                    peak,
                    args.warmup,
                    args.iters,
                    tokens,
                )
            )
            print(json.dumps(results[-1]))
            print(f"[bench_train] step-rate ratio ours/diffusers: {results[1]['step_s'] / results[0]['step_s']:.2f}x")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
