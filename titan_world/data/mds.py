"""MDS shards: one sample per episode, columns named so a reader can tell everything apart.

Columns (all per episode; T video frames, F = 1 + (T - 1) / 4 latent frames):

| column       | type             | content                                                        |
|--------------|------------------|----------------------------------------------------------------|
| episode_id   | str              | unique id, e.g. synth-00000003 or ingest-<file stem>           |
| source       | str              | "synthetic" or "ingest:<file name>"                            |
| fps          | int              | frames per second of every per-frame column                    |
| num_frames   | int              | T (always 1 + 4k)                                              |
| latents      | ndarray float16  | [C, F, h, w] codec latents of the whole episode                |
| text_emb     | ndarray float16  | [text_len, text_dim] embedding of the narrative caption        |
| actions      | ndarray float32  | [T, 8] (titan_world.data.actions.ACTION_NAMES)                 |
| c2w          | ndarray float32  | [T, 4, 4] camera-to-world, OpenCV axes                         |
| intrinsics   | ndarray float32  | [T, 4] fx, fy, cx, cy in pixels of the stored resolution       |
| captions     | json             | {"narrative", "scene", "events": [{start_s, end_s, ..., text}]}|
| meta         | json             | codec, text encoder, resolution, fps, seed, world description  |
| frames       | ndarray uint8    | [T, H, W, 3] raw frames (only with --keep-raw)                 |
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from titan_world.data._streaming import MDSWriter
from titan_world.data.synth import Episode
from titan_world.model.codec import frames_to_video

COLUMNS: dict[str, str] = {
    "episode_id": "str",
    "source": "str",
    "fps": "int",
    "num_frames": "int",
    "latents": "ndarray",
    "text_emb": "ndarray",
    "actions": "ndarray",
    "c2w": "ndarray",
    "intrinsics": "ndarray",
    "captions": "json",
    "meta": "json",
}
RAW_COLUMN = "frames"
LATENT_DTYPE = np.float16
FORMAT_VERSION = 1


def encoder_meta(codec_cfg, text_cfg, text_dim: int, text_len: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "codec": {"kind": codec_cfg.kind, "spatial_stride": codec_cfg.spatial_stride},
        "text_encoder": {"kind": text_cfg.kind, "text_dim": text_dim, "text_len": text_len},
        "latent_dtype": "float16",
        "text_caption": "narrative",
    }


def _batches(episodes: Iterable[Episode], size: int) -> Iterator[list[Episode]]:
    """Consecutive episodes of equal shape, at most `size` at a time (so encoding is batched)."""
    batch: list[Episode] = []
    for ep in episodes:
        if batch and (len(batch) == size or batch[0].frames.shape != ep.frames.shape):
            yield batch
            batch = []
        batch.append(ep)
    if batch:
        yield batch


def write_episodes(
    episodes: Iterable[Episode],
    out: str | os.PathLike,
    codec,
    text_encoder,
    meta: dict,
    *,
    keep_raw: bool = False,
    batch_size: int = 8,
    compression: str | None = "zstd",
    size_limit: str = "64mb",
    on_written=None,
) -> int:
    """Encode (batched) and write episodes as MDS shards into `out`; returns how many were written."""
    columns = dict(COLUMNS)
    if keep_raw:
        columns[RAW_COLUMN] = "ndarray"
    Path(out).mkdir(parents=True, exist_ok=True)
    n = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # encoding is copy-bound; extra threads only contend on busy machines
    try:
        n = _write(
            episodes, out, codec, text_encoder, meta, columns, keep_raw, batch_size, compression, size_limit, on_written
        )
    finally:
        torch.set_num_threads(threads)
    (Path(out) / "titan_dataset.json").write_text(json.dumps({**meta, "episodes": n, "keep_raw": keep_raw}, indent=1))
    return n


def _write(
    episodes, out, codec, text_encoder, meta, columns, keep_raw, batch_size, compression, size_limit, on_written
) -> int:
    n = 0
    with MDSWriter(out=str(out), columns=columns, compression=compression, size_limit=size_limit) as writer:
        for batch in _batches(episodes, batch_size):
            with torch.no_grad():
                lat = codec.encode(frames_to_video(np.stack([e.frames for e in batch])))
                txt = text_encoder.encode([e.captions["narrative"] for e in batch])
            lat = lat.float().cpu().numpy().astype(LATENT_DTYPE)
            txt = txt.float().cpu().numpy().astype(np.float16)
            for i, ep in enumerate(batch):
                h, w = ep.frames.shape[1:3]
                sample = {
                    "episode_id": ep.episode_id,
                    "source": ep.source,
                    "fps": int(ep.fps),
                    "num_frames": int(ep.num_frames),
                    "latents": lat[i],
                    "text_emb": txt[i],
                    "actions": ep.actions.astype(np.float32),
                    "c2w": ep.c2w.astype(np.float32),
                    "intrinsics": ep.intrinsics.astype(np.float32),
                    "captions": ep.captions,
                    "meta": {
                        **meta,
                        **ep.meta,
                        "height": int(h),
                        "width": int(w),
                        "fps": int(ep.fps),
                        "num_frames": int(ep.num_frames),
                        "source": ep.source,
                        "episode_id": ep.episode_id,
                    },
                }
                if keep_raw:
                    sample[RAW_COLUMN] = np.ascontiguousarray(ep.frames, dtype=np.uint8)
                writer.write(sample)
                n += 1
                if on_written:
                    on_written(ep)
    return n
