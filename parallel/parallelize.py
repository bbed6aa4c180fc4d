"""The one recipe that readies a network for a job: training, post-training (student, critic,
frozen teacher) and serving all call `parallelize`.

On every expert of `net` (an MoE's `.high` and `.low` separately), in torchtitan's order:
context-parallel hook (Ulysses), attention backend (flash/xformers fall back to SDPA with a
warning when the package or CUDA is missing), FP8 GEMMs, activation checkpointing, per-block
torch.compile, FSDP2. The role decides what applies:

| role    | FP8 | AC  | FSDP                       | notes                                              |
|---------|-----|-----|----------------------------|----------------------------------------------------|
| train   | yes | yes | yes                        | pretraining / action finetuning                    |
| student | yes | yes | yes                        | a checkpointed student rolls out with snapshots    |
| critic  | no  | yes | yes                        | DMD's fake score: its gradient is a small gap      |
| teacher | no  | no  | frozen, resharded after fw | no backward; stored in `posttrain.teacher_dtype`   |
| serve   | yes | no  | no                         | `serving.float8` / `serving.compile`               |

Stage 2 gives FP8 to the student only: the DMD gradient is the difference of the teacher's and the
fake score's predictions, a few percent of either, and FP8 rounding of the two networks (whose
weights drift apart) is of that order; the student's rollout passes are most of its GEMMs anyway.
AC replaces a block's `forward`; its recomputation calls that inner forward, so forward hooks (the
GAN head's `FeatureTap`) fire once. Parameters must be sharded before an optimizer is built on them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from parallel.checkpointing import apply_activation_checkpointing
from parallel.compile import compile_blocks
from parallel.config import ParallelConfig
from parallel.float8 import apply_float8
from parallel.fsdp import apply_fsdp, mixed_precision_policy
from parallel.mesh import ParallelMesh
from titan_world.model.moe import experts

ROLES = ("train", "student", "critic", "teacher", "serve")
COMPILE_BACKEND = "inductor"  # torch.compile backend of `parallel.compile` (tests count graphs with their own)


class Parallelized(NamedTuple):
    float8_layers: int  # linear layers running FP8 GEMMs (all experts)
    checkpointed: list[int]  # activation-checkpointed block indices (of one expert)


def parallelize(
    net: nn.Module,
    mesh: ParallelMesh | None,
    cfg: ParallelConfig,
    role: str,
    *,
    device: torch.device | str = "cpu",
    cp=None,
    attn_backend: str | None = None,
) -> Parallelized:
    """Ready `net` in place for `role` (see the table above). `mesh` None: no FSDP (one process,
    full replicas, serving); `cp` the Ulysses context (None: off); `device` where it computes;
    `attn_backend` the job's `model.attn_backend` (None: the network's own; a checkpoint does not
    store it, so jobs that load one pass theirs). A frozen teacher: requires_grad off *before* sharding, so FSDP
    sees no trainable parameter, and every unit reshards after its forward (it runs no backward);
    the mixed-precision policy follows the dtype `net` is stored in."""
    if role not in ROLES:
        raise ValueError(f"parallelize: role={role!r}, expected one of {', '.join(ROLES)}")
    heads = experts(net)[0].cfg.num_heads
    if cp is not None and cp.size > 1 and heads % cp.size:
        raise ValueError(
            f"parallel.cp={cp.size}: the network has {heads} attention heads; Ulysses needs them "
            "divisible by the CP degree"
        )
    if role == "teacher":
        net.requires_grad_(False).eval()
    device_type = torch.device(device).type
    mp = mixed_precision_policy(cfg, mesh.device_type, next(net.parameters()).dtype) if mesh is not None else None
    float8_layers, ids = 0, []
    for expert in experts(net):
        expert.set_context_parallel(cp)
        expert.set_attn_backend(attn_backend or expert.attn_backend, device_type)
        if role in ("train", "student", "serve"):
            float8_layers += apply_float8(
                expert, cfg.float8, key="serving.float8" if role == "serve" else "parallel.float8"
            )
        if role in ("train", "student", "critic"):
            ids = apply_activation_checkpointing(expert, cfg)
        if cfg.compile:
            compile_blocks(expert, backend=COMPILE_BACKEND)
        if mesh is not None:
            apply_fsdp(expert, mesh, cfg, mp_policy=mp)
            if role == "teacher":
                expert.set_reshard_after_forward(True)
    return Parallelized(float8_layers, ids)
