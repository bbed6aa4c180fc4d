"""Parallelism section: the device mesh and how blocks are wrapped."""

from __future__ import annotations

from dataclasses import dataclass

FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")  # parallel.float8 / serving.float8 (parallel/float8.py)


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever is left of the world size
    cp: int = 1  # Ulysses context parallel degree; model.num_heads must divide by it
    cp_backend: str = "native"  # native (functional collectives) | deepspeed (DistributedAttention)
    reshard_after_forward: bool = True
    param_dtype: str = "bfloat16"  # on GPU; CPU runs in float32
    reduce_dtype: str = "float32"
    activation_checkpoint: str = (
        "none"  # none | full | selective (every ac_every-th block) | attention (keep attention outputs)
    )
    ac_every: int = 2  # selective: checkpoint every n-th block
    ac_skip_last: int = (
        0  # leave the last N blocks un-checkpointed: spare memory spent on speed (`inspect --plan` says how many fit)
    )
    compile: bool = False
    float8: str = "none"  # one of FLOAT8_RECIPES: FP8 GEMMs in the blocks' linears (torchao)
