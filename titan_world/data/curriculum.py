"""Curriculum windows: one episode-level dataset serves every clip length.

Rule (docs/data.md): a stage of `clip_frames = 1 + 4k` video frames takes 1 + k latent frames.
A window starts on a latent boundary j (video frame 4j) and covers video frames 4j .. 4j + 4k.
Its first latent frame must encode that single frame; with the TinyCodec (an exact permutation)
the window's latents are re-derived from the stored episode latents by decode -> slice ->
encode, which is exact and costs microseconds. With other codecs the loader encodes the window
from the raw `frames` column when the dataset has it (`--keep-raw`), otherwise windows start at
the episode's first frame (j = 0). Episodes shorter than the clip are dropped (see loader.py).
The window start, the task (I2V / V2V) and the number of V2V conditioning frames are drawn from
a generator seeded by (seed, epoch, sample id), so resumed runs see identical samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from titan_world.model.action import keys_per_latent_frame
from titan_world.model.codec import TEMPORAL_STRIDE, TinyCodec, check_frame_count, frames_to_video, latent_frames


@dataclass(frozen=True)
class Curriculum:
    clip_frames: int
    i2v_ratio: float = 0.5
    v2v_max_cond_frames: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_frame_count(self.clip_frames, f"curriculum clip_frames={self.clip_frames}:")

    @property
    def latent_len(self) -> int:
        return latent_frames(self.clip_frames)

    def fits(self, num_frames: int) -> bool:
        return num_frames >= self.clip_frames

    def rng(self, epoch: int, sample_id: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, sample_id, 0xC0])

    def choose(self, rng: np.random.Generator, num_frames: int, any_start: bool) -> tuple[int, str, int]:
        """(start latent index j, task, conditioning latent frames)."""
        episode_steps = latent_frames(num_frames, "episode") - 1
        clip_steps = self.latent_len - 1
        j = int(rng.integers(0, episode_steps - clip_steps + 1)) if any_start else 0
        if rng.random() < self.i2v_ratio or self.latent_len == 1:
            return j, "i2v", 1
        hi = max(1, min(self.v2v_max_cond_frames, self.latent_len - 1))
        return j, "v2v", int(rng.integers(1, hi + 1))


def window_latents(latents: np.ndarray, start: int, length: int, codec) -> np.ndarray:
    """Latents [C, F, h, w] of a window of `length` latent frames starting at latent `start`.

    Exact for the TinyCodec, whose latent j > 0 holds frames 4j-3 .. 4j as separate channel
    blocks: the window's first latent (frame 4j alone, repeated 4x as the codec's first group is)
    is that latent's last frame block copied into all four. Same as decode -> slice -> encode,
    without the copies.
    """
    window = np.array(latents[:, start : start + length])  # a writable copy
    if start == 0:
        return window
    if not isinstance(codec, TinyCodec):
        raise ValueError("mid-episode windows need the TinyCodec or raw frames (write the dataset with --keep-raw)")
    c, f, h, w = window.shape
    blocks = window.reshape(3, TEMPORAL_STRIDE, c // (3 * TEMPORAL_STRIDE), f, h, w)
    blocks[:, :, :, 0] = blocks[:, TEMPORAL_STRIDE - 1 : TEMPORAL_STRIDE, :, 0]
    return window


def latent_actions(actions: torch.Tensor) -> torch.Tensor:
    """Per-latent-frame actions [..., F, 8] from per-video-frame [..., 1 + 4k, 8] (the model's rule)."""
    return keys_per_latent_frame(actions)


def cut_sample(episode: dict, cur: Curriculum, rng: np.random.Generator, codec) -> dict:
    """One training sample (tensors) from one decoded MDS episode row."""
    t = int(episode["num_frames"])
    has_raw = "frames" in episode and episode["frames"] is not None
    any_start = isinstance(codec, TinyCodec) or has_raw
    j, task, n_cond = cur.choose(rng, t, any_start)
    f0, f1 = TEMPORAL_STRIDE * j, TEMPORAL_STRIDE * j + cur.clip_frames
    if j > 0 and not isinstance(codec, TinyCodec):
        lat = codec.encode(frames_to_video(episode["frames"][None, f0:f1]))[0].to(torch.float16)
    else:
        lat = torch.from_numpy(window_latents(episode["latents"], j, cur.latent_len, codec))
        if isinstance(codec, TinyCodec):  # stored exact; the model sees `data.codec.channels`
            lat = codec.compress(lat[None].float())[0].to(torch.float16)
    cond = torch.zeros(cur.latent_len, dtype=torch.bool)
    cond[:n_cond] = True
    sample = {
        "latents": lat,
        "cond_mask": cond,
        "text": torch.from_numpy(np.array(episode["text_emb"], np.float32)),
        "actions": torch.from_numpy(np.array(episode["actions"][f0:f1], np.float32)),
        "c2w": torch.from_numpy(np.array(episode["c2w"][f0:f1], np.float32)),
        "intrinsics": torch.from_numpy(np.array(episode["intrinsics"][f0:f1], np.float32)),
        "caption": episode["captions"]["narrative"],
        "episode_id": episode["episode_id"],
        "start_frame": f0,
        "task": task,
    }
    if has_raw:
        sample["frames"] = torch.from_numpy(np.array(episode["frames"][f0:f1]))
    return sample


def collate(samples: list[dict]) -> dict:
    """Batch dict: latents [B,C,F,h,w], cond_mask [B,F] bool, text [B,Lt,Dt], actions [B,T,8],
    latent_actions [B,F,8], c2w [B,T,4,4], intrinsics [B,T,4], captions / episode_ids / tasks
    (lists), start_frames [B] long, and frames [B,T,H,W,3] uint8 when the dataset has raw frames."""
    out = {
        k: torch.stack([s[k] for s in samples])
        for k in ("latents", "cond_mask", "text", "actions", "c2w", "intrinsics")
    }
    out["latents"] = out["latents"].float()
    out["latent_actions"] = latent_actions(out["actions"])
    out["captions"] = [s["caption"] for s in samples]
    out["episode_ids"] = [s["episode_id"] for s in samples]
    out["tasks"] = [s["task"] for s in samples]
    out["start_frames"] = torch.tensor([s["start_frame"] for s in samples], dtype=torch.long)
    if all("frames" in s for s in samples):
        out["frames"] = torch.stack([s["frames"] for s in samples])
    return out
