"""parallel.float8 / serving.float8: which layers run FP8 GEMMs, what that costs in accuracy, and
that checkpoints and serving are unchanged by it (training under FSDP/CP: test_parallel_parity)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_parallel_harness import make_model

from parallel.float8 import apply_float8
from titan_world.config import ConfigError, load_config


def inputs(cfg):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, cfg.out_dim, 3, 16, 16, generator=g),
        torch.tensor([500.0, 800.0]),
        torch.randn(2, cfg.text_len, cfg.text_dim, generator=g),
        torch.randn(2, cfg.in_dim - cfg.out_dim, 3, 16, 16, generator=g),
    )


def test_only_block_linears_are_swapped_and_names_are_kept():
    plain = make_model()
    fp8 = copy.deepcopy(plain)
    assert apply_float8(fp8, "tensorwise") == 10 * plain.cfg.num_layers  # q k v o (self + cross) + 2 FFN per block
    kinds = {name: type(m).__name__ for name, m in fp8.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, k in kinds.items() if k == "Float8Linear"} == {
        n for n in kinds if n.startswith("blocks.") and ".action_proj." not in n
    }
    assert kinds["head.head"] == kinds["text_embedding.0"] == kinds["blocks.0.action_proj.proj"] == "Linear"
    ref_sd, sd = plain.state_dict(), fp8.state_dict()
    assert list(sd) == list(ref_sd)
    for name, t in ref_sd.items():
        assert sd[name].shape == t.shape and sd[name].dtype == t.dtype and torch.equal(sd[name], t), name
    assert apply_float8(copy.deepcopy(plain), "none") == 0


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_forward_and_backward_stay_close_to_fp32(recipe):
    plain = make_model()
    fp8 = copy.deepcopy(plain)
    apply_float8(fp8, recipe)
    x, t, ctx, cond = inputs(plain.cfg)
    outs, grads = [], []
    for model in (plain, fp8):
        y = model(x, t, ctx, cond=cond)
        y.pow(2).mean().backward()
        outs.append(y.detach())
        grads.append(model.blocks[0].ffn[0].weight.grad.clone())
    out_err = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    grad_err = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    # FP8 (e4m3: 3 mantissa bits) really ran, and its error stays at the percent level
    assert 1e-4 < out_err < 3e-2, out_err
    assert 1e-4 < grad_err < 0.15, grad_err


def test_bad_recipe_names_the_key():
    with pytest.raises(ConfigError, match="parallel.float8='fp4'"):
        load_config(None, ["parallel.float8=fp4"])
    with pytest.raises(ConfigError, match="serving.float8='e5m2'"):
        load_config(None, ["serving.float8=e5m2"])
    with pytest.raises(ValueError, match="serving.float8='x'"):
        apply_float8(make_model(), "x", key="serving.float8")


def test_served_with_fp8_gemms(tmp_path):
    from serving.loading import build_engine
    from titan_world.model import save_pretrained

    save_pretrained(make_model(), tmp_path / "student")  # every weight non-zero: the stream is not trivial
    overrides = [f"serving.checkpoint={tmp_path / 'student'}", "serving.height=32", "serving.width=32"]
    streams = []
    for recipe in ("none", "rowwise"):
        engine = build_engine(load_config(None, [*overrides, f"serving.float8={recipe}"]))
        assert (type(engine.model.blocks[0].ffn[0]).__name__ == "Float8Linear") == (recipe != "none")
        session = engine.start(None, "a red house", seed=0)
        streams.append(np.concatenate([session.step(torch.zeros(4, 8)) for _ in range(3)]).astype(np.float32))
    diff = np.abs(streams[0] - streams[1]).mean()
    assert 0 < diff < 2.0, diff  # uint8 levels: the same picture, FP8 rounding apart
