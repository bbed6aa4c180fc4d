"""FSDP2 (`fully_shard`) for any module that has a `.blocks` ModuleList.

One FSDP unit per block (its all-gather overlaps the previous block's compute) plus the root for
the remaining parameters (embeddings, head). Parameters are sharded over the flattened
dp_shard×cp mesh so CP ranks hold distinct shards; with dp_replicate > 1 the 2-D mesh gives HSDP
(shard within a group, all-reduce across replicas).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .config import ParallelConfig
from .mesh import ParallelMesh

__all__ = ["apply_fsdp", "mixed_precision_policy"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def mixed_precision_policy(
    cfg: ParallelConfig, device_type: str, stored: torch.dtype = torch.float32
) -> MixedPrecisionPolicy:
    """bf16 compute params on GPU, fp32 on CPU (CPU bf16 matmuls are slow and break parity tests);
    gradients are always reduced in `cfg.reduce_dtype` (fp32 by default). Parameters `stored`
    narrower than that compute dtype (a bf16 frozen teacher on CPU) compute in their own dtype and
    are never upcast on all-gather.

    Forward inputs are not cast: the model casts what each layer reads to that layer's dtype and
    keeps the rest in fp32 by design (timesteps before the sinusoidal embedding, AdaLN modulation,
    RoPE tables, camera poses). Casting every input to bf16 would round t (937 -> 936), the
    modulation and RoPE at every block boundary, and `torch.linalg.inv` refuses bf16 poses."""
    param = _DTYPES[cfg.param_dtype] if device_type == "cuda" else torch.float32
    param = stored if stored.itemsize < param.itemsize else param
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=_DTYPES[cfg.reduce_dtype], cast_forward_inputs=False)


def apply_fsdp(
    model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig, mp_policy: MixedPrecisionPolicy | None = None
) -> nn.Module:
    """Shard `model` in place (per block, then root) and return it.

    `mp_policy` overrides `mixed_precision_policy(cfg, ...)` (`parallelize` passes the one for the
    dtype the network is stored in).

    Frozen parameters (requires_grad=False, e.g. the backbone during action finetuning) are
    sharded like the rest (FSDP2 supports mixed frozen/trainable params in one unit): they are
    all-gathered for compute, get no gradient and no reduce-scatter traffic.

    Gradients are averaged over the whole dp_shard×cp (×dp_replicate) mesh: with the gradient
    scaling of parallel/ulysses.py that mean is the exact data-parallel gradient under CP.

    A model with a `keeps_fp32(name)` rule (the Wan DiT: time embedding/projection and head stay
    fp32 in bf16, as the references run them) gets those top-level modules as their own units
    computing in fp32. Inside a block everything shares the block's unit and dtype (nested units
    there would put FSDP hooks inside the per-block torch.compile region).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"apply_fsdp: {type(model).__name__} has no `blocks` nn.ModuleList")
    mp = mp_policy or mixed_precision_policy(cfg, mesh.device_type)
    fsdp_mesh = mesh.fsdp_mesh
    for i, block in enumerate(blocks):
        # The last block's params are needed again right at the start of backward: keep them.
        reshard = cfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=fsdp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    keeps_fp32 = getattr(model, "keeps_fp32", None)
    if keeps_fp32 is not None and mp.param_dtype is not None and mp.param_dtype.itemsize < 4:
        fp32 = replace(mp, param_dtype=torch.float32)
        for name, child in model.named_children():
            params = [n for n, _ in child.named_parameters()]
            if child is not blocks and params and all(keeps_fp32(f"{name}.{n}") for n in params):
                fully_shard(child, mesh=fsdp_mesh, mp_policy=fp32, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=mp, reshard_after_forward=False)
    return model
