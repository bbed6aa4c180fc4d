"""Data section of the config: where the dataset lives and how clips are cut and encoded."""

from __future__ import annotations

from dataclasses import dataclass, field

SYNTH_LEVELS = ("demo", "random")  # data.synth_level (titan_world/data/synth.py)


@dataclass
class CodecConfig:
    kind: str = "tiny"  # tiny (exact, weight-free) | wan_vae (diffusers AutoencoderKLWan from `path`)
    spatial_stride: int = 4
    channels: int = 0  # tiny only: 0 = exact (3*4*s*s channels); K = K low-frequency channels (lossy)
    path: str | None = None


@dataclass
class TextEncoderConfig:
    # auto: umt5 for a model reading umT5-XXL embeddings (text_dim 4096), else tiny | tiny (hash
    # embeddings; for a real model only when asked by name) | umt5 (from `path`: an official .pth or a HF folder)
    kind: str = "auto"
    path: str | None = None


@dataclass
class DataConfig:
    # An MDS dataset (local folder with index.json, or a remote URL streaming supports), or synthetic
    # data on request: `synthetic` = the embedded world, generated once into data_cache/synthetic-<hash
    # of the synth_* parameters, size, codec, text encoder>; `synthetic:DIR` = generated into DIR (a
    # new or empty folder), used as is once it is a dataset. Nothing else is ever generated or deleted.
    path: str = "synthetic"
    height: int = 64
    width: int = 64
    fps: int = 16
    synth_episodes: int = 48  # synthetic data: episodes (episode i uses seed synth_seed + i)
    synth_seconds: float = 4.0
    synth_seed: int = 0
    # demo: every episode walks one fixed small town (seeds vary the agent only: a level a small model
    # learns); random: a new town per episode (titan_world/data/synth.py, docs/data.md)
    synth_level: str = "demo"
    i2v_ratio: float = 0.5  # the rest is V2V
    v2v_max_cond_frames: int = 2  # latent frames given as context in V2V samples
    num_workers: int = 0
    cache_dir: str | None = None  # local cache for remote datasets (default: <tmp>/titan_world_cache/<hash>)
    # `data ingest`: the frames a video's poses/intrinsics files describe when it has a display
    # rotation: stored (as in the file: device logs) | upright (as displayed: poses solved on
    # frames an extractor had already turned, e.g. ffmpeg's default)
    ingest_arrays: str = "stored"
    codec: CodecConfig = field(default_factory=CodecConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def validate(self) -> None:
        """Ranges of this section alone (the size vs codec stride rule: titan_world/config.py)."""

        def bad(key: str, value, expected: str) -> ValueError:
            return ValueError(f"data.{key}={value!r}: expected {expected}")

        for key in ("height", "width", "fps", "synth_episodes"):
            if getattr(self, key) < 1:
                raise bad(key, getattr(self, key), ">= 1")
        if self.synth_level not in SYNTH_LEVELS:
            raise bad("synth_level", self.synth_level, f"one of {', '.join(SYNTH_LEVELS)}")
        if not self.synth_seconds > 0:
            raise bad("synth_seconds", self.synth_seconds, "> 0")
        for key in ("v2v_max_cond_frames", "num_workers"):
            if getattr(self, key) < 0:
                raise bad(key, getattr(self, key), ">= 0")
        if self.codec.spatial_stride < 1:
            raise bad("codec.spatial_stride", self.codec.spatial_stride, ">= 1 (the codec's pixels per latent, e.g. 4)")
        if self.codec.channels < 0:
            raise bad("codec.channels", self.codec.channels, ">= 0 (0: exact)")
