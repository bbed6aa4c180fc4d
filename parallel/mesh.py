"""DeviceMesh for (dp_replicate, dp_shard, cp) and the sub-meshes each consumer needs.

Built with `torch.distributed.device_mesh.init_device_mesh` directly rather than torchtitan's
`ParallelDims` (torchtitan 0.3.0): ParallelDims needs two monkey-patches on CPU (its module-level
`device_type` is "cuda" without a GPU, and it requests the test-only "fake" process-group backend
for size-1 dims), pulls in its own config/`spmd_types` machinery, and creates extra meshes (pp/tp/
ep/batch/loss) we do not use. Our three dims map 1:1 to its layout (dp_shard and cp flattened for
FSDP, dp_replicate×dp_shard for data loading) so switching later is mechanical.

Rank layout (row-major, cp fastest): consecutive ranks form one CP group, so on a GPU node the
all-to-all of Ulysses stays on NVLink as long as cp <= GPUs per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig

__all__ = ["ParallelMesh", "resolve_dims", "build_mesh"]


def resolve_dims(cfg: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, cp) for this world size; dp_shard=-1 takes what is left.

    Raises ValueError naming the keys and values when the world size does not factor.
    """
    r, s, c = cfg.dp_replicate, cfg.dp_shard, cfg.cp
    if r < 1 or c < 1 or (s != -1 and s < 1):
        raise ValueError(
            f"parallel.dp_replicate={r}, parallel.dp_shard={s}, parallel.cp={c}: expected dp_replicate>=1, cp>=1, "
            "dp_shard>=1 or -1"
        )
    if s == -1:
        if world_size % (r * c):
            raise ValueError(
                f"world_size={world_size} is not divisible by parallel.dp_replicate={r} x parallel.cp={c} = {r * c}; "
                "parallel.dp_shard=-1 cannot take the rest"
            )
        s = world_size // (r * c)
    if r * s * c != world_size:
        raise ValueError(
            f"parallel.dp_replicate={r} x parallel.dp_shard={s} x parallel.cp={c} = {r * s * c} "
            f"!= world_size={world_size}; "
            "set parallel.dp_shard=-1 to use the rest of the world"
        )
    return r, s, c


@dataclass
class ParallelMesh:
    """The 3-D world mesh plus named views.

    - `fsdp_mesh`: what `fully_shard` gets. 1-D flattened dp_shard×cp (CP ranks share the parameter
      shards instead of holding duplicates), or 2-D (dp_replicate, dp_shard_cp) for HSDP.
    - `cp_mesh` / `cp_group`: the Ulysses all-to-all group.
    - `dp_mesh`: dp_replicate×dp_shard flattened; data loading shards over it (the ranks of one CP
      group read the same samples).
    """

    world: DeviceMesh
    dp_replicate: int
    dp_shard: int
    cp: int
    fsdp_mesh: DeviceMesh
    dp_mesh: DeviceMesh

    @property
    def device_type(self) -> str:
        return self.world.device_type

    @property
    def cp_mesh(self) -> DeviceMesh:
        return self.world["cp"]

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.world.get_group("cp")

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def cp_rank(self) -> int:
        return self.world.get_local_rank("cp")

    @property
    def fsdp_size(self) -> int:
        return self.dp_shard * self.cp

    def __repr__(self) -> str:
        return (
            f"ParallelMesh(dp_replicate={self.dp_replicate}, dp_shard={self.dp_shard}, cp={self.cp}, "
            f"device={self.device_type})"
        )


def build_mesh(cfg: ParallelConfig, world_size: int | None = None, device_type: str | None = None) -> ParallelMesh:
    """Build the mesh on the initialised default group (see `init_distributed`)."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh: call parallel.init_distributed() first")
    world_size = world_size or dist.get_world_size()
    if world_size != dist.get_world_size():
        raise ValueError(f"build_mesh: world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    r, s, c = resolve_dims(cfg, world_size)
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    world = init_device_mesh(device_type, (r, s, c), mesh_dim_names=("dp_replicate", "dp_shard", "cp"))
    # Keep the flattened meshes ourselves: slicing flattened dims from the root is deprecated.
    shard_cp = world["dp_shard", "cp"]._flatten("dp_shard_cp")
    dp = world["dp_replicate", "dp_shard"]._flatten("dp")
    if r > 1:
        # HSDP needs a 2-D (replicate, shard) mesh; a second mesh with the same row-major rank
        # layout is portable across torch versions (vs. slicing flattened dims out of the root).
        fsdp = init_device_mesh(device_type, (r, s * c), mesh_dim_names=("dp_replicate", "dp_shard_cp"))
    else:
        fsdp = shard_cp
    return ParallelMesh(world, r, s, c, fsdp, dp)
