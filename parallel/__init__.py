"""Parallelism for any block-structured module: mesh, FSDP2, Ulysses CP, AC, compile, DCP.

Names are imported lazily so `import parallel.config` (done by every config load) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "init_distributed": "distributed",
    "destroy": "distributed",
    "ParallelMesh": "mesh",
    "build_mesh": "mesh",
    "resolve_dims": "mesh",
    "apply_fsdp": "fsdp",
    "materialize": "meta_init",
    "local_region": "meta_init",
    "UlyssesContext": "ulysses",
    "UlyssesAttention": "ulysses",
    "apply_activation_checkpointing": "checkpointing",
    "compile_blocks": "compile",
    "apply_float8": "float8",
    "Checkpointer": "checkpoint",
    "export_safetensors": "checkpoint",
    "plan": "planner",
    "format_plan": "planner",
    "ParallelConfig": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
