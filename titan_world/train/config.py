"""Training section: optimisation, checkpointing and the curriculum of clip lengths."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from titan_world.model.codec import check_frame_count


def _bad(key: str, value, expected: str) -> ValueError:
    return ValueError(f"{key}={value!r}: expected {expected}")


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise _bad(key, value, "a positive number")


@dataclass
class StageConfig:
    """One curriculum stage. Clip length in frames must be 1 + 4k (codec rule)."""

    name: str = "5s"
    frames: int = 17
    shift: float = 3.0
    global_batch: int | None = None  # None: train.global_batch
    cp: int | None = None  # None: parallel.cp
    lr: float | None = None  # None: train.lr
    steps: int = 100


@dataclass
class TrainConfig:
    steps: int | None = None  # None: sum of the curriculum stages' steps
    seed: int = 0
    global_batch: int = 4
    micro_batch: int | None = None  # per-rank micro batch; None: global_batch / dp
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables the EMA copy
    expert: str = "all"  # all (dense model, or MoE with synced routing) | high | low
    task: str = "pretrain"  # pretrain | action_finetune
    # Starting weights, for both tasks: a Wan folder, a two-expert root (high_noise_model/ +
    # low_noise_model/: with train.expert=high|low the matching one is read, with all both, for
    # model.num_experts=2) or a run dir holding model/. pretrain: optional (None: Wan's random init,
    # seeded by train.seed); action_finetune: required (backbone and any adapter from it).
    # Read one tensor at a time, each rank only its own shard; ignored when the run resumes.
    base_checkpoint: str | None = None
    train_modulation: bool = False  # action finetune: also train AdaLN/modulation parameters
    ckpt_every: int = 50
    keep_last: int = 3
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    profile_steps: list[int] = field(default_factory=list)  # [start, end] for a torch.profiler trace
    peak_tflops: float | None = None  # override of the device peak used for MFU
    export: bool = True  # write RUN_DIR/model/ (Wan format) at the end (and RUN_DIR/adapter/ for action finetune)
    sample_steps: int = 8  # sampler steps of the action-following check
    action_check_episodes: int = 0  # >0: after action finetuning, print true-vs-shuffled action errors
    action_check_frames: int = 0  # clip length of that check (1 + 4k video frames); 0: the last stage's
    # test hooks (deterministic fault injection; leave empty in real runs)
    inject_nan_steps: list[int] = field(default_factory=list)  # multiply the loss by NaN at these steps
    preempt_at_step: int | None = None  # behave as if SIGUSR1 arrived during this step (checkpoint + exit 75)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])

    def validate(self) -> None:
        """Ranges of this section alone (checks needing the world size or files: train/loop.py)."""
        _positive("train.lr", self.lr)
        if self.global_batch < 1:
            raise _bad("train.global_batch", self.global_batch, ">= 1")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise _bad("train.betas", list(self.betas), "two Adam betas in [0, 1), e.g. [0.9, 0.99]")
        if self.weight_decay < 0:
            raise _bad("train.weight_decay", self.weight_decay, ">= 0")
        if self.warmup_steps < 0:
            raise _bad("train.warmup_steps", self.warmup_steps, ">= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise _bad("train.min_lr_ratio", self.min_lr_ratio, "a fraction of train.lr in [0, 1]")
        if not self.grad_clip >= 0:
            raise _bad("train.grad_clip", self.grad_clip, ">= 0 (0: no clipping)")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise _bad(
                "train.micro_batch", self.micro_batch, ">= 1 samples per rank and micro-step (null: the per-rank batch)"
            )
        if self.keep_last < 1:
            raise _bad("train.keep_last", self.keep_last, ">= 1 (checkpoints kept; the newest is always kept)")
        if self.max_bad_steps < 0:
            raise _bad(
                "train.max_bad_steps", self.max_bad_steps, ">= 0 (non-finite steps in a row before the run stops)"
            )
        if self.sample_steps < 1:
            raise _bad("train.sample_steps", self.sample_steps, ">= 1")
        if self.action_check_episodes < 0:
            raise _bad("train.action_check_episodes", self.action_check_episodes, ">= 0")
        if not self.stages:
            raise _bad("train.stages", [], "at least one stage")
        for i, st in enumerate(self.stages):
            key = f"train.stages[{i}]"
            if not st.shift > 0:
                raise _bad(f"{key}.shift", st.shift, "a positive flow shift")
            if st.global_batch is not None and st.global_batch < 1:
                raise _bad(f"{key}.global_batch", st.global_batch, ">= 1 (or null: train.global_batch)")
            if st.lr is not None:
                _positive(f"{key}.lr", st.lr)
            if st.cp is not None and st.cp < 1:
                raise _bad(f"{key}.cp", st.cp, ">= 1 (or null: parallel.cp)")


@dataclass
class DecoderDistillConfig:
    """`titan-world distill-decoder`: a light streaming decoder taught by the codec's own decode
    (serving.light_decoder; titan_world/model/light_decoder.py)."""

    steps: int = 300
    batch_size: int = 4
    clip_frames: int = 9  # video frames per sample (1 + 4k); the dataset's clips, as training cuts them
    lr: float = 2.0e-3
    warmup_steps: int = 20
    width: int = 64  # channels at latent resolution (the decoder's size; see LightDecoderConfig)
    depth: int = 2  # residual blocks at latent resolution
    edge_weight: float = 0.5  # L1 on image gradients beside the pixel L1: keeps the edges a plain L1 softens
    eval_batches: int = 4  # held-out batches (another seed) for the final PSNR against the teacher
    seed: int = 0

    def validate(self) -> None:
        for key in ("steps", "batch_size", "width", "depth", "eval_batches"):
            if getattr(self, key) < 1:
                raise _bad(f"decoder.{key}", getattr(self, key), ">= 1")
        if self.warmup_steps < 0:
            raise _bad("decoder.warmup_steps", self.warmup_steps, ">= 0")
        _positive("decoder.lr", self.lr)
        if self.edge_weight < 0:
            raise _bad("decoder.edge_weight", self.edge_weight, ">= 0")
        check_frame_count(self.clip_frames, f"decoder.clip_frames={self.clip_frames}:")
