"""How close a causal student's 4-step stream is to the simulator (the synthetic world's ground
truth for the same actions): PSNR/MSE of decoded frames and the action-following report
(`titan_world.eval.action_following`), frame 0 given. Used before/after each stage and by tests.
"""

from __future__ import annotations

import numpy as np
import torch

from titan_world.eval.action_following import action_following_report
from titan_world.posttrain.causal import ChunkLayout
from titan_world.posttrain.config import PostTrainConfig
from titan_world.posttrain.distill import Batch
from titan_world.posttrain.rollout import RolloutInputs, self_rollout, student_sigmas


def _frames(codec, latents: torch.Tensor) -> np.ndarray:
    video = codec.decode(latents.float().cpu())  # [B, 3, T, H, W] in [-1, 1]
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()


@torch.no_grad()
def generate_clip(student, batch: Batch, pcfg: PostTrainConfig, num_frames: int, seed: int = 0) -> torch.Tensor:
    """Stream `num_frames` latent frames (frame 0 given) with all `denoise_steps` per chunk."""
    lay = ChunkLayout(num_frames, 1, pcfg.chunk_frames)
    acts = batch.actions.slice(0, num_frames) if batch.actions is not None else None
    inp = RolloutInputs(batch.latents[:, :, :1], batch.context, acts, lay, student.cfg.cond_channels > 0)
    gen = torch.Generator().manual_seed(seed)
    return self_rollout(student, inp, student_sigmas(pcfg.denoise_steps), gen, sink_frames=pcfg.sink_frames, window_frames=pcfg.window_frames).latents


@torch.no_grad()
def evaluate_student(student, batches: list[tuple[Batch, dict]], pcfg: PostTrainConfig, codec, seed: int = 0) -> dict[str, float]:
    """Mean over clips: latent MSE, frame PSNR/MSE vs ground truth, action-following camera error."""
    lat_mse, psnr, mse, copy_psnr, yaw = [], [], [], [], []
    for batch, raw in batches:
        f = batch.latents.shape[2]
        gen = generate_clip(student, batch, pcfg, f, seed)
        lat_mse.append(float((gen[:, :, 1:] - batch.latents[:, :, 1:]).pow(2).mean()))
        g_frames, t_frames = _frames(codec, gen), _frames(codec, batch.latents)
        for i in range(len(g_frames)):
            rep = action_following_report(g_frames[i], t_frames[i], context_frames=1, poses=raw["c2w"][i], intrinsics=raw["intrinsics"][i, 0])
            fe = rep["frame_error"]
            psnr.append(fe["model"]["psnr"])
            mse.append(fe["model"]["mse"])
            copy_psnr.append(fe["copy_last"]["psnr"])
            y = rep["camera"]["model"]["yaw_mae_deg"]
            if y is not None:
                yaw.append(y)
    return {
        "latent_mse": float(np.mean(lat_mse)),
        "psnr": float(np.mean(psnr)),
        "frame_mse": float(np.mean(mse)),
        "copy_last_psnr": float(np.mean(copy_psnr)),
        "yaw_mae_deg": float(np.mean(yaw)) if yaw else float("nan"),
    }
