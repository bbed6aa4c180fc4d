"""`torch.compile` per block: every block has the same structure, so one graph is reused (with
inline_inbuilt_nn_modules the parameters are graph inputs) and compile time does not grow with
depth; a whole-model compile would also have to trace the FSDP root and CP scatter/gather.

The compiled function is the block's `forward` (an instance attribute), not the module, so
parameter names do not gain an `_orig_mod.` prefix and FSDP hooks stay outside the graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["compile_blocks"]


def compile_blocks(
    model: nn.Module, backend: str = "inductor", fullgraph: bool = False, dynamic: bool | None = False, **options
) -> nn.Module:
    """Compile each `model.blocks[i].forward` in place (after AC, before FSDP); returns `model`."""
    for block in model.blocks:
        if getattr(block, "_titan_compiled", False):
            continue
        block.forward = torch.compile(block.forward, backend=backend, fullgraph=fullgraph, dynamic=dynamic, **options)
        block._titan_compiled = True
    return model
