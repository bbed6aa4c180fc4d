"""FP8 GEMMs for the transformer blocks, through torchao's `Float8Linear` (dynamic scaling).

Why only the blocks: they hold ~99% of the GEMM FLOPs; the patch/text/time embeddings, the
head and the zero-initialised action adapter are small, and the head's output precision matters
most. The attention kernels themselves stay bf16 (at 32k tokens attention is ~70% of the 1.3B
model's FLOPs, so FP8 speeds up the remaining ~30%).

Recipes (torchao's): `tensorwise` (one scale per tensor, fastest) and `rowwise` (one scale per
row, more accurate; what torchao recommends for training). `Float8Linear` keeps the module's
parameter names and dtypes, so checkpoints are unchanged and interchangeable with bf16 runs.
Apply before activation checkpointing, compile and FSDP (the torchtitan order); on a GPU the
casts only pay off compiled (`parallel.compile` / `serving.compile`).
"""

from __future__ import annotations

import torch.nn as nn

from parallel.config import FLOAT8_RECIPES as RECIPES


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """(torchao's `module_filter_fn` signature) A block's linear layer with both dims divisible by 16
    (what the FP8 GEMM kernels need)."""
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith("blocks.")
        and ".action_proj." not in fqn
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def apply_float8(model: nn.Module, recipe: str, *, key: str = "parallel.float8") -> int:
    """Swap the eligible `nn.Linear` layers of `model` for `Float8Linear`; returns how many.

    `recipe`: one of RECIPES ("none" is a no-op). `key` names the config key in errors.
    """
    if recipe not in RECIPES:
        raise ValueError(f"{key}={recipe!r}: expected one of {', '.join(RECIPES)}")
    if recipe == "none":
        return 0
    try:
        from torchao.float8 import (  # noqa: PLC0415 (torchao is heavy to import: only with FP8 on)
            Float8LinearConfig,
            convert_to_float8_training,
        )
    except ImportError as err:
        raise ImportError(
            f"{key}={recipe} needs torchao (pip install torchao, see scripts/constraints.txt): {err}"
        ) from err
    count = sum(float8_eligible(m, n) for n, m in model.named_modules())
    if count:
        convert_to_float8_training(
            model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=float8_eligible
        )
    return count
