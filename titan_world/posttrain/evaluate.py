"""How close a causal student's few-step stream is to the simulator and to its teacher.

The synthetic world gives the ground truth for a start frame and an action sequence, so a
generated clip is scored against it (PSNR/MSE of decoded frames, and the action-following
report of `titan_world.eval.action_following`, frame 0 given) next to the copy-last-frame
baseline. Clips come from *held-out* episodes (seeds from `HELD_OUT_SEED`, which the training
set never uses), so before/after comparisons see the same starts, actions and noise.

What DMD distils is the teacher's multi-step distribution, so the teacher is scored the same
way (`teacher_clip`: bidirectional I2V, Euler, many steps): it bounds what the student can
reach. `latent_mse_teacher` is the student's distance to the teacher's many-step sample for
the same clip — few-step vs many-step fidelity, which is what DMD is meant to improve.
"""

from __future__ import annotations

import numpy as np
import torch

from titan_world.data.synth import make_episode
from titan_world.data.writer import build_encoders
from titan_world.eval.action_following import action_following_report, detail_energy
from titan_world.model.action import ActionInputs
from titan_world.model.codec import codec_from_config, frames_to_video, video_to_frames
from titan_world.posttrain.causal import ChunkLayout
from titan_world.posttrain.config import PostTrainConfig
from titan_world.posttrain.distill import Batch
from titan_world.posttrain.rollout import RolloutInputs, self_rollout, student_sigmas
from titan_world.train.action_check import HELD_OUT_SEED, generate_i2v


def held_out_batches(
    cfg,
    num_clips: int,
    frames: int,
    use_actions: bool,
    device="cpu",
    seed: int = HELD_OUT_SEED,
    batch_size: int = 2,
    offset: int = 16,
) -> list[tuple[Batch, dict]]:
    """`num_clips` simulator episodes (seeds seed, seed+1, ...), the `frames` video frames from
    `offset` on (an episode's first second is nearly static: copy-last would score ~36 dB there),
    encoded like the training data, as (Batch, raw) pairs; raw holds frames and camera truth."""
    _, text_enc, _ = build_encoders(cfg)
    codec = codec_from_config(cfg.data.codec)
    seconds = (offset + frames - 1) / cfg.data.fps
    eps = [
        make_episode(seed + i, cfg.data.height, cfg.data.width, seconds, cfg.data.fps, level=cfg.data.synth_level)
        for i in range(num_clips)
    ]
    out = []
    for i in range(0, num_clips, batch_size):
        part = eps[i : i + batch_size]
        raw = {
            name: np.stack([getattr(e, name)[offset : offset + frames] for e in part])
            for name in ("frames", "actions", "c2w", "intrinsics")
        }
        video = torch.cat([frames_to_video(f[None]) for f in raw["frames"]])
        text = text_enc.encode([e.captions["narrative"] for e in part]).float().to(device)
        acts = None
        if use_actions:
            a = ActionInputs.from_video_frames(
                *(torch.from_numpy(raw[k]).float() for k in ("actions", "c2w", "intrinsics"))
            )
            acts = ActionInputs(a.keys.to(device), a.c2w.to(device), a.intrinsics.to(device))
        out.append((Batch(codec.encode(video).float().to(device), text, acts), raw))
    return out


@torch.no_grad()
def generate_clip(student, batch: Batch, pcfg: PostTrainConfig, num_frames: int, seed: int = 0) -> torch.Tensor:
    """Stream `num_frames` latent frames (frame 0 given) with all `denoise_steps` per chunk."""
    lay = ChunkLayout(num_frames, 1, pcfg.chunk_frames)
    acts = batch.actions.slice(0, num_frames) if batch.actions is not None else None
    inp = RolloutInputs(batch.latents[:, :, :1], batch.context, acts, lay, student.cfg.cond_channels > 0)
    gen = torch.Generator().manual_seed(seed)
    return self_rollout(
        student,
        inp,
        student_sigmas(pcfg.denoise_steps),
        gen,
        sink_frames=pcfg.sink_frames,
        window_frames=pcfg.window_frames,
    ).latents


@torch.no_grad()
def teacher_clip(teacher, batch: Batch, steps: int, shift: float, seed: int = 0) -> torch.Tensor:
    """The teacher's own sample: bidirectional I2V over the whole clip, `steps` Euler steps."""
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(seed)).to(batch.latents.device)
    return generate_i2v(teacher, batch.latents, batch.context, batch.actions, steps, shift, noise)


def gaussian_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between diagonal Gaussians fitted to the per-token latent vectors of two
    sets of generated frames ([B, C, F, h, w], frame 0 excluded): Σ_c (μa − μb)² + (σa − σb)².
    A distribution-level distance: independent of which noise produced which sample."""

    def stats(x: torch.Tensor):
        v = x[:, :, 1:].transpose(0, 1).reshape(x.shape[1], -1).double()
        return v.mean(1), v.std(1)

    (ma, sa), (mb, sb) = stats(a), stats(b)
    return float(((ma - mb) ** 2 + (sa - sb) ** 2).sum())


@torch.no_grad()
def score_clips(
    clips: list[torch.Tensor], batches: list[tuple[Batch, dict]], codec, reference: list[torch.Tensor] | None = None
) -> dict[str, float]:
    """Mean over clips of: latent MSE vs ground truth (and vs `reference`, e.g. teacher samples),
    frame PSNR/MSE vs the simulator, copy-last PSNR, action-following yaw error; `detail`: the
    generated frames' high-frequency energy over the simulator's (frame 0, given, excluded; 1 = as
    sharp as the truth, < 1 blurrier) — PSNR rewards blur, detail shows it."""
    lat_mse, ref_mse, psnr, mse, copy_psnr, yaw, e_gen, e_sim = [], [], [], [], [], [], [], []
    for j, (gen, (batch, raw)) in enumerate(zip(clips, batches)):
        lat_mse.append(float((gen[:, :, 1:] - batch.latents[:, :, 1:]).pow(2).mean()))
        if reference is not None:
            ref_mse.append(float((gen[:, :, 1:] - reference[j][:, :, 1:]).pow(2).mean()))
        g_frames, t_frames = (video_to_frames(codec.decode(x.float().cpu())) for x in (gen, batch.latents))
        for i in range(len(g_frames)):
            e_gen.append(detail_energy(g_frames[i][1:]).mean())
            e_sim.append(detail_energy(t_frames[i][1:]).mean())
            rep = action_following_report(
                g_frames[i], t_frames[i], context_frames=1, poses=raw["c2w"][i], intrinsics=raw["intrinsics"][i, 0]
            )
            fe = rep["frame_error"]
            psnr.append(fe["model"]["psnr"])
            mse.append(fe["model"]["mse"])
            copy_psnr.append(fe["copy_last"]["psnr"])
            y = rep["camera"]["model"]["yaw_mae_deg"]
            if y is not None:
                yaw.append(y)
    out = {
        "latent_mse": float(np.mean(lat_mse)),
        "psnr": float(np.mean(psnr)),
        "frame_mse": float(np.mean(mse)),
        "copy_last_psnr": float(np.mean(copy_psnr)),
        "yaw_mae_deg": float(np.mean(yaw)) if yaw else float("nan"),
        "detail": float(np.mean(e_gen) / max(np.mean(e_sim), 1e-12)),
    }
    out["gauss_gt"] = gaussian_distance(torch.cat(clips), torch.cat([b.latents for b, _ in batches]))
    if reference is not None:
        out["latent_mse_teacher"] = float(np.mean(ref_mse))
        out["gauss_teacher"] = gaussian_distance(torch.cat(clips), torch.cat(reference))
    return out


@torch.no_grad()
def evaluate_student(
    student,
    batches: list[tuple[Batch, dict]],
    pcfg: PostTrainConfig,
    codec,
    seed: int = 0,
    reference: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """The student's `denoise_steps`-step stream of every clip (same noise seed for every student)."""
    clips = [generate_clip(student, b, pcfg, b.latents.shape[2], seed + j) for j, (b, _) in enumerate(batches)]
    return score_clips(clips, batches, codec, reference)


@torch.no_grad()
def evaluate_teacher(
    teacher, batches: list[tuple[Batch, dict]], codec, steps: int = 20, shift: float = 3.0, seed: int = 0
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """The teacher's many-step samples, scored like a student; also returned as the reference."""
    clips = [teacher_clip(teacher, b, steps, shift, seed + j) for j, (b, _) in enumerate(batches)]
    return score_clips(clips, batches, codec), clips


TABLE_COLUMNS = {
    "psnr": "PSNR dB",
    "latent_mse": "latent MSE",
    "detail": "detail",
    "gauss_gt": "gauss_gt",
    "gauss_teacher": "gauss_teacher",
    "latent_mse_teacher": "latent MSE vs teacher",
    "yaw_mae_deg": "yaw MAE °",
}


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table of `score_clips` results, one row per model (— where a metric is absent)."""
    lines = ["| model | " + " | ".join(TABLE_COLUMNS.values()) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, m in rows.items():
        cells = [f"{m[k]:.4g}" if k in m else "—" for k in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
