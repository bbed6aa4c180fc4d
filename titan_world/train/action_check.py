"""Do the actions matter? Generate held-out synthetic episodes from their first frame with the
true actions and with shuffled ones, and score both against the simulator's frames with the eval
area's `action_following_report`.

"Shuffled" is `titan-world eval action`'s baseline: the episode's own actions in a random order,
with the camera path they produce from the episode's first pose (`Episode.camera_path`, as `eval action`),
so the figure printed during training is the one the demo's goal is measured on.
Held-out: episode seeds start at 10,000 (the training set uses seeds 0 .. data.synth_episodes-1).
Both generations share the noise, so the only difference is the action input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from titan_world.conditioning import conditioned_denoiser, fill_given, noise_batch
from titan_world.data.actions import shuffled_actions
from titan_world.data.synth import make_episode
from titan_world.data.writer import build_encoders
from titan_world.diffusion.samplers import sample
from titan_world.eval.action_following import action_following_report
from titan_world.model import ActionInputs, WanMoE, expert_for, load_pretrained
from titan_world.model.codec import codec_from_config, frames_to_video, video_to_frames

HELD_OUT_SEED = 10_000  # first held-out episode seed: the training set uses seeds 0 .. data.synth_episodes-1


def _load(run_dir_or_model: str | Path | nn.Module) -> nn.Module:
    if isinstance(run_dir_or_model, nn.Module):
        return run_dir_or_model
    return load_pretrained(run_dir_or_model)  # a Wan folder, or a run dir's model/


def _episodes(cfg, num: int, frames: int, seed: int):
    seconds = (frames - 1) / cfg.data.fps
    return [
        make_episode(seed + i, cfg.data.height, cfg.data.width, seconds, cfg.data.fps, level=cfg.data.synth_level)
        for i in range(num)
    ]


@torch.no_grad()
def generate_i2v(
    model: nn.Module,
    clean: torch.Tensor,
    text: torch.Tensor,
    actions: ActionInputs | None,
    steps: int,
    shift: float,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Latents [B, C, F, h, w] from the first latent frame of `clean` (I2V), Euler sampling."""
    b, _, f = clean.shape[:3]
    cond_mask = torch.zeros(b, f, dtype=torch.bool)
    cond_mask[:, 0] = True
    denoise = conditioned_denoiser(model, text, clean, cond_mask, actions, with_i2v_channels=True)
    return sample(denoise, fill_given(noise, clean, cond_mask), steps, shift)


def action_following_check(
    run_dir_or_model: str | Path | nn.Module,
    cfg,
    num_episodes: int = 4,
    *,
    steps: int | None = None,
    seed: int = HELD_OUT_SEED,
    frames: int | None = None,
) -> dict[str, Any]:
    """Frame errors of generation with true vs shuffled actions on held-out episodes.

    `frames`: clip length (default `train.action_check_frames`, else the last stage's). Camera
    motion accumulates, so a longer clip separates true from shuffled actions more clearly: on the
    tiny default 1 s clips differ by noise-level amounts, 2 s clips by ~6%.

    `run_dir_or_model`: a run dir (its model/), a Wan folder, or a model. Returns means over the
    episodes (`mse_true`, `mse_shuffled`, `mse_copy_last`, PSNRs), `actions_help` (true < shuffled)
    and the per-episode reports of `titan_world.eval.action_following.action_following_report`.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes={num_episodes}: expected >= 1")
    model = _load(run_dir_or_model).eval().float()
    stage = cfg.train.stages[-1]
    frames = frames or cfg.train.action_check_frames or stage.frames
    _, text_enc, _ = build_encoders(cfg)
    codec = codec_from_config(cfg.data.codec)
    eps = _episodes(cfg, num_episodes, frames, seed)
    video = torch.cat([frames_to_video(e.frames[None]) for e in eps])
    clean = codec.encode(video).float()
    text = text_enc.encode([e.captions["narrative"] for e in eps]).float()

    def acts(controls: list[tuple[np.ndarray, np.ndarray]]) -> ActionInputs:
        stack = lambda arrays: torch.from_numpy(np.stack(arrays)).float()  # noqa: E731
        keys, c2w = zip(*controls)
        return ActionInputs.from_video_frames(stack(keys), stack(c2w), stack([e.intrinsics for e in eps]))

    n = len(eps)
    true_a = acts([(e.actions, e.c2w) for e in eps])
    shuffled = [shuffled_actions(e.actions) for e in eps]
    shuf_a = acts([(keys, e.camera_path(keys)) for keys, e in zip(shuffled, eps)])
    both = ActionInputs(
        *(
            torch.cat([a, s])
            for a, s in zip((true_a.keys, true_a.c2w, true_a.intrinsics), (shuf_a.keys, shuf_a.c2w, shuf_a.intrinsics))
        )
    )
    half = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    noise = torch.cat([half, half])  # the same noise for the true and the shuffled batch: only the actions differ
    lat = generate_i2v(
        model,
        clean.repeat(2, 1, 1, 1, 1),
        text.repeat(2, 1, 1),
        both if model_uses_actions(model) else None,
        steps or cfg.train.sample_steps,
        stage.shift,
        noise,
    )
    generated = video_to_frames(codec.decode(lat))
    reports = [
        action_following_report(
            generated[i],
            eps[i].frames,
            shuffled=generated[n + i],
            context_frames=1,
            poses=eps[i].c2w,
            intrinsics=eps[i].intrinsics[0],
        )
        for i in range(n)
    ]
    fe = lambda key, m: float(np.mean([r["frame_error"][key][m] for r in reports]))  # noqa: E731
    out = {
        "episodes": n,
        "frames": frames,
        "sample_steps": steps or cfg.train.sample_steps,
        "mse_true": fe("model", "mse"),
        "mse_shuffled": fe("shuffled", "mse"),
        "mse_copy_last": fe("copy_last", "mse"),
        "psnr_true": fe("model", "psnr"),
        "psnr_shuffled": fe("shuffled", "psnr"),
        "psnr_copy_last": fe("copy_last", "psnr"),
        "reports": reports,
    }
    out["actions_help"] = out["mse_true"] < out["mse_shuffled"]
    if model_uses_actions(model):  # one-step denoising at sigma 0.5: a low-variance view of the same question
        out["denoise_mse_true"], out["denoise_mse_shuffled"] = _denoise_errors(model, clean, text, true_a, shuf_a, half)
    return out


@torch.no_grad()
def _denoise_errors(
    model: nn.Module,
    clean: torch.Tensor,
    text: torch.Tensor,
    true_a: ActionInputs,
    shuf_a: ActionInputs,
    noise: torch.Tensor,
    sigma: float = 0.5,
) -> tuple[float, float]:
    """Latent x0 error of one prediction from x_t at `sigma` (first frame given) with true vs shuffled actions."""
    b, _, f = clean.shape[:3]
    cond_mask = torch.zeros(b, f, dtype=torch.bool)
    cond_mask[:, 0] = True
    nb = noise_batch(clean, cond_mask, torch.full((b,), sigma), noise, with_i2v_channels=True)
    net = model.expert(expert_for(sigma * 1000, model.boundary)) if isinstance(model, WanMoE) else model
    errs = []
    for a in (true_a, shuf_a):
        x0 = nb.x_t - nb.sigma[:, None, :, None, None] * net(nb.x_t, nb.t, text, cond=nb.cond, actions=a)
        errs.append(float(((x0 - clean) ** 2)[:, :, 1:].mean()))
    return errs[0], errs[1]


def model_uses_actions(model: nn.Module) -> bool:
    net = model.high if isinstance(model, WanMoE) else model
    return getattr(net, "action_embedding", None) is not None


def format_check(result: dict[str, Any]) -> str:
    margin = 1.0 - result["mse_true"] / result["mse_shuffled"]
    verdict = (
        f"actions matter ({margin:.1%} lower error)"
        if result["actions_help"]
        else "NO measurable effect of the actions"
    )
    return (
        f"[action check] {result['episodes']} held-out episodes x {result['frames']} frames, "
        f"{result['sample_steps']} sampler steps: "
        f"frame MSE true actions {result['mse_true']:.5f} vs shuffled {result['mse_shuffled']:.5f} "
        f"(copy-last-frame {result['mse_copy_last']:.5f}); PSNR {result['psnr_true']:.2f} vs "
        f"{result['psnr_shuffled']:.2f} dB -> {verdict}"
        + (
            f"; one-step denoising latent MSE true {result['denoise_mse_true']:.5f} vs shuffled "
            f"{result['denoise_mse_shuffled']:.5f}"
            if "denoise_mse_true" in result
            else ""
        )
    )
