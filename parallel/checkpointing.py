"""Activation checkpointing per block: none | full | selective (every n-th block) | attention.

`attention` is per-op selective checkpointing on every block: the outputs of the fused attention
kernels are saved and everything else (GEMMs, norms, RoPE) is recomputed. At long sequences
attention is most of a block's FLOPs, so recomputation costs ~0.3 of a forward instead of 1.0
for `full`, while memory stays close to `full` (only [S, d] attention outputs are kept).

Implemented by replacing the block instance's `forward` with a `torch.utils.checkpoint` (non-
reentrant) call instead of torch's `checkpoint_wrapper`/torchtitan's `apply_ac`: those wrap the
block in a new module, which inserts `_checkpoint_wrapped_module.` into every parameter name and
breaks the Wan key names our checkpoints and `load_pretrained` rely on. Non-reentrant checkpoint
composes with FSDP2 (its pre-backward hook re-gathers params before the recompute), with
torch.compile, and with CP collectives (recompute re-runs the all-to-all, in the same order on all
ranks).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .config import ParallelConfig

__all__ = ["apply_activation_checkpointing", "checkpointed_block_ids"]


_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
)


def _save_attention_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _attention_context():
    return create_selective_checkpoint_contexts(_save_attention_policy)


def checkpointed_block_ids(num_blocks: int, mode: str, every: int = 2, skip_last: int = 0) -> list[int]:
    """Which blocks recompute: full / attention = all; selective = every `every`-th (0, n, 2n, ...);
    minus the last `skip_last` blocks, which keep their activations when memory allows (the last
    blocks: the first ones backward needs, so their memory is also freed first)."""
    if skip_last < 0:
        raise ValueError(f"parallel.ac_skip_last={skip_last}: expected >= 0")
    if mode == "none":
        return []
    if mode in ("full", "attention"):
        ids = list(range(num_blocks))
    elif mode == "selective":
        if every < 1:
            raise ValueError(f"parallel.ac_every={every}: expected >= 1")
        ids = [i for i in range(num_blocks) if i % every == 0]
    else:
        raise ValueError(f"parallel.activation_checkpoint={mode!r}: expected none, full, selective or attention")
    return [i for i in ids if i < num_blocks - skip_last]


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def _checkpointed_save_attention(forward, *args, **kwargs):
    return checkpoint(
        forward, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_attention_context, **kwargs
    )


def apply_activation_checkpointing(model: nn.Module, cfg: ParallelConfig) -> list[int]:
    """Wrap `model.blocks[i].forward` in place; returns the wrapped block indices.

    Apply before `compile_blocks` and `apply_fsdp` (the torchtitan order: AC, compile, FSDP).
    """
    ids = checkpointed_block_ids(len(model.blocks), cfg.activation_checkpoint, cfg.ac_every, cfg.ac_skip_last)
    for i in ids:
        block = model.blocks[i]
        if getattr(block, "_titan_ac", False):
            continue
        wrapper = _checkpointed_save_attention if cfg.activation_checkpoint == "attention" else _checkpointed
        block.forward = functools.partial(wrapper, block.forward)
        block._titan_ac = True
    return ids
