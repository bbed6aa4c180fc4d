"""FSDP's GPU mixed-precision policy (bf16 compute, fp32 storage), run on a CPU rank.

The sharded model must compute what the same model with bf16 weights computes by itself: the
model casts what each layer reads and keeps timesteps, AdaLN modulation, RoPE and camera poses in
fp32 by design, so FSDP must not cast its forward inputs. (Casting them rounded t = 937.3 to 936
before the timestep embedding and handed bf16 poses to `torch.linalg.inv`, which refuses them.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from dist_utils import run_distributed

pytestmark = pytest.mark.xdist_group(name="dist")


def _inputs(cfg):
    from titan_world.model.action import ActionInputs

    g = torch.Generator().manual_seed(3)
    b, f, h, w = 2, 3, 8, 8
    c2w = torch.eye(4).repeat(b, f, 1, 1)
    c2w[..., 0, 3] = torch.linspace(0.0, 0.4, f)  # the camera moves along x
    return dict(
        x=torch.randn(b, cfg.out_dim, f, h, w, generator=g),
        t=torch.tensor([[937.3, 512.7, 3.2], [999.1, 250.4, 61.9]]),
        context=torch.randn(b, cfg.text_len, cfg.text_dim, generator=g),
        cond=torch.randn(b, cfg.in_dim - cfg.out_dim, f, h, w, generator=g) if cfg.in_dim > cfg.out_dim else None,
        actions=ActionInputs(
            torch.rand(b, f, cfg.action.num_keys, generator=g),
            c2w,
            torch.tensor([32.0, 32.0, 32.0, 32.0]).repeat(b, f, 1),
        ),
    )


def _worker() -> tuple[torch.Tensor, torch.Tensor]:
    from parallel import apply_fsdp, build_mesh, init_distributed
    from parallel.config import ParallelConfig
    from parallel.fsdp import mixed_precision_policy
    from titan_world.config import load_config
    from titan_world.model import build_model

    init_distributed()
    cfg = load_config(None, ["model.action.enabled=true"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # no exactly-zero tensors (Wan zero-inits the head and the adapter's AdaLN)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    pc = ParallelConfig()
    apply_fsdp(model, build_mesh(pc), pc, mp_policy=mixed_precision_policy(pc, "cuda"))
    inp = _inputs(cfg)
    with torch.no_grad():
        ref = bf16(inp["x"], inp["t"], inp["context"], cond=inp["cond"], actions=inp["actions"]).float()
        got = model(inp["x"], inp["t"], inp["context"], cond=inp["cond"], actions=inp["actions"]).float()
    return ref, got


def test_gpu_policy_computes_like_a_bf16_model():
    ref, got = run_distributed(_worker, 1, timeout=120)[0]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 2e-2 * scale, "FSDP bf16 compute diverged from the bf16-weight model"
