"""`titan-world eval action`: action following of a model on held-out synthetic-world episodes.

Each episode (agent seed S + i) is rendered by the simulator; the model starts from its first
frame and is driven by its actions. A bidirectional model is rolled out in clips (each clip starts
from the last frame the previous one generated); a block-causal student is streamed through the
serving engine, as `titan-world serve` streams it (both via `titan_world.generate`). Scored:
the first clip (frame error vs the simulator, copy-last-frame and shuffled-action baselines,
camera motion), the whole stream in windows (detail, colour histogram: drift) and the frames
where the agent is back where it was earlier (revisits vs first visits). docs/eval.md describes
every figure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from titan_world.config import TitanConfig, load_config
from titan_world.data.actions import shuffled_actions
from titan_world.data.synth import Episode, episode_frames, make_episode
from titan_world.eval.action_following import (
    _psnr,
    action_following_report,
    drift_windows,
    find_revisits,
    revisit_errors,
)
from titan_world.eval.report import write_action_report
from titan_world.generate import (
    GenerationInputs,
    generate_bidirectional,
    generate_causal,
    load_generation_model,
    resolve_device,
)
from titan_world.model.codec import codec_from_config
from titan_world.model.text_encoder import build_text_encoder

log = logging.getLogger("titan_world.eval.action")


def run_config_path(checkpoint: str | Path) -> Path | None:
    """config.yaml of the run a checkpoint comes from: RUN/config.yaml, or the one above an exported
    model/ folder (training and post-training write it there); None when there is none."""
    p = Path(checkpoint)
    return next((d / "config.yaml" for d in (p, p.parent) if (d / "config.yaml").is_file()), None)


def run_config(checkpoint: str | Path) -> tuple[TitanConfig, str]:
    """The config the checkpoint's run was trained with; the packaged default when there is none.
    -> (config, where from)."""
    path = run_config_path(checkpoint)
    if path is not None:
        return load_config(path), str(path)
    log.warning("%s: no config.yaml in the run folder; rendering episodes with the default config", checkpoint)
    return load_config(), "default"


class Rollout:
    """A loaded model that continues from a first frame under given actions (generate's samplers)."""

    def __init__(self, cfg: TitanConfig, checkpoint: str, device: str = "cpu", steps: int = 20, shift: float = 5.0):
        self.cfg, self.dev = cfg, resolve_device(device)
        dtype = torch.bfloat16 if self.dev.type == "cuda" else torch.float32
        self.model, self.source = load_generation_model(cfg, checkpoint, self.dev, dtype)
        mc = self.model.cfg
        self.codec = codec_from_config(cfg.data.codec, device=self.dev)
        te = cfg.data.text_encoder
        self.text = build_text_encoder(te.kind, mc.text_dim, mc.text_len, te.path, device=self.dev)
        self.causal = bool(getattr(mc, "causal_chunk_frames", 0))
        self.steps, self.shift = steps, shift
        self.kind = "streamed causal student" if self.causal else "chunked bidirectional"

    def __call__(self, inputs: GenerationInputs, clip_frames: int, seed: int) -> np.ndarray:
        """uint8 [T', H, W, 3], T' <= T (a stream stops at its last whole chunk)."""
        if self.causal:
            return generate_causal(self.cfg, self.model, self.codec, self.text, inputs, seed=seed, source=self.source)
        out, start, t = [inputs.first_frame[None]], 0, len(inputs.actions)
        while start < t - 1:
            sl = slice(start, min(start + clip_frames, t))
            clip = GenerationInputs(
                out[-1][-1],
                inputs.prompt,
                inputs.actions[sl],
                inputs.c2w[sl],
                inputs.intrinsics[sl],
                level=inputs.level,
            )
            video = generate_bidirectional(
                self.model,
                self.codec,
                self.text,
                clip,
                steps=self.steps,
                shift=self.shift,
                seed=seed + start,
                device=self.dev,
            )
            out.append(video[1:])
            start = sl.stop - 1
        return np.concatenate(out)


def episode_inputs(ep: Episode, frames: int, actions: np.ndarray | None = None) -> GenerationInputs:
    """The episode's first frame and controls. Other `actions` than the episode's get the camera path
    they produce (replayed from the first pose, as serving and `generate` derive it): the camera is
    part of the control, so a baseline that kept the simulator's path would still be told the way.
    That path stays inside the episode's level, as the simulator would have moved the camera."""
    if actions is None:
        acts, c2w = ep.actions[:frames], ep.c2w[:frames]
    else:
        acts = actions
        c2w = ep.camera_path(actions)
    return GenerationInputs(
        ep.frames[0], ep.captions["narrative"], acts, c2w, ep.intrinsics[:frames], ep.frames[:frames], ep.world
    )


def _mean_errors(reports: list[dict], key: str) -> dict[str, Any]:
    per_frame = np.mean([r["frame_error"][key]["mse_per_frame"] for r in reports], axis=0)
    mse = float(per_frame.mean())
    return {
        "mse": mse,
        "mae": float(np.mean([r["frame_error"][key]["mae"] for r in reports])),
        "psnr": _psnr(mse),
        "psnr_per_frame": [_psnr(float(m)) for m in per_frame],
        "mse_per_frame": per_frame.tolist(),
    }


def _mean_windows(drifts: list[dict]) -> dict[str, Any]:
    n = min(len(d["windows"]) for d in drifts)
    keys = ("detail_ratio", "colour_hist_distance", "psnr")
    windows = [
        {**drifts[0]["windows"][i], **{k: float(np.mean([d["windows"][i][k] for d in drifts])) for k in keys}}
        for i in range(n)
    ]
    ratio = {
        k: (windows[-1][k] / windows[0][k] if n >= 2 and windows[0][k] > 1e-12 else None)
        for k in ("detail_ratio", "colour_hist_distance")
    }
    return {
        "window_seconds": drifts[0]["window_seconds"],
        "windows": windows,
        "last_over_first": ratio,
        "per_episode": drifts,
    }


def _mean_revisits(per_episode: list[dict]) -> dict[str, Any]:
    """Frame-weighted over episodes."""
    out: dict[str, Any] = {"frames": {k: sum(r["frames"][k] for r in per_episode) for k in ("revisit", "first_visit")}}
    for name in ("model", "copy_last"):
        row = {}
        for k in ("revisit", "first_visit"):
            pairs = [(r[name][k]["mse"], r["frames"][k]) for r in per_episode if r[name][k]["mse"] is not None]
            n = sum(c for _, c in pairs)
            mse = sum(m * c for m, c in pairs) / n if n else None
            row[k] = {"mse": mse, "psnr": None if mse is None else _psnr(mse)}
        out[name] = row
    revisit, first = out["model"]["revisit"]["psnr"], out["model"]["first_visit"]["psnr"]
    out["revisit_minus_first_visit_psnr"] = revisit - first if revisit is not None and first is not None else None
    return out


# The demo world's targets (docs/eval.md): margins over the baselines on the scored clip, and a long
# stream whose last window keeps the first window's statistics within DRIFT_TOLERANCE.
MARGIN_VS_SHUFFLED_DB = 1.5
MARGIN_VS_COPY_LAST_DB = 3.0
DRIFT_TOLERANCE = 1.5


def goal_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target figure with its value and pass/fail (`passed` None: reported, no target;
    a drift figure of a stream shorter than two windows fails as unmeasured)."""
    beats, drift = report["beats"], report["drift"]["last_over_first"]
    detail, colour = drift["detail_ratio"], drift["colour_hist_distance"]
    revisit = report["revisits"]["revisit_minus_first_visit_psnr"]
    rows = [
        (
            "PSNR minus shuffled actions (dB)",
            beats["psnr_vs_shuffled"],
            f">= {MARGIN_VS_SHUFFLED_DB}",
            beats["psnr_vs_shuffled"] >= MARGIN_VS_SHUFFLED_DB,
        ),
        (
            "PSNR minus copy-last frame (dB)",
            beats["psnr_vs_copy_last"],
            f">= {MARGIN_VS_COPY_LAST_DB}",
            beats["psnr_vs_copy_last"] >= MARGIN_VS_COPY_LAST_DB,
        ),
        (
            "detail ratio, last / first window",
            detail,
            f"{1 / DRIFT_TOLERANCE:.2f} .. {DRIFT_TOLERANCE}",
            detail is not None and 1 / DRIFT_TOLERANCE <= detail <= DRIFT_TOLERANCE,
        ),
        (
            "colour distance, last / first window",
            colour,
            f"<= {DRIFT_TOLERANCE}",
            colour is not None and colour <= DRIFT_TOLERANCE,
        ),
        ("PSNR at revisits minus first visits (dB)", revisit, "reported", None),
    ]
    return [{"figure": f, "value": v, "target": t, "passed": p} for f, v, t, p in rows]


def evaluate_action_following(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    episodes: int = 4,
    seed: int = 10_000,
    seconds: float = 2.0,
    clip_seconds: float = 2.0,
    window_seconds: float = 10.0,
    steps: int = 20,
    shift: float | None = None,
    device: str = "cpu",
    revisit_radius: float = 0.5,
    revisit_yaw_deg: float = 30.0,
    revisit_gap_seconds: float = 3.0,
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Render, roll out, score, write OUT/action_following.json + index.html; returns the report."""
    if episodes < 1:
        raise ValueError(f"--episodes {episodes}: expected at least 1")
    if seconds < clip_seconds:
        raise ValueError(f"--seconds {seconds}: expected at least the scored clip ({clip_seconds} s)")
    if window_seconds <= 0:
        raise ValueError(f"--window-seconds {window_seconds}: expected > 0")
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such folder")
    cfg, cfg_source = run_config(checkpoint)
    d = cfg.data
    if d.synth_seed <= seed < d.synth_seed + d.synth_episodes:
        log.warning(
            "--seed %d: seeds %d..%d were used to make the training data; these episodes are not held out",
            seed,
            d.synth_seed,
            d.synth_seed + d.synth_episodes - 1,
        )
    if shift is not None and not shift > 0:
        raise ValueError(f"--shift {shift}: expected a positive flow shift")
    # a bidirectional model samples with the noise schedule it was last trained on
    roll = Rollout(cfg, str(checkpoint), device, steps, shift if shift is not None else cfg.train.stages[-1].shift)
    chunk = episode_frames(clip_seconds, d.fps)  # a bidirectional model's clip; the scored clip (<= it)
    clip = chunk
    reports, drifts, revisits, strips = [], [], [], {}
    for i in range(episodes):
        progress(f"episode {i + 1}/{episodes} (seed {seed + i}): rendering {seconds:g} s")
        ep = make_episode(seed + i, d.height, d.width, seconds=seconds, fps=d.fps, level=d.synth_level)
        stream = roll(episode_inputs(ep, ep.num_frames), chunk, seed=i)
        t = len(stream)
        sim = ep.frames[:t]
        progress(f"episode {i + 1}/{episodes}: {t} frames rolled out ({roll.kind}); shuffled-action clip")
        shuffled = roll(episode_inputs(ep, chunk, shuffled_actions(ep.actions[:chunk])), chunk, seed=i)
        clip = min(chunk, len(shuffled), t)  # a stream ends at its last whole chunk: score what both have
        if clip < 2:
            raise ValueError(
                f"the rollout gave {clip} frame(s): nothing to score after the first frame "
                f"(one chunk of the student is longer than the {clip_seconds:g} s clip)"
            )
        rep = action_following_report(
            stream[:clip],
            sim[:clip],
            shuffled=shuffled[:clip],
            context_frames=1,
            poses=ep.c2w[:clip],
            intrinsics=ep.intrinsics[0],
        )
        reports.append({"seed": seed + i, **rep})
        drifts.append(drift_windows(stream, sim, d.fps, window_seconds))
        rv = find_revisits(ep.c2w[:t], d.fps, revisit_radius, revisit_yaw_deg, revisit_gap_seconds)
        errs = revisit_errors({"model": stream, "copy_last": np.repeat(sim[:1], t, axis=0)}, sim, rv)
        revisits.append({"seed": seed + i, **errs, "pairs": list(zip(rv["revisit"], rv["earlier"]))})
        if i == 0:
            strips = {
                "clip": {"simulator": sim[:clip], "model": stream[:clip], "shuffled": shuffled[:clip]},
                "stream": {"simulator": sim, "model": stream},
            }
    fe = {k: _mean_errors(reports, k) for k in ("model", "shuffled", "copy_last")}
    report: dict[str, Any] = {
        "kind": "titan-world-eval/action-following",
        "version": 2,
        "settings": {
            "checkpoint": str(checkpoint),
            "model": roll.source,
            "config": cfg_source,
            "rollout": roll.kind,
            "episodes": episodes,
            "seeds": [seed + i for i in range(episodes)],
            "seconds": seconds,
            "fps": d.fps,
            "height": d.height,
            "width": d.width,
            "context_frames": 1,
            "num_frames": clip,
            "scored_frames": clip - 1,
            "stream_frames": len(strips["stream"]["model"]),
            "sample_steps": None if roll.causal else steps,
            "sample_shift": None if roll.causal else roll.shift,
            "window_seconds": window_seconds,
            "training_seeds": [d.synth_seed, d.synth_seed + d.synth_episodes - 1],
            "frame_range": "0..1",
        },
        "frame_error": fe,
        "beats": {f"psnr_vs_{k}": fe["model"]["psnr"] - fe[k]["psnr"] for k in ("shuffled", "copy_last")},
        "drift": _mean_windows(drifts),
        "revisits": {
            "radius_m": revisit_radius,
            "max_yaw_deg": revisit_yaw_deg,
            "min_gap_seconds": revisit_gap_seconds,
            **_mean_revisits(revisits),
            "per_episode": revisits,
        },
        "episodes": reports,
    }
    report["goals"] = goal_checks(report)
    write_action_report(report, out_dir, frames=strips["clip"], stream_frames=strips["stream"], fps=d.fps)
    return report
