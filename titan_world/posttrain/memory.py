"""Memory levers of stage 2 (docs/posttrain.md, "Memory plan"): activation checkpointing on the
trained networks, and the frozen teacher stored in bf16; with them the speed settings pretraining
applies at the same place (`prepare_network`: FP8 GEMMs, torch.compile).

Activation checkpointing goes on the fake score and the student (every expert of an MoE):
  - the fake score has no KV cache: each of its passes is one self-contained forward over the
    score window, so recomputing a block in backward gives exactly the recorded activations;
  - the student's recorded rollout passes read K/V from the rolling ring-buffer cache, which later
    chunks' t = 0 passes overwrite in place before the backward. A checkpointed student therefore
    rolls out with `snapshot_recorded` (`rollout.RecordedPassCache`): each recorded pass reads a
    copy of the keys it attends to, which lives until backward, so a recomputed pass reads the
    same K/V (the copy is what the uncheckpointed pass saves for backward anyway);
  - the frozen teacher runs no backward: nothing to recompute.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from parallel.config import ParallelConfig
from titan_world.model.moe import experts

TEACHER_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
COMPILE_BACKEND = "inductor"  # torch.compile backend of `parallel.compile` (tests count graphs with their own)


def prepare_network(
    net: nn.Module, parallel: ParallelConfig | None, *, checkpoint: bool = True, float8: bool = True
) -> list[int]:
    """What pretraining does to its network before FSDP, in torchtitan's order, on every expert of
    `net`: FP8 GEMMs (`parallel.float8`, only with `float8`), activation checkpointing
    (`parallel.activation_checkpoint`, only with `checkpoint`: the frozen teacher runs no
    backward) and per-block torch.compile (`parallel.compile`). Returns the checkpointed block
    indices (of one expert). A checkpointed student must roll out with `snapshot_recorded`.

    Stage 2 gives FP8 to the student only: the DMD gradient is the difference of the teacher's
    and the fake score's predictions, a few percent of either, and FP8 rounding of the two
    networks (whose weights drift apart) is of that order; the student's rollout passes are most
    of the stage's GEMMs anyway.

    The GAN head's `FeatureTap` keeps working: the project's AC replaces a block's `forward`, and
    the recomputation in backward calls that inner forward directly, not the block's `__call__`,
    so the block's forward hooks (the tap) fire once, on the recorded forward's output.
    """
    if parallel is None:
        return []
    from parallel.checkpointing import apply_activation_checkpointing
    from parallel.compile import compile_blocks
    from parallel.float8 import apply_float8

    ids: list[int] = []
    for expert in experts(net):
        if float8:
            apply_float8(expert, parallel.float8)
        if checkpoint:
            ids = apply_activation_checkpointing(expert, parallel)
        if parallel.compile:
            compile_blocks(expert, backend=COMPILE_BACKEND)
    return ids


def teacher_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`posttrain.teacher_dtype` on `device`: auto = bf16 on CUDA (the dtype FSDP computes it in
    there anyway), fp32 on CPU (keeps the tiny runs' numerics; CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in TEACHER_DTYPES:
        raise ValueError(f"posttrain.teacher_dtype={name!r}: expected auto, bfloat16 or float32")
    return TEACHER_DTYPES[name]


def store_teacher(teacher: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Freeze the teacher and store its weights in `dtype` (before sharding: FSDP then shards and
    gathers them in that dtype). Its outputs are cast to fp32 where the DMD math reads them
    (`dmd.velocity`), so only the scores' rounding changes, not the loss arithmetic."""
    return teacher.requires_grad_(False).eval().to(dtype)
