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
import json
import os
import random
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from titan_world.config import ConfigError
from titan_world.data._streaming import (
    StreamingDataLoader,
    StreamingDataset,
    clean_stale_shared_memory,
    prefix_lock,
    release_prefix,
)
from titan_world.data.curriculum import Curriculum, collate, cut_sample
from titan_world.data.writer import synthesize
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
        self.dl = StreamingDataLoader(
            dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, drop_last=True
        )
        self._finalizer = weakref.finalize(self, release_prefix, dataset._shm_prefix_int)

    def __iter__(self):
        return iter(self.dl)

    def __len__(self) -> int:
        return len(self.dl)

    def batches(self):
        """Endless batches, epoch after epoch (what a step-counted trainer wants)."""
        empty = 0  # epochs in a row without a batch: one is normal (resumed at an epoch's end), two would spin forever
        while empty < 2:
            empty += 1
            for batch in self.dl:
                empty = 0
                yield batch
        raise RuntimeError(
            f"an epoch of this rank's {len(self.dataset)} samples holds no batch of {self.batch_size} "
            "(build_train_loader refuses such datasets up front)"
        )

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
            raise ValueError(
                f"loader state is for clips of {clip} frames; this loader cuts {cur.clip_frames} (wrong stage?)"
            )
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
        raise ValueError(
            f"data world_size={world_size} must divide WORLD_SIZE={env_world} (ranks of one CP group share samples)"
        )
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
        raise ConfigError(
            f"{path}: meta.codec={c} but data.codec is kind={cfg.data.codec.kind} "
            f"spatial_stride={cfg.data.codec.spatial_stride}; re-encode the dataset"
        )
    t = meta.get("text_encoder", {})
    if t.get("text_dim") != cfg.model.text_dim or t.get("text_len") != cfg.model.text_len:
        raise ConfigError(
            f"{path}: meta.text_encoder={t} but model.text_dim={cfg.model.text_dim} text_len={cfg.model.text_len}; "
            "re-encode the dataset"
        )
    size = (meta.get("height"), meta.get("width"))
    if None not in size and size != (cfg.data.height, cfg.data.width):
        raise ConfigError(
            f"data.height/width={cfg.data.height}x{cfg.data.width}: the dataset at {path} holds {size[0]}x{size[1]} "
            f"video; set data.height={size[0]} data.width={size[1]} (or re-encode the dataset at that size)"
        )


def _open_with_retry(open_dataset, attempts: int = 8):
    """streaming picks a free shared-memory prefix by looking, then creating: two processes that
    open datasets at the same instant can pick the same one (FileExistsError). titan-world jobs
    no longer race each other (`prefix_lock`); other streaming users on the node still can.
    Retry after a short random pause instead of failing the job. Only a single process retries:
    in a group only the node's leader creates, and a retry on one rank would call the prefix's
    collectives out of step with the others (a hang); the job fails with the error instead, and
    torchrun's restart (or a requeue) opens it again."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        attempts = 1
    for attempt in range(attempts):
        try:
            return open_dataset()
        except FileExistsError:
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.5))


def build_dataset(
    cfg, clip_frames: int, seed: int, batch_size: int, replication: int | None = None, path: str | None = None
) -> EpisodeDataset:
    path = str(path or dataset_path(cfg))
    kwargs: dict[str, Any] = dict(shuffle=True, shuffle_seed=seed, batch_size=batch_size, replication=replication)
    if is_remote(path):
        kwargs.update(remote=path, local=_cache_dir(cfg.data, path))
    else:
        if not (Path(path) / "index.json").is_file():
            raise ConfigError(
                f"data.path={cfg.data.path}: no MDS dataset at {path} (index.json missing); {_ASK_FOR_SYNTHETIC}"
            )
        kwargs.update(local=path)
    cur = Curriculum(clip_frames, cfg.data.i2v_ratio, cfg.data.v2v_max_cond_frames, seed)
    codec = codec_from_config(cfg.data.codec)
    with prefix_lock(leader=int(os.environ.get("LOCAL_RANK", "0")) == 0):
        ds = _open_with_retry(lambda: EpisodeDataset(curriculum=cur, codec=codec, **kwargs))
    try:
        check_dataset_meta(StreamingDataset.get_item(ds, 0)["meta"], cfg, path)
    except Exception:
        release_prefix(ds._shm_prefix_int)
        raise
    return ds


def build_train_loader(
    cfg,
    stage,
    rank: int = 0,
    world_size: int = 1,
    seed: int | None = None,
    batch_size: int | None = None,
    global_batch: tuple[str, int] | None = None,
) -> TrainLoader:
    """The loader a trainer calls per curriculum stage.

    `stage`: a `StageConfig` (its `frames`) or an int clip length in video frames (1 + 4k).
    `rank`/`world_size`: the data-parallel rank and size (ranks of one CP group share samples;
    streaming reads the global world from RANK/WORLD_SIZE/LOCAL_WORLD_SIZE, set by torchrun).
    `batch_size`: per-rank batch (default: train.micro_batch, else global batch / world_size).
    `global_batch`: (config key, samples one step takes); default the global batch of this stage.
    A dataset with fewer samples than that is a `ConfigError` (it would repeat samples within a
    step, or with no batch per epoch spin forever)."""
    frames = int(stage if isinstance(stage, int) else stage.frames)
    if batch_size is None:
        gb = getattr(stage, "global_batch", None) or cfg.train.global_batch
        batch_size = cfg.train.micro_batch or max(1, gb // world_size)
        global_batch = global_batch or ("train.global_batch", gb)
    key, needed = global_batch or (f"batch {batch_size} x {world_size} data-parallel ranks", batch_size * world_size)
    seed = cfg.train.seed if seed is None else seed
    with _streaming_world(rank, world_size) as env_world:
        ds = build_dataset(
            cfg, frames, seed, batch_size, replication=env_world // world_size if env_world > world_size else None
        )
    if ds.num_samples < needed:
        release_prefix(ds._shm_prefix_int)
        raise ConfigError(
            f"data.path={cfg.data.path}: the dataset has {ds.num_samples} samples, fewer than one step takes "
            f"({key}: {needed}); add episodes (data.synth_episodes for synthetic data) or lower the batch"
        )
    return TrainLoader(ds, batch_size, cfg.data.num_workers)


def dataset_exists(path: str) -> bool:
    return is_remote(path) or (Path(path) / "index.json").is_file()


# -- where the data comes from (data.path) ----------------------------------------------------------------
SYNTHETIC = "synthetic"  # data.path: the embedded synthetic world, cached under SYNTHETIC_CACHE
SYNTHETIC_CACHE = Path("data_cache")
SYNTHETIC_MARKER = "titan_synthetic.json"  # written into every folder the platform generated
SYNTH_FORMAT = 2  # part of the cache key: bump when the generator's output for the same parameters changes
_ASK_FOR_SYNTHETIC = (
    "for the embedded synthetic world set data.path=synthetic (cached under data_cache/) "
    "or data.path=synthetic:DIR (generated into DIR, a new or empty folder)"
)


@dataclass(frozen=True)
class DataSource:
    """What `data.path` asks for: `path` is the dataset folder (or URL); `synthetic` means the
    platform generates it there when it is missing (a new or empty folder only)."""

    path: str
    synthetic: bool


def synth_params(cfg) -> dict:
    """Everything that determines the synthetic dataset's bytes (the cache key of data.path=synthetic)."""
    d, m = cfg.data, cfg.model
    return {
        "format": SYNTH_FORMAT,
        "episodes": d.synth_episodes,
        "seconds": float(d.synth_seconds),
        "seed": d.synth_seed,
        "level": d.synth_level,
        "height": d.height,
        "width": d.width,
        "fps": d.fps,
        "codec": {"kind": d.codec.kind, "spatial_stride": d.codec.spatial_stride, "path": d.codec.path},
        "text_encoder": {
            "kind": d.text_encoder.kind,
            "path": d.text_encoder.path,
            "text_dim": m.text_dim,
            "text_len": m.text_len,
        },
    }


def data_source(cfg) -> DataSource:
    """Parse `data.path` (no file system access): `synthetic`, `synthetic:DIR`, a folder or a URL."""
    path = str(cfg.data.path or "").strip()
    if path == SYNTHETIC:
        key = hashlib.sha1(json.dumps(synth_params(cfg), sort_keys=True).encode()).hexdigest()[:12]
        return DataSource(str(SYNTHETIC_CACHE / f"synthetic-{key}"), synthetic=True)
    if path.startswith(SYNTHETIC + ":"):
        target = path[len(SYNTHETIC) + 1 :]
        if not target:
            raise ConfigError(f"data.path={path!r}: expected synthetic:DIR with a folder after the colon")
        return DataSource(target, synthetic=True)
    if not path:
        raise ConfigError(
            f"data.path is empty: expected a dataset folder (with index.json) or URL; {_ASK_FOR_SYNTHETIC}"
        )
    return DataSource(path, synthetic=False)


def dataset_path(cfg) -> str:
    """The dataset folder (or URL) `data.path` resolves to."""
    return data_source(cfg).path


def check_data_path(cfg) -> DataSource:
    """Refuse, before any work, a `data.path` that is neither a dataset nor synthetic data we may
    generate: the error names the key, the path and how to ask for synthetic data."""
    src = data_source(cfg)
    shown = f"data.path={cfg.data.path}"
    if dataset_exists(src.path):
        return src
    p = Path(src.path)
    if not src.synthetic:
        what = "no such folder" if not p.exists() else "no dataset there (index.json missing)"
        raise ConfigError(
            f"{shown}: {what}; expected an MDS dataset folder (titan-world data synth|ingest --out DIR) "
            f"or a remote URL; {_ASK_FOR_SYNTHETIC}"
        )
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{shown}: {p} is a file; synthetic data is generated only into a new or empty folder")
    if p.is_dir() and any(p.iterdir()):
        raise ConfigError(
            f"{shown}: {p} is a non-empty folder that is not a dataset (no index.json); "
            "titan-world generates synthetic data only into a new or empty folder and never touches "
            "other files: pick another folder, or remove its contents yourself"
        )
    return src


def prepare_dataset(cfg, progress: bool = True) -> str:
    """The dataset `data.path` names, generated first when it asks for synthetic data that is not there yet.

    Never deletes or overwrites anything: the episodes are written into a fresh temporary folder
    beside the target and renamed into place only onto a missing or empty folder. Safe to call
    from several processes of one node at once (a file lock; the others wait, then find it).
    Returns the dataset's folder (or URL).
    """
    src = check_data_path(cfg)
    if dataset_exists(src.path):
        return src.path
    dest = Path(src.path)
    lock_name = "titan-world-synth-" + hashlib.sha1(str(dest.resolve()).encode()).hexdigest()[:16] + ".lock"
    with open(os.path.join(tempfile.gettempdir(), lock_name), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        src = check_data_path(cfg)  # another process may have generated it (or filled the folder) meanwhile
        if dataset_exists(src.path):
            return src.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
        try:
            synthesize(
                cfg, tmp, cfg.data.synth_episodes, cfg.data.synth_seconds, seed=cfg.data.synth_seed, progress=progress
            )
            (tmp / SYNTHETIC_MARKER).write_text(
                json.dumps({"created_by": "titan-world", **synth_params(cfg)}, indent=1)
            )
            try:
                os.rename(tmp, dest)  # onto a missing or empty folder only; a non-empty one fails, untouched
            except OSError as e:
                raise ConfigError(
                    f"data.path={cfg.data.path}: {dest} changed while the synthetic data was generated "
                    f"({e.strerror}); nothing was written there"
                ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # ours: made by mkdtemp above
    return src.path


atexit.register(lambda: clean_stale_shared_memory() if "streaming" in sys.modules else None)
