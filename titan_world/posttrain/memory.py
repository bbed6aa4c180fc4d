"""Memory levers of stage 2 (docs/posttrain.md, "Memory plan"): activation checkpointing on the
trained networks and the frozen teacher stored in bf16, both applied by `parallel.parallelize`.

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

TEACHER_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def teacher_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`posttrain.teacher_dtype` on `device`: auto = bf16 on CUDA (the dtype FSDP computes it in
    there anyway), fp32 on CPU (keeps the tiny runs' numerics; CPU bf16 matmuls are slow). Its
    outputs are cast to fp32 where the DMD math reads them (`dmd.velocity`), so only the scores'
    rounding changes, not the loss arithmetic."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in TEACHER_DTYPES:
        raise ValueError(f"posttrain.teacher_dtype={name!r}: expected auto, bfloat16 or float32")
    return TEACHER_DTYPES[name]
