"""Run VBench dimensions over a folder of videos: per-video values, means, windows over time.

Models are loaded once per dimension from the paths in EvalConfig; a dimension whose path is
missing is reported as skipped with the config key and path it needs (never a number).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from titan_world.eval import dimensions as D
from titan_world.eval.config import ALL_DIMENSIONS, EvalConfig
from titan_world.eval.long_video import split_long_video
from titan_world.eval.models import ClipAesthetic, ModelLoadError, load_callable
from titan_world.eval.video_io import read_video

# dimension -> config keys of the model files it needs (with what each file is)
NEEDS: dict[str, dict[str, str]] = {
    "temporal_flickering": {},
    "dynamic_degree": {"raft_path": "RAFT optical flow (raft-things), TorchScript / pickled module / + raft_factory"},
    "motion_smoothness": {
        "amt_path": "AMT-S frame interpolation (amt-s.pth), TorchScript / pickled module / + amt_factory"
    },
    "imaging_quality": {
        "musiq_path": "MUSIQ SPAQ (pyiqa musiq_spaq_ckpt-358bb6af.pth), TorchScript / pickled module / + musiq_factory"
    },
    "aesthetic_quality": {
        "clip_path": "OpenAI CLIP ViT-L-14.pt (as VBench loads it) or a transformers CLIP folder",
        "aesthetic_head_path": "LAION sa_0_4_vit_l_14_linear.pth (nn.Linear(768,1) state dict)",
    },
    "overall_consistency": {"viclip_path": "ViCLIP-L/14 (InternVid), pickled module / + viclip_factory"},
}

# VBench reads these with OpenCV (BT.601 whatever the file's colour tag) and the others with
# decord (which follows the tag); video_io.COLOUR_MODES names both.
OPENCV_DIMENSIONS = ("temporal_flickering", "dynamic_degree", "motion_smoothness")


def colour_for(dimension: str) -> str:
    """The YUV->RGB conversion VBench's reader applies for `dimension` (read_video's `colour`)."""
    return "bt601" if dimension in OPENCV_DIMENSIONS else "tagged"


# minimum frames per dimension (below this a clip/window is not scored)
MIN_FRAMES = {
    "temporal_flickering": 2,
    "dynamic_degree": 2,
    "motion_smoothness": 3,
    "imaging_quality": 1,
    "aesthetic_quality": 1,
    "overall_consistency": 1,
}


def skip_reason(name: str, cfg: EvalConfig) -> dict[str, Any] | None:
    """None if the dimension can run; else {'reason', 'needs': {key: {'path', 'what'}}}."""
    needs = {}
    for key, what in NEEDS[name].items():
        path = getattr(cfg, key)
        if not path or not Path(path).exists():
            needs[key] = {"path": path, "what": what}
    if not needs:
        return None
    parts = [f"{k}={v['path']!r} ({'not set' if not v['path'] else 'does not exist'})" for k, v in needs.items()]
    return {"reason": f"model missing: {', '.join(parts)}", "needs": needs}


def load_model(name: str, cfg: EvalConfig) -> Any:
    """The callable a dimension scores with (None for weight-free dimensions)."""
    dev = cfg.device
    if name == "temporal_flickering":
        return None
    if name == "dynamic_degree":
        return load_callable(cfg.raft_path, cfg.raft_factory, dev)
    if name == "motion_smoothness":
        return load_callable(cfg.amt_path, cfg.amt_factory, dev)
    if name == "imaging_quality":
        return load_callable(cfg.musiq_path, cfg.musiq_factory, dev)
    if name == "aesthetic_quality":
        return ClipAesthetic(cfg.clip_path, cfg.aesthetic_head_path, dev, cfg.aesthetic_dtype)
    if name == "overall_consistency":
        return load_callable(cfg.viclip_path, cfg.viclip_factory, dev)
    raise KeyError(name)


def score_frames(name: str, frames: np.ndarray, fps: float, model: Any, cfg: EvalConfig, prompt: str | None) -> float:
    """One VBench value of `frames` on dimension `name`."""
    bs, dev = cfg.batch_size, cfg.device
    if name == "temporal_flickering":
        return D.temporal_flickering(frames)
    if name == "dynamic_degree":
        return D.dynamic_degree(frames, fps, model, bs, dev)
    if name == "motion_smoothness":
        return D.motion_smoothness(frames, model, bs, dev)
    if name == "imaging_quality":
        return D.imaging_quality(frames, model, bs, dev, cfg.imaging_quality_mode)
    if name == "aesthetic_quality":
        return D.aesthetic_quality(frames, model, model.image_size, max(bs, 1) * 8)
    if name == "overall_consistency":
        if not prompt:
            raise D.DimensionError("overall_consistency: no prompt for this video")
        return D.overall_consistency(frames, prompt, model, dev)
    raise KeyError(name)


def segments(num_frames: int, length: int, min_len: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) segments of `length` frames; a last partial one is kept if
    it has at least max(min_len, length // 2) frames."""
    if length <= 0 or num_frames <= length:
        return [(0, num_frames)]
    out = []
    for s in range(0, num_frames, length):
        e = min(s + length, num_frames)
        if e - s == length or e - s >= max(min_len, length // 2):
            out.append((s, e))
    return out


class PromptsError(ValueError):
    """`--prompts` names a missing or malformed file (reported without a traceback)."""


def read_prompts(videos: list[Path], cfg: EvalConfig) -> dict[str, tuple[str, str]]:
    """file name -> (prompt, source). Sources in order: cfg.prompts JSON, <stem>.txt beside
    the video, prompts.json in its folder, VBench's file-name convention ('<prompt>-<i>.mp4')."""
    table: dict[str, str] = {}
    if cfg.prompts:
        p = Path(cfg.prompts)
        if not p.is_file():
            raise PromptsError(f"prompts file {p} does not exist")
        try:
            table = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise PromptsError(f'prompts file {p}: not JSON ({e}); expected {{"name.mp4": "prompt"}}') from None
    out = {}
    for v in videos:
        side, folder_json = v.with_suffix(".txt"), v.parent / "prompts.json"
        if v.name in table:
            out[v.name] = (table[v.name], str(cfg.prompts))
        elif side.is_file():
            out[v.name] = (side.read_text().strip(), str(side))
        elif folder_json.is_file() and v.name in (js := json.loads(folder_json.read_text())):
            out[v.name] = (js[v.name], str(folder_json))
        else:
            out[v.name] = (re.sub(r"-\d+$", "", v.stem), "file name")
    return out


def _window_scores(
    name: str, frames: np.ndarray, fps: float, model: Any, cfg: EvalConfig, prompt: str | None
) -> tuple[list[float], list[float | None]]:
    """Per-window values (start seconds, value or None) for a video longer than one window."""
    if cfg.window_seconds <= 0 or fps <= 0:
        return [], []
    w = max(1, round(cfg.window_seconds * fps))
    if len(frames) <= w:
        return [], []
    starts, vals = [], []
    for s, e in segments(len(frames), w, MIN_FRAMES[name]):
        starts.append(s / fps)
        try:
            vals.append(score_frames(name, frames[s:e], fps, model, cfg, prompt))
        except D.DimensionError:
            vals.append(None)
    return starts, vals


def run_vbench(
    videos: list[Path],
    cfg: EvalConfig,
    dimensions: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score every video on every dimension; returns the results dict written as JSON."""
    dims = list(dimensions or cfg.dimensions)
    for d in dims:
        if d not in ALL_DIMENSIONS:
            raise ValueError(f"unknown dimension {d!r}; choose from {', '.join(ALL_DIMENSIONS)}")
    if not videos:
        raise ValueError("no videos to evaluate")
    if cfg.protocol not in ("vbench", "vbench-long"):
        raise ValueError(f"eval.protocol={cfg.protocol!r}: expected vbench|vbench-long")
    say = progress or (lambda _m: None)
    dim_info: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    for d in dims:
        skip = skip_reason(d, cfg)
        if skip:
            dim_info[d] = {"status": "skipped", **skip}
            say(f"{d}: skipped ({skip['reason']})")
            continue
        try:
            models[d] = load_model(d, cfg)
        except ModelLoadError as e:
            dim_info[d] = {
                "status": "skipped",
                "reason": f"model failed to load: {e}",
                "needs": {k: {"path": getattr(cfg, k), "what": w} for k, w in NEEDS[d].items()},
            }
            say(f"{d}: skipped ({e})")
            continue
        dim_info[d] = {"status": "ok", "models": {k: getattr(cfg, k) for k in NEEDS[d]}}
    prompts = read_prompts(videos, cfg)
    per_video: dict[str, Any] = {}
    failed: dict[str, dict[str, str]] = {}
    by_colour: dict[str, list[str]] = {}
    for d in models:
        by_colour.setdefault(colour_for(d), []).append(d)
    for v in videos:
        prompt, source = prompts[v.name]
        rec: dict[str, Any] = {
            "path": str(v),
            "prompt": prompt,
            "prompt_source": source,
            "scores": {},
            "errors": {},
            "windows": {},
        }
        try:
            if cfg.protocol == "vbench-long":
                _score_long_video(v, models, by_colour, cfg, prompt, rec)
            else:  # one decode per colour mode, scored and freed before the next (memory: one copy)
                for colour, dims_here in (by_colour or {"tagged": []}).items():
                    frames, fps = read_video(v, colour)
                    _set_video_info(rec, frames, fps)
                    for d in dims_here:
                        _score_video(d, frames, fps, models[d], cfg, prompt, rec)
                    del frames
        except (ValueError, OSError) as e:  # unreadable/truncated file: keep going, report it
            failed[v.name] = {"path": str(v), "reason": str(e)}
            say(f"{v.name}: NOT SCORED ({e})")
            continue
        per_video[v.name] = rec
        say(f"{v.name}: " + ", ".join(f"{k}={x:.4f}" for k, x in rec["scores"].items()))
    for d in models:
        vals = [r["scores"][d] for r in per_video.values() if d in r["scores"]]
        dim_info[d]["mean"] = float(np.mean(vals)) if vals else None
        dim_info[d]["num_videos"] = len(vals)
        dim_info[d]["window_mean"] = window_means(per_video, d)
    return {
        "kind": "titan-world-eval/vbench",
        "version": 1,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {
            **dataclasses.asdict(cfg),
            "dimensions": dims,
            "num_videos": len(videos),
            "decoding": {d: colour_for(d) for d in dims},
        },
        "dimensions": dim_info,
        "videos": per_video,
        "failed_videos": failed,
    }


def _set_video_info(rec: dict[str, Any], frames: np.ndarray, fps: float) -> None:
    rec.update(
        {
            "frames": int(len(frames)),
            "fps": fps,
            "duration_s": len(frames) / fps if fps else None,
            "height": int(frames.shape[1]),
            "width": int(frames.shape[2]),
        }
    )


def _score_long_video(
    path: Path,
    models: dict[str, Any],
    by_colour: dict[str, list[str]],
    cfg: EvalConfig,
    prompt: str | None,
    rec: dict[str, Any],
) -> None:
    """VBench-Long custom mode (long_video.py): the mean over re-encoded 2 s clips, each read and
    scored as VBench reads a video for that dimension. No windows (the clips are the windows)."""
    with tempfile.TemporaryDirectory(prefix="titan_vbench_long_") as tmp:
        clips, frames, fps = split_long_video(path, tmp, int(cfg.long_clip_seconds))
        _set_video_info(rec, frames, fps)
        del frames
        rec["clips"] = len(clips)
        values: dict[str, list[float]] = {d: [] for d in models}
        for clip in clips:
            for colour, dims_here in by_colour.items():
                clip_frames, clip_fps = read_video(clip, colour)
                for d in dims_here:
                    try:
                        values[d].append(score_frames(d, clip_frames, clip_fps, models[d], cfg, prompt))
                    except D.DimensionError as e:
                        rec["errors"][d] = f"clip {clip.name}: {e}"
    for d, vals in values.items():
        if vals:
            rec["scores"][d] = float(np.mean(vals))


def _score_video(
    d: str, frames: np.ndarray, fps: float, model: Any, cfg: EvalConfig, prompt: str | None, rec: dict[str, Any]
) -> None:
    """Score one dimension of one decoded video into `rec` (value, error, windows)."""
    try:
        rec["scores"][d] = score_frames(d, frames, fps, model, cfg, prompt)
    except D.DimensionError as e:
        rec["errors"][d] = str(e)
    starts, vals = _window_scores(d, frames, fps, model, cfg, prompt)
    if starts:
        rec["windows"][d] = {"start_s": starts, "values": vals}


def window_means(per_video: dict[str, Any], dim: str) -> dict[str, list] | None:
    """Mean over videos of window k (videos shorter than k windows do not count)."""
    series = [r["windows"][dim] for r in per_video.values() if dim in r.get("windows", {})]
    if not series:
        return None
    n = max(len(s["start_s"]) for s in series)
    starts, means, counts = [], [], []
    for k in range(n):
        vals = [s["values"][k] for s in series if k < len(s["values"]) and s["values"][k] is not None]
        start = next(s["start_s"][k] for s in series if k < len(s["start_s"]))
        starts.append(start)
        means.append(float(np.mean(vals)) if vals else None)
        counts.append(len(vals))
    return {"start_s": starts, "mean": means, "count": counts}


def summary(results: dict[str, Any]) -> dict[str, float | None]:
    """dimension -> mean (None if skipped)."""
    return {d: (i.get("mean") if i["status"] == "ok" else None) for d, i in results["dimensions"].items()}
