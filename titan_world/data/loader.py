"""Training loader: StreamingDataset over episodes -> curriculum windows -> collated batches.

* Each rank sees disjoint samples (streaming partitions the epoch over ranks; ranks of one
  context-parallel group get the same samples through `replication`).
* Shuffling is deterministic in (seed, epoch); windows and tasks in (seed, epoch, sample id).
* `TrainLoader.state_dict()` / `load_state_dict()` resume mid-epoch exactly (streaming's
  sample-count state plus our seed/clip checks).
* Episodes shorter than the stage's clip are dropped: the slot is filled by the next episode
  (in sample-id order) that is long enough, so every rank still yields the same number of
  batches (FSDP ranks never wait on each other) and resume stays exact; `loader.dropped`
  counts the drops of this process.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator

from titan_world.data._streaming import StreamingDataLoader, StreamingDataset, clean_stale_shared_memory, prefix_lock, release_prefix
from titan_world.data.curriculum import Curriculum, collate, cut_sample
from titan_world.model.codec import codec_from_config


def is_remote(path: str) -> bool:
    return "://" in str(path)


class EpisodeDataset(StreamingDataset):
    """Streaming episodes turned into curriculum samples (one window per episode per epoch)."""

    def __init__(self, *, curriculum: Curriculum, codec, **kwargs: Any):
        super().__init__(**kwargs)
        self.curriculum, self.codec = curriculum, codec
        self._epoch = 0
        self.dropped = 0

    def _resume_incr_epoch(self) -> tuple[int, int]:  # record the epoch this iteration runs
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch = epoch
        return epoch, sample_in_epoch

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        cur = self.curriculum
        episode, used = None, sample_id
        for k in range(self.num_samples):
            used = (sample_id + k) % self.num_samples
            episode = super().get_item(used, retry)
            if cur.fits(int(episode["num_frames"])):
                break
            self.dropped += 1
        else:
            raise ValueError(f"no episode in the dataset has >= {cur.clip_frames} frames (the stage's clip length)")
        return cut_sample(episode, cur, cur.rng(self._epoch, sample_id), self.codec)


class TrainLoader:
    """Iterate for one epoch of batches (`for batch in loader`), or forever with `batches()`."""

    def __init__(self, dataset: EpisodeDataset, batch_size: int, num_workers: int = 0):
        self.dataset, self.batch_size = dataset, batch_size
        self.dl = StreamingDataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, drop_last=True)
        self._finalizer = weakref.finalize(self, release_prefix, dataset._shm_prefix_int)

    def __iter__(self):
        return iter(self.dl)

    def __len__(self) -> int:
        return len(self.dl)

    def batches(self):
        """Endless batches, epoch after epoch (what a step-counted trainer wants)."""
        while True:
            yield from self.dl

    @property
    def dropped(self) -> int:
        return self.dataset.dropped

    def state_dict(self) -> dict:
        state = dict(self.dl.state_dict() or {})
        state["clip_frames"] = self.dataset.curriculum.clip_frames
        state["seed"] = self.dataset.curriculum.seed
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        clip, seed = state.pop("clip_frames", None), state.pop("seed", None)
        cur = self.dataset.curriculum
        if clip is not None and clip != cur.clip_frames:
            raise ValueError(f"loader state is for clips of {clip} frames; this loader cuts {cur.clip_frames} (wrong stage?)")
        if seed is not None and seed != cur.seed:
            raise ValueError(f"loader state was saved with seed {seed}; this loader uses seed {cur.seed}")
        self.dl.load_state_dict(state)

    def close(self) -> None:
        """Release streaming's shared memory for this dataset (also done at exit / garbage collection)."""
        self._finalizer()


@contextlib.contextmanager
def _streaming_world(rank: int, world_size: int) -> Iterator[int]:
    """streaming reads the world from RANK/WORLD_SIZE/LOCAL_* when a dataset is built (torchrun
    sets them). In a plain process they are set for the construction only, so the caller's
    environment is left as it was (a later launch must not think it runs inside torchrun).
    Yields the global world size."""
    env_world = int(os.environ.get("WORLD_SIZE", world_size))
    if env_world % world_size:
        raise ValueError(f"data world_size={world_size} must divide WORLD_SIZE={env_world} (ranks of one CP group share samples)")
    keys = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world_size}
    added = [] if "WORLD_SIZE" in os.environ else [k for k in keys if k not in os.environ]
    os.environ.update({k: str(keys[k]) for k in added})
    try:
        yield env_world
    finally:
        for k in added:
            os.environ.pop(k, None)


def _cache_dir(cfg_data, path: str) -> str:
    root = cfg_data.cache_dir or os.path.join(tempfile.gettempdir(), "titan_world_cache")
    return os.path.join(root, hashlib.sha1(path.encode()).hexdigest()[:16])


def check_dataset_meta(meta: dict, cfg, path: str) -> None:
    """Fail early, naming the key, when the dataset was encoded differently from the config."""
    c = meta.get("codec", {})
    if c.get("kind") != cfg.data.codec.kind or c.get("spatial_stride") != cfg.data.codec.spatial_stride:
        raise ValueError(f"{path}: meta.codec={c} but data.codec is kind={cfg.data.codec.kind} spatial_stride={cfg.data.codec.spatial_stride}; re-encode the dataset")
    t = meta.get("text_encoder", {})
    if t.get("text_dim") != cfg.model.text_dim or t.get("text_len") != cfg.model.text_len:
        raise ValueError(f"{path}: meta.text_encoder={t} but model.text_dim={cfg.model.text_dim} text_len={cfg.model.text_len}; re-encode the dataset")


def _open_with_retry(open_dataset, attempts: int = 8):
    """streaming picks a free shared-memory prefix by looking, then creating: two processes that
    open datasets at the same instant can pick the same one (FileExistsError). titan-world jobs
    no longer race each other (`prefix_lock`); other streaming users on the node still can.
    Retry after a short random pause instead of failing the job. Only a single process retries:
    in a group only the node's leader creates, and a retry on one rank would call the prefix's
    collectives out of step with the others (a hang); the job fails with the error instead, and
    torchrun's restart (or a requeue) opens it again."""
    import random
    import time

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        attempts = 1
    for attempt in range(attempts):
        try:
            return open_dataset()
        except FileExistsError:
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.5))


def build_dataset(cfg, clip_frames: int, seed: int, batch_size: int, replication: int | None = None, path: str | None = None) -> EpisodeDataset:
    path = str(path or cfg.data.path)
    kwargs: dict[str, Any] = dict(shuffle=True, shuffle_seed=seed, batch_size=batch_size, replication=replication)
    if is_remote(path):
        kwargs.update(remote=path, local=_cache_dir(cfg.data, path))
    else:
        if not (Path(path) / "index.json").is_file():
            raise FileNotFoundError(f"{path}: no MDS dataset here (index.json missing); run `titan-world data synth --out {path}`")
        kwargs.update(local=path)
    cur = Curriculum(clip_frames, cfg.data.i2v_ratio, cfg.data.v2v_max_cond_frames, seed)
    codec = codec_from_config(cfg.data.codec)
    with prefix_lock(leader=int(os.environ.get("LOCAL_RANK", "0")) == 0):
        ds = _open_with_retry(lambda: EpisodeDataset(curriculum=cur, codec=codec, **kwargs))
    first = StreamingDataset.get_item(ds, 0)
    check_dataset_meta(first["meta"], cfg, path)
    return ds


def build_train_loader(cfg, stage, rank: int = 0, world_size: int = 1, seed: int | None = None, batch_size: int | None = None) -> TrainLoader:
    """The loader a trainer calls per curriculum stage.

    `stage`: a `StageConfig` (its `frames`) or an int clip length in video frames (1 + 4k).
    `rank`/`world_size`: the data-parallel rank and size (ranks of one CP group share samples;
    streaming reads the global world from RANK/WORLD_SIZE/LOCAL_WORLD_SIZE, set by torchrun).
    `batch_size`: per-rank batch (default: train.micro_batch, else global batch / world_size).
    """
    frames = int(stage if isinstance(stage, int) else stage.frames)
    if batch_size is None:
        gb = getattr(stage, "global_batch", None) or cfg.train.global_batch
        batch_size = cfg.train.micro_batch or max(1, gb // world_size)
    seed = cfg.train.seed if seed is None else seed
    with _streaming_world(rank, world_size) as env_world:
        ds = build_dataset(cfg, frames, seed, batch_size, replication=env_world // world_size if env_world > world_size else None)
    return TrainLoader(ds, batch_size, cfg.data.num_workers)


def dataset_exists(path: str) -> bool:
    return is_remote(path) or (Path(path) / "index.json").is_file()


def ensure_synthetic_dataset(cfg, progress: bool = True) -> str:
    """Generate the default synthetic dataset at `cfg.data.path` unless it is there already.

    Safe to call from every rank at once: one process generates (under a file lock, into a
    temporary folder renamed into place), the others wait and then find it.
    """
    path = str(cfg.data.path)
    if dataset_exists(path):
        return path
    from titan_world.data.writer import synthesize

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(str(dest) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dataset_exists(path):
            tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
            try:
                synthesize(cfg, tmp, cfg.data.synth_episodes, cfg.data.synth_seconds, progress=progress)
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return path


atexit.register(lambda: clean_stale_shared_memory() if "streaming" in sys.modules else None)
