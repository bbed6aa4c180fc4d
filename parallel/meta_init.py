"""Give a meta-built (possibly FSDP-sharded) module real storage, filled one tensor at a time.

Why: building the full model on every rank and only then sharding it costs the whole fp32 model
per rank before `fully_shard` frees it (57 GB for a 14B expert, times 8 ranks per node). Instead:
build under `torch.device("meta")`, apply AC / compile / FSDP, then `materialize`. Storage is
allocated for each rank's local shards only, and every tensor is filled from a
`read(name, shape, region)` callback that returns just the part of the full tensor this rank
holds (`region`, one slice per dim), so a reader can slice a checkpoint file or initialise one
full tensor and keep the region: peak extra memory is one tensor, not the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

__all__ = ["Region", "Reader", "local_region", "materialize"]

Region = tuple[slice, ...]
Reader = Callable[[str, torch.Size, Region], torch.Tensor]


def local_region(tensor: torch.Tensor) -> Region:
    """The part of the full tensor this rank holds: all of it for a plain tensor; for a DTensor its
    local chunk (FSDP2 shards dim 0 as torch.chunk does: the last ranks hold fewer rows, maybe none)."""
    if not isinstance(tensor, DTensor):
        return tuple(slice(0, n) for n in tensor.shape)
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def materialize(module: nn.Module, device: torch.device | str, read: Reader | None) -> None:
    """Allocate `module`'s (local) storage on `device` and fill every parameter and buffer with
    `read(name, full_shape, region)`, one tensor at a time. `read=None` leaves the storage
    uninitialised (when a checkpoint load that sets every tensor follows, e.g. on resume)."""
    module.to_empty(device=device)
    if read is None:
        return
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if local.numel() == 0:
                continue  # an empty trailing shard
            region = local_region(tensor)
            expected = tuple(r.stop - r.start for r in region)
            if tuple(local.shape) != expected:
                raise RuntimeError(
                    f"materialize: {name} holds a local shard of {tuple(local.shape)}, expected {expected} "
                    "from its placements"
                )
            local.copy_(read(name, tensor.shape, region))
