"""Shared workers for the multi-process parallel tests (+ fast unit tests of the mesh arithmetic).

Everything a spawned rank runs lives here at module level so it can be pickled by reference.
The model is the real tiny WanDiT (configs/model/tiny.yaml); the latent grid 3x6x10 gives
3*3*5 = 45 tokens, which is NOT divisible by cp=2, so every CP run also exercises the padding and
the key-padding mask; attention is block-causal (chunk of 1 latent frame) with per-frame
timesteps (diffusion forcing), so the global mask and per-token modulation are checked under CP.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist

from parallel.config import ParallelConfig
from parallel.mesh import resolve_dims

B, F, H, W = 4, 3, 6, 10  # global batch, latent frames/height/width
STEPS = 3


def model_config(**overrides):
    from titan_world.config import load_config

    cfg = load_config().model
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_model(frozen: bool = False, **overrides) -> torch.nn.Module:
    """Deterministic tiny DiT; weights perturbed so no parameter is exactly zero (Wan zero-inits the
    head, which would make the first steps trivially equal)."""
    from titan_world.model import build_model

    torch.manual_seed(0)
    model = build_model(model_config(**overrides))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    if frozen:  # action-finetuning shape: frozen backbone, a few trainable pieces
        for name, p in model.named_parameters():
            p.requires_grad_(".ffn." in name or name.startswith("head."))
    return model


def make_batch(step: int, cfg) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    cout, ccond = cfg.out_dim, cfg.in_dim - cfg.out_dim
    return {
        "x0": torch.randn(B, cout, F, H, W, generator=g),
        "noise": torch.randn(B, cout, F, H, W, generator=g),
        "sigma": torch.rand(B, F, generator=g),
        "cond": torch.randn(B, ccond, F, H, W, generator=g),
        "ctx": torch.randn(B, cfg.text_len, cfg.text_dim, generator=g),
    }


def loss_on(model, batch: dict[str, torch.Tensor], dp_rank: int, dp_size: int) -> torch.Tensor:
    """Flow-matching loss on this DP rank's slice of the global batch (mean over its elements)."""
    from titan_world.model import AttnMask

    n = B // dp_size
    sl = slice(dp_rank * n, (dp_rank + 1) * n)
    x0, noise, sigma = batch["x0"][sl], batch["noise"][sl], batch["sigma"][sl]
    s = sigma[:, None, :, None, None]
    x_t = (1 - s) * x0 + s * noise
    mask = AttnMask.block_causal(F, (H // 2) * (W // 2), 1)
    v = model(x_t, sigma * 1000, batch["ctx"][sl], cond=batch["cond"][sl], attn_mask=mask)
    return torch.nn.functional.mse_loss(v.float(), (noise - x0).float())


def full_params(model) -> dict[str, torch.Tensor]:
    """Unsharded copies of every parameter (collective under FSDP: all ranks must call it)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.data
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.detach().clone()
    return out


def make_optimizer(model, kind: str) -> torch.optim.Optimizer:
    """sgd (momentum) for parity tests: parameter differences then mirror gradient differences.
    AdamW divides by sqrt(v), which turns float round-off in near-zero gradients into lr-sized
    steps, so it is used where optimizer *state* matters (checkpoint tests)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def setup(dims: dict[str, Any] | None, frozen: bool = False, optim: str = "sgd", float8: str = "none"):
    """(model, optimizer, mesh | None) for `dims` (None: plain single-process model, no FSDP)."""
    from parallel import (
        apply_activation_checkpointing,
        apply_float8,
        apply_fsdp,
        build_mesh,
        compile_blocks,
        init_distributed,
    )
    from parallel.ulysses import UlyssesContext

    model = make_model(frozen=frozen)
    apply_float8(model, float8)
    mesh = None
    if dims is not None:
        dims = dict(dims)
        compile_backend = dims.pop("compile_backend", "inductor")
        pc = ParallelConfig(**dims)
        init_distributed()
        mesh = build_mesh(pc)
        model.set_context_parallel(UlyssesContext.from_mesh(mesh, pc.cp_backend))
        apply_activation_checkpointing(model, pc)
        if pc.compile:
            compile_blocks(model, backend=compile_backend)
        apply_fsdp(model, mesh, pc)
    return model, make_optimizer(model, optim), mesh


def global_loss(loss: torch.Tensor, mesh) -> float:
    if mesh is None or mesh.dp_size == 1:
        return loss.item()
    t = loss.detach().clone()
    dist.all_reduce(t, group=mesh.dp_mesh.get_group())
    return (t / mesh.dp_size).item()


def train_step(model, opt, mesh, step: int) -> float:
    dp_rank, dp_size = (mesh.dp_rank, mesh.dp_size) if mesh is not None else (0, 1)
    loss = loss_on(model, make_batch(step, model_config()), dp_rank, dp_size)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return global_loss(loss, mesh)


def train_worker(
    dims: dict[str, Any] | None, steps: int = STEPS, frozen: bool = False, optim: str = "sgd", float8: str = "none"
) -> dict[str, Any]:
    """Run `steps` optimizer steps; losses on all ranks, full parameters from rank 0."""
    torch.manual_seed(0)
    model, opt, mesh = setup(dims, frozen, optim, float8)
    losses = [train_step(model, opt, mesh, s) for s in range(steps)]
    params = full_params(model)
    grads_none = {n for n, p in model.named_parameters() if not p.requires_grad and p.grad is None}
    rank = dist.get_rank() if dist.is_initialized() else 0
    return {"losses": losses, "params": params if rank == 0 else None, "frozen_without_grad": grads_none}


def jobs_worker(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several `train_worker` runs on one set of ranks (each builds its own mesh): saves the
    process start-up and import time that dominates these tests."""
    return [train_worker(**job) for job in jobs]


def reference(steps: int = STEPS, frozen: bool = False, optim: str = "sgd", float8: str = "none") -> dict[str, Any]:
    """Single process, plain model (no process group, no FSDP, no CP)."""
    return train_worker(None, steps, frozen, optim, float8)


# Tolerance of every parity test (fp32 on CPU, SGD+momentum, 3 steps): losses and parameters.
RTOL, ATOL = 1e-5, 1e-6


def assert_close_runs(got: dict[str, Any], ref: dict[str, Any], rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=atol)
    assert got["params"].keys() == ref["params"].keys()
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------- fast unit tests (no processes)
def test_resolve_dims_factors():
    assert resolve_dims(ParallelConfig(dp_shard=-1, cp=2), 8) == (1, 4, 2)
    assert resolve_dims(ParallelConfig(dp_replicate=2, dp_shard=-1, cp=2), 8) == (2, 2, 2)
    assert resolve_dims(ParallelConfig(dp_replicate=1, dp_shard=2, cp=2), 4) == (1, 2, 2)


@pytest.mark.parametrize(
    "cfg,world,words",
    [
        (ParallelConfig(cp=3), 4, ["parallel.cp=3", "world_size=4"]),
        (ParallelConfig(dp_shard=2, cp=2), 8, ["parallel.dp_shard=2", "parallel.cp=2", "world_size=8"]),
        (ParallelConfig(dp_replicate=0), 4, ["parallel.dp_replicate=0"]),
    ],
)
def test_resolve_dims_errors_name_keys(cfg, world, words):
    with pytest.raises(ValueError) as e:
        resolve_dims(cfg, world)
    for w in words:
        assert w in str(e.value)


def test_ac_block_selection():
    from parallel.checkpointing import checkpointed_block_ids

    assert checkpointed_block_ids(4, "none") == []
    assert checkpointed_block_ids(4, "full") == [0, 1, 2, 3]
    assert checkpointed_block_ids(5, "selective", 2) == [0, 2, 4]


# ---------------------------------------------------------------- the process harness itself
def _boom(rank_to_fail: int) -> None:
    if int(os.environ["RANK"]) == rank_to_fail:
        raise ValueError("boom from a worker")
    import time

    time.sleep(60)  # the healthy rank would wait forever on a collective


@pytest.mark.xdist_group("dist")
def test_harness_reports_worker_error_and_reaps():
    import multiprocessing as mp

    from dist_utils import run_distributed

    with pytest.raises(RuntimeError, match="boom from a worker"):
        run_distributed(_boom, 2, 1, timeout=60)
    assert mp.active_children() == []


@pytest.mark.xdist_group("dist")
def test_harness_timeout_kills_workers():
    import multiprocessing as mp

    from dist_utils import run_distributed

    with pytest.raises(RuntimeError, match="timed out"):
        run_distributed(_boom, 2, -1, timeout=4)
    assert mp.active_children() == []
