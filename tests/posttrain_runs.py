"""What the multi-rank post-training tests share: tiny job settings, the teacher they start from,
and readers for what a run leaves (metrics.jsonl, the exported student)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# 32x32 video (16 tokens per latent frame), 2 student sigmas, 2-chunk rollouts, GAN head on;
# train.grad_clip so small that every step clips: the norm over shards must be the full one.
COMMON = [
    "data.height=32",
    "data.width=32",
    "data.synth_episodes=4",
    "data.synth_seconds=1.0",
    "run.progress=false",
    "run.wandb=disabled",
    "train.ckpt_every=0",
    "posttrain.batch_size=1",
    "posttrain.clip_frames=9",
    "posttrain.denoise_steps=[1000,500]",
    "posttrain.rollout_chunks=2",
    "posttrain.grad_chunks=2",
    "posttrain.fake_updates=1",
    "posttrain.gan_weight=0.1",
    "posttrain.student_lr=1e-3",
    "posttrain.fake_lr=1e-3",
    "posttrain.causal_lr=1e-3",
    "train.grad_clip=0.002",
    # the exported DMD student is its EMA: averaging from step 1, and 0.5 lets 3 steps move it measurably
    "posttrain.ema_decay=0.5",
    "posttrain.ema_start_step=1",
]


def save_teacher(path: Path, *overrides: str) -> None:
    """A tiny action model with a non-zero head (Wan zero-inits it: the scores need a signal)."""
    from titan_world.config import load_config
    from titan_world.model import build_model, save_pretrained
    from titan_world.model.moe import experts

    torch.manual_seed(0)
    teacher = build_model(load_config(None, ["model.action.enabled=true", *overrides]).model)
    for expert in experts(teacher):
        for p in expert.head.parameters():
            p.data.normal_(0, 0.02)
    save_pretrained(teacher, path)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
