"""Ulysses context parallelism: the `ContextParallel` object a model's `set_context_parallel` takes.

Sequence shards in, head shards for attention, sequence shards out:
q/k/v [B, S/P, H, D] --all-to-all--> [B, S, H/P, D] --attn_fn--> --all-to-all--> [B, S/P, H, D].
Everything outside attention (norms, FFN, modulation) runs on S/P tokens with no communication.

Gradient convention ("replicated" semantics, as Open-Sora's split/gather with grad scaling):
every CP rank computes the same loss on the gathered output. `gather`'s backward keeps the rank's
own slice times P, `scatter`'s backward all-gathers the slices divided by P. Then
- the gradient of a replicated tensor entering `scatter` is the exact full gradient on every rank;
- a parameter used on the sequence shards gets P x its partial (own-token) gradient;
so the plain FSDP mean over dp_shard x cp gives the exact data-parallel gradient for every
parameter, whether it sits before the scatter (patch/time embeddings), between (blocks, head) or
after the gather. (Unscaled all-gather/split would count the pre-scatter parameters P times.)
If you use CP without FSDP over the cp dim, all-reduce gradients with a mean over the CP group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

__all__ = ["UlyssesContext", "UlyssesAttention", "all_to_all_seq_to_head", "all_to_all_head_to_seq"]

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _a2a(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Autograd-aware all-to-all along dim 0 (functional collective: traceable by torch.compile;
    its backward is the inverse all-to-all). Works on gloo and nccl."""
    out = funcol.all_to_all_single_autograd(x.contiguous(), None, None, group)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


def all_to_all_seq_to_head(x: torch.Tensor, group: dist.ProcessGroup, world: int) -> torch.Tensor:
    """[B, S/P, H, D] -> [B, S, H/P, D] (rank r gets head group r, sequence chunks in rank order)."""
    b, s, h, d = x.shape
    if h % world:
        raise ValueError(f"Ulysses: num_heads={h} is not divisible by the CP degree {world}")
    x = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4)  # [P(head group), B, s, h/P, D]
    x = _a2a(x, group)  # [P(seq chunk), B, s, h/P, D]
    return x.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)


def all_to_all_head_to_seq(x: torch.Tensor, group: dist.ProcessGroup, world: int) -> torch.Tensor:
    """[B, S, H/P, D] -> [B, S/P, H, D] (inverse of `all_to_all_seq_to_head`)."""
    b, s_full, hp, d = x.shape
    s = s_full // world
    x = x.reshape(b, world, s, hp, d).permute(1, 0, 2, 3, 4)  # [P(seq chunk), B, s, h/P, D]
    x = _a2a(x, group)  # [P(head group), B, s, h/P, D]
    return x.permute(1, 2, 0, 3, 4).reshape(b, s, world * hp, d)


class _Scatter(torch.autograd.Function):
    """Keep this rank's chunk of a replicated tensor; backward: all-gather of the chunk grads / P."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup, world: int, rank: int) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.world = dim, group, world
        if x.shape[dim] % world:
            raise ValueError(
                f"CP scatter: size {x.shape[dim]} of dim {dim} is not divisible by the CP degree {world} (pad first)"
            )
        return x.chunk(world, dim)[rank].contiguous()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _all_gather(g, ctx.dim, ctx.group, ctx.world) / ctx.world, None, None, None, None


class _Gather(torch.autograd.Function):
    """All-gather chunks along `dim`; backward: this rank's slice of the grad, times P."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup, world: int, rank: int) -> torch.Tensor:
        ctx.dim, ctx.world, ctx.rank = dim, world, rank
        return _all_gather(x, dim, group, world)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g.chunk(ctx.world, ctx.dim)[ctx.rank] * ctx.world, None, None, None, None


def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup, world: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


class UlyssesContext:
    """Implements titan_world.model.context_parallel.ContextParallel over a CP process group.

    backend="native": our functional all-to-all (autograd-correct, compile-traceable).
    backend="deepspeed": `deepspeed.sequence.layer.DistributedAttention` (needs
    `deepspeed.init_distributed` on the same default group; done lazily here).
    A size-1 group (or group=None) makes every method the identity, so models keep one code path.
    """

    def __init__(self, group: dist.ProcessGroup | None, backend: str = "native") -> None:
        if backend not in ("native", "deepspeed"):
            raise ValueError(f"parallel.cp_backend={backend!r}: expected native or deepspeed")
        self.group = group
        self.backend = backend
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self._ds_attn = None

    @classmethod
    def from_mesh(cls, mesh, backend: str = "native") -> UlyssesContext:
        """From a `parallel.mesh.ParallelMesh` (its cp sub-mesh's group)."""
        return cls(mesh.cp_group if mesh.cp > 1 else None, backend)

    def scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.size == 1:
            return x
        return _Scatter.apply(x, dim % x.dim(), self.group, self.size, self.rank)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.size == 1:
            return x
        return _Gather.apply(x, dim % x.dim(), self.group, self.size, self.rank)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_fn: AttnFn) -> torch.Tensor:
        """q/k/v [B, S/P, H, D] -> attn_fn on [B, S, H/P, D] -> [B, S/P, H, D]."""
        if self.size == 1:
            return attn_fn(q, k, v)
        if self.backend == "deepspeed":
            return self._deepspeed(q, k, v, attn_fn)
        q, k, v = (all_to_all_seq_to_head(t, self.group, self.size) for t in (q, k, v))
        return all_to_all_head_to_seq(attn_fn(q, k, v), self.group, self.size)

    def _deepspeed(self, q, k, v, attn_fn: AttnFn) -> torch.Tensor:
        if self._ds_attn is None:
            self._ds_attn = _deepspeed_attention(self.group)
        # layout [B, S, H, D]: scatter heads (2), gather sequence (1), batch dim 0
        return self._ds_attn(q, k, v, 0, None, attn_fn)

    def __repr__(self) -> str:
        return f"UlyssesContext(size={self.size}, rank={self.rank}, backend={self.backend!r})"


UlyssesAttention = UlyssesContext  # alias used in docs/brief


class _CallAttn(torch.nn.Module):
    def forward(self, q, k, v, attn_fn: AttnFn):  # DistributedAttention passes *args through
        return attn_fn(q, k, v)


def _deepspeed_attention(group: dist.ProcessGroup):
    import deepspeed  # noqa: PLC0415 (slow import: deepspeed)
    from deepspeed.sequence.layer import DistributedAttention  # noqa: PLC0415 (slow import: deepspeed)

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    return DistributedAttention(_CallAttn(), group, scatter_idx=2, gather_idx=1)
