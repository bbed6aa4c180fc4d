"""`titan-world distill-decoder [--config FILE] [key=value ...]`: teach a light streaming decoder
to reproduce the codec's decode (`decoder.*` keys; titan_world/model/light_decoder.py).

The teacher is the codec the config names (`data.codec`: the Wan VAE with real weights, or the
tiny codec of the embedded default); the inputs are latent clips from the training dataset
(`data.path`), cut as training cuts them. Loss: L1 on pixels plus L1 on horizontal and vertical
pixel differences (edges). Writes RUN_DIR/decoder/ (for `serving.light_decoder=RUN_DIR`),
RUN_DIR/metrics.jsonl, and prints the decoder's PSNR against the teacher on held-out clips and
its size against the teacher's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from launch.cli_common import add_config_arguments, config_from_args
from titan_world.config import resolve_run_dir, save_config
from titan_world.data.loader import build_train_loader, check_data_path, prepare_dataset
from titan_world.model.codec import check_frame_count, codec_from_config
from titan_world.model.light_decoder import LightDecoder, LightDecoderConfig, save_light_decoder
from titan_world.train.metrics import MetricsLogger
from titan_world.train.optim import build_optimizer, lr_factor, set_lr


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences of two videos [B, 3, T, H, W]."""
    dx = lambda v: v[..., :, 1:] - v[..., :, :-1]  # noqa: E731
    dy = lambda v: v[..., 1:, :] - v[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(a), dx(b)) + F.l1_loss(dy(a), dy(b))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def _teacher_name(cfg) -> str:
    c = cfg.data.codec
    return f"wan_vae:{c.path}" if c.kind == "wan_vae" else f"tiny(stride {c.spatial_stride}, channels {c.channels})"


def distill_decoder(cfg) -> dict:
    """Train, save RUN_DIR/decoder/, return the final metrics (also in RUN_DIR/decoder_metrics.json)."""
    d = cfg.decoder
    check_frame_count(d.clip_frames, "decoder.clip_frames")
    check_data_path(cfg)  # before any work: a data.path that is neither a dataset nor synthetic data is refused
    run_dir = resolve_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(d.seed)
    teacher = codec_from_config(cfg.data.codec, device=device)
    prepare_dataset(cfg, progress=cfg.run.progress)
    decoder = LightDecoder(LightDecoderConfig(teacher.latent_channels, teacher.stride[1], d.width, d.depth)).to(device)
    opt = build_optimizer(
        list(decoder.parameters()), argparse.Namespace(lr=d.lr, betas=(0.9, 0.99), weight_decay=0.0), device
    )
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    loader = build_train_loader(
        cfg, d.clip_frames, seed=d.seed, batch_size=d.batch_size, global_batch=("decoder.batch_size", d.batch_size)
    )
    metrics = MetricsLogger(run_dir, cfg, rank=0, total_steps=d.steps, initial_step=0, resumed=False)
    batches = loader.batches()
    try:
        for step in range(d.steps):
            latents = next(batches)["latents"].to(device)
            with torch.no_grad():
                target = teacher.decode(latents).float()
            set_lr(opt, d.lr * lr_factor(step, d.steps, d.warmup_steps, "cosine", 0.1))
            with autocast:
                pred = decoder(latents).float()
            pixel, edges = F.l1_loss(pred, target), edge_l1(pred, target)
            loss = pixel + d.edge_weight * edges
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            record = {"step": step + 1, "loss": loss.item(), "l1": pixel.item(), "edge_l1": edges.item()}
            metrics.log(record)
            metrics.progress(1, {"loss": f"{record['loss']:.4f}"})
    finally:
        loader.close()
        metrics.close()

    result = evaluate(decoder, teacher, cfg)
    save_light_decoder(decoder, run_dir / "decoder", teacher=_teacher_name(cfg))
    result |= {"decoder": str(run_dir / "decoder"), "teacher": _teacher_name(cfg), "steps": d.steps}
    (run_dir / "decoder_metrics.json").write_text(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def evaluate(decoder: LightDecoder, teacher, cfg) -> dict:
    """PSNR of the decoder against the teacher on clips the training never drew (another seed),
    and the decoder's parameter count against the teacher's (the Wan VAE's decoder half)."""
    d, device = cfg.decoder, next(decoder.parameters()).device
    loader = build_train_loader(cfg, d.clip_frames, seed=d.seed + 1_000_003, batch_size=d.batch_size)
    scores = []
    try:
        for _, batch in zip(range(d.eval_batches), loader.batches()):
            latents = batch["latents"].to(device)
            scores.append(psnr(decoder.eval()(latents), teacher.decode(latents)))
    finally:
        loader.close()
        decoder.train()
    vae = getattr(teacher, "vae", None)
    return {
        "psnr_vs_teacher_db": sum(scores) / len(scores),
        "decoder_params": sum(p.numel() for p in decoder.parameters()),
        "teacher_decoder_params": sum(p.numel() for p in vae.decoder.parameters()) if vae is not None else 0,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = distill_decoder(cfg)
    size = f"{result['decoder_params'] / 1e6:.2f}M parameters"
    if result["teacher_decoder_params"]:
        size += f" (the teacher's decoder: {result['teacher_decoder_params'] / 1e6:.1f}M)"
    print(
        f"light decoder: {result['decoder']}, {size}; PSNR against {result['teacher']} on held-out clips: "
        f"{result['psnr_vs_teacher_db']:.2f} dB"
    )
    print(f"serve with it: titan-world serve serving.light_decoder={Path(result['decoder']).parent}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="titan-world distill-decoder")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
