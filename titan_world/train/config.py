"""Training section: optimisation, checkpointing and the curriculum of clip lengths."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # seeded by train.seed); action_finetune: required (backbone from it, fresh zero-init adapter).
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
