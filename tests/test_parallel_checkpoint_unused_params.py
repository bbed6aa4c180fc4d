"""A checkpoint taken while some trainable parameters never had a gradient still loads."""

from __future__ import annotations

import torch

from parallel.checkpoint import Checkpointer
from titan_world.model import WanDiT
from titan_world.model.config import ActionConfig, ModelConfig


def _model() -> WanDiT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="t",
        model_type="t2v",
        dim=32,
        ffn_dim=64,
        num_heads=2,
        num_layers=1,
        in_dim=8,
        out_dim=8,
        text_dim=16,
        text_len=8,
        action=ActionConfig(enabled=True, spatial_stride=1),
    )
    return WanDiT(cfg)


def _step(model, opt) -> float:
    x, ctx = torch.randn(1, 8, 1, 4, 4), torch.randn(1, 8, 16)
    loss = model(x, torch.tensor([500.0]), ctx).square().mean()  # no actions: the adapter gets no grad
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def test_resume_with_parameters_that_never_had_gradients(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt)
    assert any(p not in opt.state for p in model.action_parameters())
    ckpt = Checkpointer(tmp_path, keep_last=2)
    ckpt.save(1, {"model": model, "optimizer": opt})
    torch.manual_seed(1)
    expected = _step(model, opt)

    fresh = _model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert Checkpointer(tmp_path, keep_last=2).load_latest({"model": fresh, "optimizer": fresh_opt}) == 1
    torch.manual_seed(1)
    assert _step(fresh, fresh_opt) == expected
