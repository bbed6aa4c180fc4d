"""`synthesize`: render synthetic episodes and write them as an encoded MDS dataset."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from titan_world.data.mds import encoder_meta, write_episodes
from titan_world.data.synth import Episode, make_episode
from titan_world.model.codec import build_codec
from titan_world.model.text_encoder import build_text_encoder


def build_encoders(cfg):
    """Storage encoders: the TinyCodec is stored exact (the loader compresses to data.codec.channels)."""
    codec = build_codec(cfg.data.codec.kind, cfg.data.codec.spatial_stride, cfg.data.codec.path)
    text = build_text_encoder(
        cfg.data.text_encoder.kind, cfg.model.text_dim, cfg.model.text_len, cfg.data.text_encoder.path
    )
    meta = encoder_meta(cfg.data.codec, cfg.data.text_encoder, cfg.model.text_dim, cfg.model.text_len)
    return codec, text, meta


def synthesize(
    cfg,
    out: str | os.PathLike,
    episodes: int,
    seconds: float,
    *,
    keep_raw: bool = False,
    seed: int = 0,
    progress: bool = True,
    indices: Sequence[int] | None = None,
) -> dict:
    """Write `episodes` episodes (seeds seed .. seed+episodes-1); returns counts and timings.

    `indices`: only these episodes of the `episodes` (a rank's share in a data-parallel write);
    episode i keeps seed + i, so the shares together are exactly the one-process dataset.
    """
    todo = list(range(episodes)) if indices is None else list(indices)
    codec, text, meta = build_encoders(cfg)
    h, w, fps = cfg.data.height, cfg.data.width, cfg.data.fps
    stats = {"episodes": 0, "frames": 0, "render_s": 0.0}

    def gen() -> Iterator[Episode]:
        for i in todo:
            t0 = time.perf_counter()
            ep = make_episode(seed + i, h, w, seconds, fps, level=cfg.data.synth_level)
            stats["render_s"] += time.perf_counter() - t0
            stats["frames"] += ep.num_frames
            yield ep

    bar = None
    if progress:
        bar = tqdm(total=len(todo), desc="synth", unit="ep")
    t0 = time.perf_counter()
    stats["episodes"] = write_episodes(
        gen(),
        out,
        codec,
        text,
        {**meta, "source": "synthetic"},
        keep_raw=keep_raw,
        on_written=(lambda ep: bar.update(1)) if bar else None,
    )
    stats["total_s"] = time.perf_counter() - t0
    if bar:
        bar.close()
    return stats
