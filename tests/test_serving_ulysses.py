"""Multi-GPU serving logic on 2 CPU ranks (gloo): Ulysses over heads gives the one-device stream.

Rank 0 drives a `RankedEngine` session (start, steps with changing actions, a prompt change,
reset); rank 1 replays the command stream in `worker_loop`. Latents must match a single-process
engine with the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.config import ServingConfig
from serving.streaming import StreamingEngine

TINY = ["model.dim=16", "model.ffn_dim=32", "model.num_heads=2", "model.num_layers=2", "model.action.enabled=true"]
pytestmark = pytest.mark.slow


def _engine(cp=None) -> StreamingEngine:
    from titan_world.config import load_config
    from titan_world.model import build_model
    from titan_world.model.codec import TinyCodec
    from titan_world.model.text_encoder import TinyTextEncoder

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.head.weight, std=0.2)
        for block in model.blocks:
            torch.nn.init.normal_(block.action_proj.proj.weight, std=0.2)
    if cp is not None:
        model.set_context_parallel(cp)
    sc = ServingConfig(height=16, width=16, fps=16.0, sink_frames=1, window_frames=2, chunk_frames=2)
    return StreamingEngine(
        model, TinyCodec(4, cfg.data.codec.channels), TinyTextEncoder(cfg.model.text_dim, cfg.model.text_len), sc, cp=cp
    )


def _actions(i: int) -> torch.Tensor:
    a = torch.zeros(8, 8)
    a[:, i % 4] = 1  # w, a, s, d in turn
    a[:, 6] = 0.3 * (i % 3 - 1)
    return a


def _script(session) -> list[np.ndarray]:
    out = []
    for i in range(4):
        out.append(session.denoise(_actions(i)).payload.latents.numpy().copy())
    session.set_prompt("a snowy mountain at night")
    for i in range(4, 6):
        out.append(session.denoise(_actions(i)).payload.latents.numpy().copy())
    session.reset()
    out.append(session.denoise(_actions(0)).payload.latents.numpy().copy())
    return out


def _rank_main():
    import torch.distributed as dist

    from parallel.distributed import init_distributed
    from parallel.ulysses import UlyssesContext
    from serving.distributed import RankedEngine, worker_loop

    rank, _, _ = init_distributed()
    control = dist.new_group(backend="gloo")
    engine = _engine(UlyssesContext(dist.group.WORLD))
    if rank != 0:
        worker_loop(engine, control)
        return None
    ranked = RankedEngine(engine, control)
    session = ranked.start(None, "a red house", 5)
    out = _script(session)
    frames = session.decode(session.denoise(_actions(1)))
    session.close()
    ranked.shutdown()
    return out, frames


def test_two_ranks_match_one_device():
    from dist_utils import run_distributed

    results = run_distributed(_rank_main, 2, timeout=120)
    ranked, frames = results[0]
    assert results[1] is None
    ref = _script(_engine().start(None, "a red house", 5))
    assert len(ranked) == len(ref)
    for i, (a, b) in enumerate(zip(ranked, ref)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=f"chunk {i}")
    assert frames.shape == (8, 16, 16, 3)
