"""VBench dimensions on decoded frames (uint8 [T, H, W, 3]); formulas follow VBench's code.

Each function takes frames already in memory (so windows of long videos reuse them) and the
metric model as a callable (see models.py for the interfaces). Every function returns a float.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from titan_world.eval.models import first_tensor
from titan_world.eval.preprocess import Padder, clip_transform, middle_indices, resize, to_float_tensor


class DimensionError(ValueError):
    """A video cannot be scored on a dimension (too few frames, bad model output)."""


def _need_frames(frames: np.ndarray, n: int, name: str) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise DimensionError(f"{name}: expected frames [T, H, W, 3], got {frames.shape}")
    if len(frames) < n:
        raise DimensionError(f"{name}: needs at least {n} frames, got {len(frames)}")


def temporal_flickering(frames: np.ndarray, chunk: int = 64) -> float:
    """(255 - mean |f_t - f_{t+1}|) / 255 over all adjacent pairs and all pixels/channels.

    VBench averages the per-pair MAE; pairs have equal size so this is the global mean.
    VBench applies it to videos that passed its RAFT static filter (standard prompt suite);
    in custom-input mode (what world-model papers report) every video is scored: so do we.
    """
    _need_frames(frames, 2, "temporal_flickering")
    total, pairs = 0, len(frames) - 1
    for s in range(0, pairs, chunk):  # chunked integer sums: exact, and memory stays flat
        a = frames[s : s + chunk + 1].astype(np.int16)
        total += int(np.abs(a[1:] - a[:-1]).sum(dtype=np.int64))
    return (255.0 - total / (pairs * frames[0].size)) / 255.0


def dynamic_degree_params(hw: tuple[int, int], num_sampled: int) -> tuple[float, int]:
    """VBench: threshold 6 * min(H, W) / 256 px; moving if >= round(4 * n / 16) pairs exceed it."""
    return 6.0 * (min(hw) / 256.0), round(4 * (num_sampled / 16.0))


def top5_flow_magnitude(flow: torch.Tensor) -> torch.Tensor:
    """Mean of the largest 5 % flow magnitudes per pair: flow [B, 2, H, W] -> [B]."""
    rad = torch.sqrt(flow[:, 0].float() ** 2 + flow[:, 1].float() ** 2).flatten(1)
    k = int(rad.shape[1] * 0.05)
    if k == 0:
        return torch.full((flow.shape[0],), float("nan"))
    return rad.topk(k, dim=1).values.mean(dim=1)


def dynamic_degree_magnitudes(
    frames: np.ndarray, fps: float, flow_model: Callable[..., Any], batch_size: int = 4, device: str = "cpu"
) -> list[float]:
    """Per sampled pair, the mean of the top-5 % RAFT flow magnitudes (VBench's `get_score`).

    Frames are subsampled to ~8 fps (every round(fps/8)-th frame); RAFT runs on consecutive
    samples as 0..255 float frames replicate-padded to a multiple of 8 (magnitudes over the
    padded frame, as VBench).
    """
    _need_frames(frames, 2, "dynamic_degree")
    interval = max(1, round(fps / 8)) if fps > 0 else 1
    sampled = frames[::interval]
    padder = Padder(frames.shape[1:3], 8)
    mags: list[float] = []
    with torch.no_grad():
        for s in range(0, len(sampled) - 1, batch_size):
            chunk = padder.pad(to_float_tensor(sampled[s : s + batch_size + 1])).to(device)
            flow = first_tensor(flow_model(chunk[:-1], chunk[1:]))
            if flow.ndim != 4 or flow.shape[1] != 2:
                raise DimensionError(f"dynamic_degree: flow model must return [B, 2, H, W], got {tuple(flow.shape)}")
            mags += top5_flow_magnitude(flow).cpu().tolist()
    return mags


def dynamic_degree(
    frames: np.ndarray, fps: float, flow_model: Callable[..., Any], batch_size: int = 4, device: str = "cpu"
) -> float:
    """1.0 if the video moves by VBench's rule, else 0.0 (the dataset mean is the score).

    Moving if at least round(4 n / 16) of the n sampled frames' pairs exceed 6 * min(H, W) / 256
    px (`dynamic_degree_magnitudes`). VBench quirk kept: with n <= 2 sampled frames the count
    needed is 0 and any video with one pair counts as moving.
    """
    mags = dynamic_degree_magnitudes(frames, fps, flow_model, batch_size, device)
    interval = max(1, round(fps / 8)) if fps > 0 else 1
    thres, count_num = dynamic_degree_params(frames.shape[1:3], len(frames[::interval]))
    count = 0
    for m in mags:  # VBench check_move: stops as soon as the count is reached
        count += m > thres
        if count >= count_num:
            return 1.0
    return 0.0


def motion_smoothness(
    frames: np.ndarray, interp_model: Callable[..., Any], batch_size: int = 4, device: str = "cpu"
) -> float:
    """(255 - mean |odd frame - interpolation of its even neighbours|) / 255.

    VBench: keep frames 0, 2, 4, ...; interpolate the midpoint (embt = 0.5) of each
    consecutive kept pair with AMT on 0..1 frames padded to a multiple of 16; convert back
    with (x * 255).clip(0, 255).astype(uint8) (truncation, as VBench) and compare with
    frames 1, 3, 5, ... (uint8 absdiff, mean over pixels, then over frames).
    """
    _need_frames(frames, 3, "motion_smoothness")
    evens, odds = frames[0::2], frames[1::2]
    padder = Padder(frames.shape[1:3], 16)
    errs: list[float] = []
    with torch.no_grad():
        for s in range(0, len(evens) - 1, batch_size):
            x = padder.pad(to_float_tensor(evens[s : s + batch_size + 1]) / 255.0).to(device)
            embt = torch.full((len(x) - 1, 1, 1, 1), 0.5, device=device)
            pred = padder.unpad(first_tensor(interp_model(x[:-1], x[1:], embt), "imgt_pred")).float()
            if pred.shape[0] != len(x) - 1 or tuple(pred.shape[1:]) != (3, *frames.shape[1:3]):
                raise DimensionError(
                    f"motion_smoothness: interpolation model returned {tuple(pred.shape)}, "
                    f"expected [{len(x) - 1}, 3, H+pad, W+pad]"
                )
            img = (pred * 255.0).permute(0, 2, 3, 1).cpu().numpy().clip(0, 255).astype(np.uint8)
            ref = odds[s : s + len(img)]
            errs += np.abs(img.astype(np.int16) - ref.astype(np.int16)).mean(axis=(1, 2, 3)).tolist()
    return (255.0 - float(np.mean(errs))) / 255.0


def imaging_quality(
    frames: np.ndarray, iqa_model: Callable[..., Any], batch_size: int = 1, device: str = "cpu", mode: str = "longer"
) -> float:
    """Mean MUSIQ score over all frames / 100 (VBench divides the 0..100 MUSIQ score by 100).

    VBench's default 'longer' preprocessing: if the longer side exceeds 512, resize (bilinear,
    no antialias) so it is 512 (sizes truncated with int()); then /255 -> model input 0..1.
    """
    _need_frames(frames, 1, "imaging_quality")
    h, w = frames.shape[1:3]
    size = (h, w)
    side = max(h, w) if mode == "longer" else min(h, w)
    if mode not in ("longer", "shorter", "none"):
        raise DimensionError(f"imaging_quality mode {mode!r}: expected longer|shorter|none")
    if mode != "none" and side > 512:
        scale = 512.0 / side
        size = (int(scale * h), int(scale * w))
    scores: list[float] = []
    with torch.no_grad():
        for s in range(0, len(frames), batch_size):
            x = resize(to_float_tensor(frames[s : s + batch_size]), size) / 255.0
            out = first_tensor(iqa_model(x.to(device))).float().reshape(-1)
            if out.numel() != len(x):
                raise DimensionError(f"imaging_quality: IQA model returned {out.numel()} scores for {len(x)} frames")
            scores += out.cpu().tolist()
    return float(np.mean(scores)) / 100.0


def aesthetic_quality(
    frames: np.ndarray,
    aesthetic_model: Callable[[torch.Tensor], torch.Tensor],
    image_size: int = 224,
    batch_size: int = 32,
) -> float:
    """Mean LAION aesthetic score / 10 over all frames (VBench), CLIP preprocessing per frame."""
    _need_frames(frames, 1, "aesthetic_quality")
    scores: list[float] = []
    for s in range(0, len(frames), batch_size):
        x = clip_transform(to_float_tensor(frames[s : s + batch_size]), image_size)
        scores += (aesthetic_model(x).float().reshape(-1) / 10.0).cpu().tolist()
    return float(np.mean(scores))


def overall_consistency(
    frames: np.ndarray, prompt: str, viclip: Any, device: str = "cpu", num_frames: int = 8, image_size: int = 224
) -> float:
    """ViCLIP cosine similarity between the video (8 frames, 'middle' sampling) and its prompt.

    As VBench: the CLIP transform on uint8 frames (resize rounded to integers) and
    `encode_vision(x, test=True)` — without `test=True` ViCLIP drops 90 % of the patch tokens at
    random on every call.
    """
    _need_frames(frames, 1, "overall_consistency")
    idx = middle_indices(num_frames, len(frames))
    x = clip_transform(to_float_tensor(frames[idx]), image_size, uint8=True).unsqueeze(0).to(device)
    with torch.no_grad():
        try:
            v = first_tensor(viclip.encode_vision(x, test=True)).float().reshape(1, -1)
        except TypeError as e:  # a model without the keyword would be scored with random token dropping
            raise DimensionError(
                f"overall_consistency: the model's encode_vision(x, test=True) failed ({e}); "
                "it must take test=True (ViCLIP's deterministic path)"
            ) from e
        t = first_tensor(viclip.encode_text(prompt)).float().reshape(1, -1)
    v = v / v.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    return float((v @ t.T)[0, 0])
