"""Post-training section: causal adaptation (diffusion forcing) and DMD + GAN + self-rollout."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PostTrainConfig:
    chunk_frames: int = 1  # latent frames per causal chunk (LingBot: 3)
    forcing_timesteps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])  # plus t=0
    denoise_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])  # student sampling
    teacher: str | None = None  # run dir / checkpoint of the bidirectional teacher
    student: str | None = None  # causal-stage checkpoint that DMD starts from
    fake_updates: int = 5  # two-time-scale ratio: fake-score updates per student update
    fake_lr: float = 1e-4
    student_lr: float = 2e-5
    gan_weight: float = 0.0
    gan_blocks: list[int] = field(default_factory=lambda: [1, 3])
    gan_queries: int = 4
    guidance_scale: float = 1.0  # CFG on the real score
    rollout_chunks: int = 4
    grad_chunks: int = 1  # gradients flow through the last K chunks only
    sink_frames: int = 1  # KV cache: attention-sink latent frames
    window_frames: int = 8  # KV cache: local window of latent frames
