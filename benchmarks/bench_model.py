"""DiT speed: forward and training step of our WanDiT vs diffusers' WanTransformer3DModel.

Same config, same weights layout, same input, same process, so the ratio is meaningful:
    python -m benchmarks.bench_model --model wan2.1-1.3b --device cuda            # 480p x 81 frames
    python -m benchmarks.bench_model --model wan2.2-i2v-a14b --layers 4 --device cuda
    python -m benchmarks.bench_model --model tiny --frames 17 --height 64 --width 64   # CPU smoke
Baselines: diffusers eager (its default SDPA backend; gradient checkpointing for the train step,
as RESULTS.md's 2.754 s reference); then diffusers with our SDPA priority (cuDNN first) so the reader
sees how much of the gain is the attention kernel and how much the rest.
"""

from __future__ import annotations

import argparse
import gc

import torch

from benchmarks.common import HEADER, Row, model_config, peak_gb, reset_peak, time_fn
from titan_world.model.codec import default_vae_stride, latent_frames
from titan_world.model.config import ModelConfig
from titan_world.model.dit import WanDiT
from titan_world.model.flops import device_peak_tflops, sample_flops


def inputs(cfg: ModelConfig, frames: int, height: int, width: int, device, dtype):
    s = default_vae_stride(cfg)
    f = latent_frames(frames)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, cfg.in_dim, f, height // s, width // s, device=device, dtype=dtype, generator=g)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype, generator=g)
    t = torch.tensor([700.0], device=device)
    target = torch.randn(1, cfg.out_dim, f, height // s, width // s, device=device, dtype=dtype, generator=g)
    return x, t, ctx, target, (f, height // s, width // s)


def diffusers_model(cfg: ModelConfig, device, dtype):
    from diffusers import WanTransformer3DModel

    from titan_world.model.diffusers_names import native_config_to_diffusers

    kw = {k: v for k, v in native_config_to_diffusers(cfg).items() if not k.startswith("_")}
    return WanTransformer3DModel(**kw).to(device=device, dtype=dtype)


def ours_model(
    cfg: ModelConfig, device, dtype, ac: str, compile_blocks: bool, skip_last: int = 0, float8: str = "none"
):
    from parallel.checkpointing import apply_activation_checkpointing
    from parallel.compile import compile_blocks as compile_fn
    from parallel.config import ParallelConfig
    from parallel.float8 import apply_float8

    model = WanDiT(cfg).to(device=device, dtype=dtype)
    model.set_attn_backend("sdpa", device)
    apply_float8(model, float8)
    apply_activation_checkpointing(model, ParallelConfig(activation_checkpoint=ac, ac_every=2, ac_skip_last=skip_last))
    if compile_blocks:
        compile_fn(model)
    return model


def bench(name, model, call, x, t, ctx, target, flops, tokens, device, peak, phases, warmup, iters) -> list[Row]:
    rows = []
    if "fwd" in phases:
        reset_peak(device)
        with torch.no_grad():
            sec = time_fn(lambda: call(model, x, t, ctx), device, warmup, iters)
        rows.append(Row(name, "fwd", sec, flops.forward, tokens, peak_gb(device), peak))
    if "train" in phases:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

        def step():
            loss = torch.nn.functional.mse_loss(call(model, x, t, ctx).float(), target.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        reset_peak(device)
        sec = time_fn(step, device, warmup, iters)
        rows.append(Row(name, "train", sec, flops.train_step, tokens, peak_gb(device), peak))
        del opt
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan2.1-1.3b")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (e.g. the 14B expert on one GPU)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--phases", default="fwd,train")
    p.add_argument(
        "--variants",
        default="compile-attention,compile-full,compile-selective,eager-full",
        help="ours: {eager|compile}-{none|full|selective|attention}[:N][+RECIPE] activation checkpointing; "
        ":N leaves the last N blocks un-checkpointed (parallel.ac_skip_last), +RECIPE runs the blocks' "
        "GEMMs in FP8 (parallel.float8: rowwise|tensorwise), e.g. compile-attention:14+rowwise",
    )
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    phases = args.phases.split(",")
    cfg = model_config(args.model)
    cfg.action.enabled = False  # diffusers' Wan has no action adapter
    cfg.num_layers = args.layers or cfg.num_layers
    x, t, ctx, target, lat = inputs(cfg, args.frames, args.height, args.width, device, dtype)
    fl = sample_flops(cfg, *lat)
    peak = device_peak_tflops(device)
    print(
        f"{cfg.name}: {cfg.num_layers} layers, {args.frames} frames {args.width}x{args.height} -> {fl.tokens:,} "
        "tokens; "
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
        f"{torch.__version__}, {dtype}"
    )
    print(HEADER)
    base: dict[str, Row] = {}

    def report(rows):
        for r in rows:
            base.setdefault(r.phase, r)
            print(r.format(base[r.phase] if base[r.phase] is not r else None), flush=True)

    if not args.no_diffusers:
        try:
            ref = diffusers_model(cfg, device, dtype)
        except ImportError:
            print("diffusers not installed: no baseline")
        else:
            ref.enable_gradient_checkpointing()
            call = lambda m, x, t, c: m(x, t, c, return_dict=False)[0]  # noqa: E731
            report(
                bench(
                    "diffusers (default SDPA, GC)",
                    ref,
                    call,
                    x,
                    t,
                    ctx,
                    target,
                    fl,
                    fl.tokens,
                    device,
                    peak,
                    phases,
                    args.warmup,
                    args.iters,
                )
            )
            if device.type == "cuda":
                from titan_world.model.attention import prefer_cudnn_sdpa

                prefer_cudnn_sdpa()
                report(
                    bench(
                        "diffusers (cuDNN SDPA first, GC)",
                        ref,
                        call,
                        x,
                        t,
                        ctx,
                        target,
                        fl,
                        fl.tokens,
                        device,
                        peak,
                        phases,
                        args.warmup,
                        args.iters,
                    )
                )
            del ref
            gc.collect()

    def call(m, x, t, c):
        return m(x[:, : cfg.out_dim], t, c, cond=x[:, cfg.out_dim :] if cfg.in_dim > cfg.out_dim else None)

    for variant in args.variants.split(","):
        variant, _, float8 = variant.partition("+")  # "+rowwise": FP8 GEMMs
        mode, ac = variant.split("-")
        ac, _, skip = ac.partition(":")  # "attention:14": the last 14 blocks keep their activations
        label = (
            f"AC {ac}"
            + (f", last {skip} blocks not checkpointed" if skip else "")
            + (f", FP8 {float8}" if float8 else "")
        )
        try:
            model = ours_model(cfg, device, dtype, ac, mode == "compile", int(skip or 0), float8 or "none")
            report(
                bench(
                    f"titan-world ({mode}, {label})",
                    model,
                    call,
                    x,
                    t,
                    ctx,
                    target,
                    fl,
                    fl.tokens,
                    device,
                    peak,
                    phases,
                    args.warmup,
                    args.iters,
                )
            )
        except torch.OutOfMemoryError:
            print(f"titan-world ({mode}, {label}): out of memory")
        model = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
