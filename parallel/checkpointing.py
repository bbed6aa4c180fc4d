"""Activation checkpointing per block: none | full | selective (every n-th block).

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

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import ParallelConfig

__all__ = ["apply_activation_checkpointing", "checkpointed_block_ids"]


def checkpointed_block_ids(num_blocks: int, mode: str, every: int = 2) -> list[int]:
    """Which blocks recompute: full = all; selective = every `every`-th (0, n, 2n, ...)."""
    if mode == "none":
        return []
    if mode == "full":
        return list(range(num_blocks))
    if mode == "selective":
        if every < 1:
            raise ValueError(f"parallel.ac_every={every}: expected >= 1")
        return [i for i in range(num_blocks) if i % every == 0]
    raise ValueError(f"parallel.activation_checkpoint={mode!r}: expected none, full or selective")


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def apply_activation_checkpointing(model: nn.Module, cfg: ParallelConfig) -> list[int]:
    """Wrap `model.blocks[i].forward` in place; returns the wrapped block indices.

    Apply before `compile_blocks` and `apply_fsdp` (the torchtitan order: AC, compile, FSDP).
    """
    ids = checkpointed_block_ids(len(model.blocks), cfg.activation_checkpoint, cfg.ac_every)
    for i in ids:
        block = model.blocks[i]
        if getattr(block, "_titan_ac", False):
            continue
        block.forward = functools.partial(_checkpointed, block.forward)
        block._titan_ac = True
    return ids
