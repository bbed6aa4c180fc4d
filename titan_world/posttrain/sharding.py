"""How the post-training networks (student, fake score + GAN head, frozen teacher) are spread over
ranks: FSDP2 sharding of their parameters, and Ulysses context parallelism of their sequences.

Used when a job runs on more than one rank with `posttrain.fsdp` on (the default); with it off,
every rank holds full replicas and `distill.sync_grads` all-reduces the gradients instead.
Every network is sharded with the project's `parallel.apply_fsdp` (one unit per block + root,
mixed precision as in pretraining); an MoE is two independent FSDP roots, `.high` and `.low`,
as in `train.loop.Trainer`. Parameters must be sharded *before* an optimizer is built on them:
`fully_shard` replaces them with DTensor parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from parallel.config import ParallelConfig
from titan_world.model.moe import experts

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from parallel.mesh import ParallelMesh


def set_context_parallel(net: nn.Module, cp) -> nn.Module:
    """Ulysses on every expert of `net` (a `parallel.UlyssesContext`, or None: off); returns it.

    Every score and rollout pass then runs on this rank's shard of the sequence and its share of
    the attention heads; outputs are gathered, so the losses are the same on every CP rank."""
    for expert in experts(net):
        expert.set_context_parallel(cp)
    return net


@dataclass
class Sharding:
    """The mesh and parallel settings the networks of one job are sharded with."""

    mesh: ParallelMesh
    parallel: ParallelConfig

    @classmethod
    def build(cls, parallel: ParallelConfig, world: int, device: torch.device) -> Sharding:
        from parallel.mesh import build_mesh

        return cls(build_mesh(parallel, world, device.type), parallel)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the sharded networks compute in (bf16 on GPU, fp32 on CPU: `apply_fsdp`'s
        policy). The rollout's KV cache must hold it: the stored (sharded) params stay fp32."""
        from parallel.fsdp import mixed_precision_policy

        return mixed_precision_policy(self.parallel, self.mesh.device_type).param_dtype or torch.float32

    def policy(self, stored: torch.dtype = torch.float32) -> MixedPrecisionPolicy:
        """`apply_fsdp`'s mixed-precision policy, except for parameters stored narrower than its
        compute dtype (a bf16 teacher on CPU, where the policy computes in fp32): they compute in
        their own dtype and are never upcast on all-gather. On GPU a bf16 teacher gets the same
        policy as the other networks."""
        from parallel.fsdp import mixed_precision_policy

        mp = mixed_precision_policy(self.parallel, self.mesh.device_type)
        if stored.itemsize < (mp.param_dtype or torch.float32).itemsize:
            return replace(mp, param_dtype=stored)
        return mp

    def network(self, net: nn.Module, frozen: bool = False) -> nn.Module:
        """Shard `net` in place (each MoE expert separately); returns it.

        `frozen` (the teacher): requires_grad is turned off *before* sharding, so FSDP sees no
        trainable parameter (no gradient buffers, no reduce-scatter, and no optimizer is ever
        built on it), and every unit, root and last block included, reshards after its forward:
        `apply_fsdp` keeps those two gathered for the backward, which a frozen net never runs.
        The mixed-precision policy follows the dtype `net` is stored in (`policy`).
        """
        from parallel.fsdp import apply_fsdp

        if frozen:
            net.requires_grad_(False).eval()
        mp = self.policy(next(net.parameters()).dtype)
        for expert in experts(net):
            apply_fsdp(expert, self.mesh, self.parallel, mp_policy=mp)
            if frozen:
                expert.set_reshard_after_forward(True)
        return net

    def head(self, head: nn.Module) -> nn.Module:
        """Shard the GAN head as one FSDP unit, computing in fp32.

        Why shard rather than replicate it: it is not that small at scale (A14B, 4 tapped blocks:
        0.84B parameters, 13.4 GB of fp32 weights + gradients + AdamW state per replica, 1.7 GB
        per GPU sharded over 8); the critic's optimizer, gradient-norm clip and checkpoint then
        see one kind of parameter, DTensors on one mesh; and its gradients are reduced by FSDP in
        the fake score's backward, where a replica would need its own all-reduce and a norm over
        mixed DTensor/plain gradients. One unit, not per sub-layer: a single all-gather per head
        forward. fp32 compute because the head normalises fp32 features itself
        (`GANHead.forward`) and its weights must match.
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        fully_shard(head, mesh=self.mesh.fsdp_mesh, mp_policy=fp32)
        return head
