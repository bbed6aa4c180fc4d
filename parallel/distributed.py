"""Process-group setup that works the same under torchrun, SLURM-launched torchrun and plain `python`.

Why a helper: trainers call one function and get (rank, world_size, device) without caring whether
they run on CPU/gloo in CI or CUDA/NCCL on a cluster; a plain `python train.py` (no torchrun env)
still gets a real size-1 process group so DeviceMesh/FSDP/DCP code paths are identical.
"""

from __future__ import annotations

import datetime as _dt
import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "destroy", "default_device_type", "is_main"]


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed once; return (rank, world_size, device).

    backend: None picks nccl on CUDA and gloo on CPU. Reads RANK/WORLD_SIZE/LOCAL_RANK (torchrun);
    without them (single process) a HashStore-backed size-1 group is made (no ports opened).
    Calling it again returns the existing state.
    """
    device_type = default_device_type()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    timeout = _dt.timedelta(seconds=timeout_s)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def destroy() -> None:
    """Tear the default group down (safe to call twice or without init)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer already gone: still release our resources
            pass
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
