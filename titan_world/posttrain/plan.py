"""Per-GPU memory of post-training stage 2 (self-rollout + DMD + GAN head), and the smallest mesh.

Why a model: a 14B stage-2 job builds three networks on every rank before its first step, and
what it then needs is dominated by things FSDP does not shard (the rollout's KV cache, the
recorded passes), so the mesh has to be chosen up front (`titan-world inspect CONFIG --posttrain`;
`post-train dmd` logs the estimate for its own mesh). Same first-order assumptions as
`parallel.planner` (its parameter formula and per-token activation constant, bf16 compute), and
what the stage-2 code does (docs/posttrain.md, "Memory plan"):

- state, sharded over dp_shard x cp: the student with fp32 params, grads and AdamW (16 B/param)
  and its fp32 EMA (4 B/param, when `posttrain.ema_decay` > 0);
  the fake score (the teacher's experts) with fp32 params and AdamW for every expert and the
  grads of the routed one; the GAN head like the student; the frozen teacher's weights only, in
  `posttrain.teacher_dtype`;
- gathered bf16 units: FSDP keeps the root and last block of every trained root (student, fake
  experts) after a forward, plus two blocks in flight;
- the rollout's KV cache, `(chunk + sink + window)` latent frames for every layer, 1/cp per rank
  (each rank holds its heads); it lives during the rollout only;
- the student step's recorded passes (the last `grad_chunks` chunks, with grad), 1/cp: without
  AC the block activations of the chunk's tokens and the keys/values it attended to; with
  `parallel.activation_checkpoint` the checkpointed blocks keep their inputs, the pass keeps a
  snapshot of the cache's stored frames (`rollout.RecordedPassCache`), and one block's working
  set comes back during the recompute;
- passes over the score window (frame before the last K chunks + those chunks): the fake
  score's with grad (critic loss; GAN generator loss) under the same AC, the teacher's and
  fake's DMD scores without grad (one block's working set).
A step's peak = state + gathered units + the recorded passes it keeps + the largest of the
phases that come and go (rollout with its cache, scores, the fake score's graded pass), + a
reserve for the CUDA context, NCCL buffers and fragmentation. Not measured at 14B yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from parallel.checkpointing import checkpointed_block_ids
from parallel.planner import GB, GPUS_PER_NODE, param_count
from titan_world.model.kv_cache import KVCache
from titan_world.posttrain.config import PostTrainConfig
from titan_world.posttrain.gan import GANHead


def gan_head_params(dim: int, num_blocks: int, num_queries: int) -> int:
    """Parameters of `GANHead(dim, num_blocks, num_queries)`, counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in GANHead(dim, num_blocks, num_queries).parameters())


def kv_cache_bytes(
    cfg, p: PostTrainConfig, tokens_per_frame: int, cp: int = 1, batch: int = 1, bytes_per: int = 2
) -> int:
    """Bytes of one rank's rollout cache: `KVCache` with this rank's heads, sized as
    `rollout.self_rollout` builds it (a chunk slot of at least the one given frame)."""
    shape = KVCache.buffer_shape(
        cfg.num_layers,
        batch,
        cfg.num_heads // cp,
        cfg.head_dim,
        tokens_per_frame,
        p.sink_frames,
        p.window_frames,
        max(p.chunk_frames, 1),
    )
    return 2 * math.prod(shape) * bytes_per


@dataclass
class PostTrainPlan:
    model: str
    gpus: int
    dp_shard: int
    cp: int
    gpu_mem_gb: float
    tokens_per_frame: int
    state_gb: dict[str, float] = field(default_factory=dict)  # student, fake_score, gan_head, teacher, gathered_units
    phases_gb: dict[str, float] = field(default_factory=dict)  # what comes and goes within a step
    reserve_gb: float = 4.0

    @property
    def state_total_gb(self) -> float:
        return sum(self.state_gb.values())

    @property
    def student_step_gb(self) -> float:
        ph = self.phases_gb
        return (
            self.state_total_gb
            + ph["recorded_passes"]
            + max(ph["kv_cache"] + ph["rollout_pass"], ph["score_passes"], ph["fake_grad_pass"] if ph["gan"] else 0.0)
            + self.reserve_gb
        )

    @property
    def critic_step_gb(self) -> float:
        ph = self.phases_gb
        return (
            self.state_total_gb
            + max(ph["kv_cache"] + ph["rollout_pass"], ph["fake_grad_pass"], ph["score_passes"])
            + self.reserve_gb
        )

    @property
    def peak_gb(self) -> float:
        return max(self.student_step_gb, self.critic_step_gb)

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.gpu_mem_gb


def posttrain_plan(
    cfg,
    p: PostTrainConfig,
    height: int,
    width: int,
    *,
    gpus: int = 8,
    cp: int = 1,
    teacher_experts: int = 1,
    teacher_bytes: int = 2,
    ac: str = "none",
    ac_every: int = 2,
    gpu_mem_gb: float = 80.0,
    vae_stride: int = 8,
    reserve_gb: float = 4.0,
    inflight_blocks: int = 2,
) -> PostTrainPlan:
    """Stage 2 on `gpus` ranks with context parallelism `cp` (FSDP over all of them); `cfg` is the
    student's model config (one expert), the teacher and fake score have `teacher_experts`; `ac`
    is `parallel.activation_checkpoint`, which stage 2 applies to the student and the fake score."""
    if gpus % cp:
        raise ValueError(f"--gpus {gpus} must be divisible by cp={cp}")
    if cfg.num_heads % cp:
        raise ValueError(
            f"cp={cp}: the model has {cfg.num_heads} attention heads; Ulysses needs them divisible by the CP degree"
        )
    ph_, pw_ = cfg.patch_size[1], cfg.patch_size[2]
    if height % (vae_stride * ph_) or width % (vae_stride * pw_):
        raise ValueError(
            f"{height}x{width}: expected multiples of {vae_stride * ph_} (codec stride {vae_stride} x patch)"
        )
    tpf = (height // vae_stride // ph_) * (width // vae_stride // pw_)
    if tpf % cp:
        raise ValueError(
            f"cp={cp}: a latent frame has {tpf} tokens; the rollout's cached passes need them divisible by the CP "
            "degree"
        )
    n, d, ffn, layers, b = param_count(cfg), cfg.dim, cfg.ffn_dim, cfg.num_layers, p.batch_size
    blk = param_count(cfg, "blocks.0")
    gan = gan_head_params(d, len(p.gan_blocks), p.gan_queries) if p.gan_weight > 0 else 0
    trained_roots = 1 + teacher_experts  # the student and every fake-score expert
    state = {
        "student": 16 * n / gpus / GB,
        "student_ema": (4 * n / gpus / GB) if p.ema_decay > 0 else 0.0,  # fp32, sharded like the student
        "fake_score": (12 * teacher_experts + 4) * n / gpus / GB,
        "gan_head": 16 * gan / gpus / GB,
        "teacher": teacher_bytes * teacher_experts * n / gpus / GB,
        "gathered_units": 2 * (trained_roots * (n - layers * blk + blk) + inflight_blocks * blk) / GB,
    }
    working = 20 * d + 2 * ffn  # values per token a block keeps without AC (parallel.planner)
    chunk_tokens = p.chunk_frames * tpf
    stored = (p.sink_frames + p.window_frames) * tpf  # cached frames a chunk attends to besides its own
    window = (1 + p.grad_chunks * p.chunk_frames) * tpf
    ckpt = len(checkpointed_block_ids(layers, ac, ac_every))
    kept = (2 if ac == "attention" else 1) * d
    fake_pass = window * (ckpt * kept + (layers - ckpt) * working + (working if ckpt else 0)) * 2
    recorded = chunk_tokens * (ckpt * kept + (layers - ckpt) * working)  # block activations, per pass
    recorded += (layers - ckpt) * (chunk_tokens + stored) * 2 * d  # keys/values saved by uncheckpointed attention
    recorded += layers * stored * 2 * d if ckpt else 0  # the snapshot a checkpointed pass recomputes from
    recompute = chunk_tokens * working if ckpt else 0
    phases = {
        "kv_cache": kv_cache_bytes(cfg, p, tpf, cp, b) / GB,
        "rollout_pass": b * chunk_tokens * working * 2 / cp / GB,
        "recorded_passes": b * (p.grad_chunks * recorded + recompute) * 2 / cp / GB,
        "score_passes": b * window * working * 2 / cp / GB,
        "fake_grad_pass": b * fake_pass / cp / GB,
        "gan": 1.0 if p.gan_weight > 0 else 0.0,
    }
    return PostTrainPlan(
        getattr(cfg, "name", "model"), gpus, gpus // cp, cp, gpu_mem_gb, tpf, state, phases, reserve_gb
    )


def smallest_mesh(cfg, p: PostTrainConfig, height: int, width: int, max_gpus: int = 1024, **kw) -> PostTrainPlan | None:
    """The fewest GPUs (then the smallest cp, which keeps the all-to-all cheap) whose plan fits:
    cp inside a node (dividing `GPUS_PER_NODE`, the heads and a frame's tokens), powers of two of
    dp_shard. None if nothing up to `max_gpus` fits."""
    best: PostTrainPlan | None = None
    for cp in (c for c in range(1, GPUS_PER_NODE + 1) if GPUS_PER_NODE % c == 0 and cfg.num_heads % c == 0):
        shard = 1
        while cp * shard <= max_gpus:
            try:
                plan = posttrain_plan(cfg, p, height, width, gpus=cp * shard, cp=cp, **kw)
            except ValueError:  # this cp does not split the heads or a frame's tokens
                break
            if plan.fits:
                if best is None or (plan.gpus, plan.cp) < (best.gpus, best.cp):
                    best = plan
                break
            shard *= 2
    return best


def format_posttrain_plan(plan: PostTrainPlan) -> str:
    ph = plan.phases_gb
    rows = [
        f"post-training stage 2 (DMD) of {plan.model}: {plan.gpus} GPUs, FSDP over all, cp={plan.cp} "
        f"({plan.tokens_per_frame:,} tokens per latent frame)",
        "per GPU, held all step:",
    ]
    rows += [f"  {k:<16} {v:8.1f} GB" for k, v in plan.state_gb.items()]
    rows += [
        "per GPU, within a step:",
        f"  {'kv_cache':<16} {ph['kv_cache']:8.1f} GB  (during the rollout)",
        f"  {'recorded_passes':<16} {ph['recorded_passes']:8.1f} GB  (student step: rollout to backward)",
        f"  {'fake_grad_pass':<16} {ph['fake_grad_pass']:8.1f} GB  (critic loss; GAN generator loss)",
        f"  {'score_passes':<16} {ph['score_passes']:8.1f} GB  (teacher / fake scores, no grad)",
        f"  {'reserve':<16} {plan.reserve_gb:8.1f} GB",
    ]
    verdict = "fits" if plan.fits else "does NOT fit"
    rows.append(
        f"peak: student step {plan.student_step_gb:.1f} GB, critic step {plan.critic_step_gb:.1f} GB "
        f"-> {verdict} in {plan.gpu_mem_gb:.0f} GB"
    )
    return "\n".join(rows)
