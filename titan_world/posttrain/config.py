"""Post-training section: causal adaptation (diffusion forcing) and DMD + GAN + self-rollout."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from titan_world.model.codec import check_frame_count
from titan_world.model.presets import OFFICIAL_NEGATIVE_PROMPT


def _bad(key: str, value, expected: str) -> ValueError:
    return ValueError(f"posttrain.{key}={value!r}: expected {expected}")


@dataclass
class PostTrainConfig:
    chunk_frames: int = 1  # latent frames per causal chunk (LingBot: 3); the start image is its own chunk
    forcing_timesteps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])  # plus t=0
    denoise_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])  # student sampling
    teacher: str | None = (
        None  # bidirectional teacher (Wan folder or run dir); None: runs/demo/train/model, else a fresh tiny one
    )
    student: str | None = (
        None  # causal-stage checkpoint that DMD starts from; None: runs/demo/causal/model, else the teacher
    )
    fake_updates: int = 2  # two-time-scale ratio: fake-score updates per student update (DMD2: 5)
    fake_lr: float = 1e-4
    student_lr: float = 2e-5
    causal_lr: float = 1e-4  # stage 1 (diffusion forcing) learning rate
    causal_steps: int = 200  # stage 1 steps when train.steps is unset
    dmd_steps: int = 40  # stage 2 steps (student updates) when train.steps is unset
    batch_size: int = 2  # per-rank clips per step
    clip_frames: int = 17  # stage 1 clip length in video frames (1 + 4k); stage 2 loads clips as long as its rollout
    gan_weight: float = 0.0
    gan_blocks: list[int] = field(default_factory=lambda: [1, 3])
    gan_queries: int = 4
    # Discriminator = head only (default), or head + fake-score trunk (DMD2/APT): then L_D reaches the trunk in
    # the critic update (weight gan_weight, next to flow matching's 1), regularised by APT's approximate R1:
    # gan_r1_weight · mean (D(x + δ) − D(x))² on real inputs, δ ~ N(0, gan_r1_sigma²) (APT: 100, 0.01).
    gan_train_trunk: bool = False
    gan_r1_weight: float = 0.0  # 0: no R1 (any discriminator); the trunk variant: 100
    gan_r1_sigma: float = 0.01
    # CFG on the real score, Wan's convention: v = v_neg + s·(v_cond − v_neg), 1 = off. Self-Forcing writes
    # cond + s'·(cond − uncond): its s' is our s − 1 (its 3.0 is our 4.0). docs/posttrain.md, "reference → ours".
    guidance_scale: float = 1.0
    # The teacher's unconditional text, encoded once per job by data.text_encoder (only when guidance_scale != 1).
    # "" (the tiny world: its hash encoder reads no Chinese); "official": Wan's default negative prompt (14B).
    negative_prompt: str = ""
    ema_decay: float = 0.99  # stage 2: EMA of the student's weights (Self-Forcing: 0.99); 0 disables
    ema_start_step: int = 200  # the EMA copies the student until this step, then averages (Self-Forcing: 200)
    export_ema: bool = True  # stage 2 exports the EMA weights (false: the raw student); needs ema_decay > 0
    dmd_shift: float = 3.0  # DMD noise levels: shifted uniform sigmas in [dmd_sigma_min, dmd_sigma_max]
    dmd_sigma_min: float = 0.02
    dmd_sigma_max: float = 0.98
    rollout_chunks: int = 4
    grad_chunks: int = (
        4  # gradients flow through the last K chunks only (tiny: all, so DMD's scores see the teacher's I2V clip)
    )
    # The scores' given frame when grad_chunks < rollout_chunks (a mid-rollout latent): "reencode" decodes it
    # with data.codec and encodes its last video frame as a start image (Self-Forcing; the teacher's I2V
    # conditioning is always an encoded single image); "latent" passes the 4-frame latent as is.
    score_cond: str = "reencode"
    sink_frames: int = 1  # KV cache: attention-sink latent frames
    window_frames: int = 8  # KV cache: local window of latent frames
    bootstrap_steps: int = 150  # unused since post-training takes only a given teacher; kept so older run configs load
    eval_clips: int = 4  # clips scored (PSNR vs ground truth, action following) before/after a stage
    teacher_dtype: str = (
        "auto"  # frozen teacher's stored weights: auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32
    )
    # >1 rank: FSDP2-shard student, fake score + GAN head, frozen teacher; false: full replicas + gradient all-reduce
    fsdp: bool = True

    def validate(self) -> None:
        """Ranges of this section alone (cross-section checks: titan_world/config.py)."""
        for key in (
            "chunk_frames",
            "batch_size",
            "fake_updates",
            "rollout_chunks",
            "window_frames",
            "gan_queries",
            "bootstrap_steps",
        ):
            if getattr(self, key) < 1:
                raise _bad(key, getattr(self, key), ">= 1")
        for key in ("causal_steps", "dmd_steps", "sink_frames", "eval_clips", "ema_start_step"):
            if getattr(self, key) < 0:
                raise _bad(key, getattr(self, key), ">= 0")
        for key in ("fake_lr", "student_lr", "causal_lr", "dmd_shift"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise _bad(key, value, "a positive number")
        for key in ("gan_weight", "guidance_scale"):
            if not getattr(self, key) >= 0:
                raise _bad(key, getattr(self, key), ">= 0")
        for key in ("gan_r1_weight", "gan_r1_sigma"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise _bad(key, value, "a number >= 0")
        if self.gan_weight == 0 and (self.gan_train_trunk or self.gan_r1_weight > 0):
            raise _bad(
                "gan_weight",
                self.gan_weight,
                f"> 0 with posttrain.gan_train_trunk={self.gan_train_trunk} / gan_r1_weight={self.gan_r1_weight} "
                "(they configure the GAN discriminator, which gan_weight=0 turns off)",
            )
        if self.gan_r1_weight > 0 and self.gan_r1_sigma == 0:
            raise _bad("gan_r1_sigma", 0.0, "> 0 with posttrain.gan_r1_weight > 0 (σ = 0 makes the penalty 0)")
        if self.score_cond not in ("reencode", "latent"):
            raise _bad("score_cond", self.score_cond, "'reencode' or 'latent'")
        if not 0.0 <= self.ema_decay < 1.0:
            raise _bad("ema_decay", self.ema_decay, "0 (off) or a decay in (0, 1)")
        if not 0.0 < self.dmd_sigma_min < self.dmd_sigma_max < 1.0:
            raise _bad("dmd_sigma_min/dmd_sigma_max", [self.dmd_sigma_min, self.dmd_sigma_max], "0 < min < max < 1")
        for key in ("forcing_timesteps", "denoise_steps"):
            steps = list(getattr(self, key))
            if not steps or not all(0 < t <= 1000 for t in steps):
                raise _bad(key, steps, "a non-empty list of timesteps in (0, 1000], e.g. [1000, 750, 500, 250]")
        check_frame_count(self.clip_frames, f"posttrain.clip_frames={self.clip_frames}:")
        if self.window_frames < self.chunk_frames:
            raise _bad(
                "window_frames",
                self.window_frames,
                f">= posttrain.chunk_frames={self.chunk_frames} (the KV cache's ring must hold one whole chunk)",
            )

    @property
    def reencodes_score_cond(self) -> bool:
        """Whether the scores' given frame is a generated mid-rollout latent to re-encode (`score_cond`)."""
        return self.score_cond == "reencode" and max(1, self.grad_chunks) < self.rollout_chunks

    def negative_text(self) -> str:
        """The prompt the real score's unconditional branch encodes (`official` resolved)."""
        return OFFICIAL_NEGATIVE_PROMPT if self.negative_prompt == "official" else self.negative_prompt
