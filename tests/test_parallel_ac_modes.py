"""Every activation-checkpointing mode gives the gradients of no checkpointing (single process)."""

from __future__ import annotations

import pytest
import torch

from parallel.checkpointing import apply_activation_checkpointing
from parallel.config import ParallelConfig
from titan_world.model import WanDiT
from titan_world.model.config import ModelConfig


@pytest.mark.parametrize(
    "mode,skip,expected",
    [
        ("full", 0, [0, 1, 2]),
        ("selective", 0, [0, 2]),
        ("attention", 0, [0, 1, 2]),
        ("attention", 1, [0, 1]),
        ("selective", 1, [0]),
    ],
)
def test_ac_mode_matches_no_checkpointing(mode, skip, expected):
    cfg = ModelConfig(
        name="t",
        model_type="t2v",
        dim=48,
        ffn_dim=96,
        num_heads=4,
        num_layers=3,
        in_dim=8,
        out_dim=8,
        text_dim=16,
        text_len=8,
    )
    torch.manual_seed(0)
    ref = WanDiT(cfg)
    for p in ref.parameters():
        p.data.normal_(0, 0.1)
    ac = WanDiT(cfg)
    ac.load_state_dict(ref.state_dict())
    ids = apply_activation_checkpointing(ac, ParallelConfig(activation_checkpoint=mode, ac_every=2, ac_skip_last=skip))
    assert ids == expected  # parallel.ac_skip_last leaves the last blocks un-checkpointed
    x, ctx, t = torch.randn(1, 8, 3, 8, 8), torch.randn(1, 8, 16), torch.tensor([500.0])
    for m in (ref, ac):
        m(x, t, ctx).square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), ac.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
