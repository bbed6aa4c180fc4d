"""`serving.cuda_graphs`: full-cache passes through fixed buffers give the eager stream exactly,
read nothing from the host, and keep memory flat (capture/replay itself: benchmarks/gpu_checks.py)."""

from __future__ import annotations

import pytest
import torch
from test_serving_engine import _live_tensors, keys, make_engine
from torch.utils._python_dispatch import TorchDispatchMode

from serving.graphs import GraphedBackbone

# Ops whose result the host must wait for on a GPU (a value read back, a data-dependent shape,
# linalg's error check): none may run while a chunk is being made.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "_linalg_check_errors"}
# ... nor, inside a captured pass, ops that make a tensor from host data.
HOST_OPS = SYNC_OPS | {"arange", "lift_fresh", "lift_fresh_copy"}


class HostOpGuard(TorchDispatchMode):
    def __init__(self, ops: set[str] = HOST_OPS) -> None:
        super().__init__()
        self.ops, self.seen = ops, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.ops:
            self.seen.add(name)
        return func(*args, **(kwargs or {}))


def stream(session, chunks: int, *, prompt_at: int | None = None, reset_at: int | None = None) -> list[torch.Tensor]:
    """Latents of `chunks` chunks with changing actions, a new prompt and a reset on the way."""
    out = []
    for i in range(chunks):
        if i == prompt_at:
            session.set_prompt("a snowy mountain at night")
        if i == reset_at:
            session.reset()
        out.append(session.denoise(keys("w" if i % 3 else "a")).payload.latents.clone())
    return out


@pytest.mark.parametrize(
    "opts", [{"kv_refresh": "clean"}, {"kv_refresh": "last_step"}, {"chunk_frames": 2, "window_frames": 3}]
)
def test_graphed_stream_equals_eager(opts):
    eager = make_engine(**opts).start(None, "a red house", seed=5)
    graphed_engine = make_engine(cuda_graphs=True, **opts)
    graphed = graphed_engine.start(None, "a red house", seed=5)
    a = stream(eager, 12, prompt_at=5, reset_at=8)
    b = stream(graphed, 12, prompt_at=5, reset_at=8)
    assert isinstance(graphed.graphs, GraphedBackbone) and eager.graphs is None
    # both pass kinds were captured and most passes came from them (the first ones fill the cache)
    assert set(graphed.graphs.passes) == {False, True}
    passes_per_chunk = len(graphed_engine.sigmas) + (opts.get("kv_refresh") != "last_step")
    assert graphed.graphs.replays >= 6 * passes_per_chunk
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"chunk {i}: {m}")


def test_graphed_passes_read_nothing_from_the_host(monkeypatch):
    eng = make_engine(cuda_graphs=True)
    s = eng.start(None, "p", 0)
    for _ in range(4):  # fill the cache and capture both kinds of pass
        s.step(keys("w"))
    assert set(s.graphs.passes) == {False, True}
    guard = HostOpGuard()
    backbone = eng.model.backbone

    def guarded(*args, **kwargs):
        with guard:
            return backbone(*args, **kwargs)

    monkeypatch.setattr(eng.model, "backbone", guarded)
    replays = s.graphs.replays
    s.step(keys("d"))
    assert s.graphs.replays > replays
    assert not guard.seen, f"a graphed pass would read the host: {sorted(guard.seen)}"


@pytest.mark.parametrize("opts", [{"kv_refresh": "clean"}, {"kv_refresh": "last_step", "cuda_graphs": True}])
def test_a_chunk_never_waits_for_the_device(opts):
    """A host sync mid-chunk idles the GPU while Python catches up. What moves host data in (the
    actions) goes through pinned non-blocking copies, checked on a GPU by benchmarks/gpu_checks.py."""
    s = make_engine(**opts).start(None, "p", 0)
    for _ in range(4):
        s.step(keys("w"))
    guard = HostOpGuard(SYNC_OPS)
    with guard:
        s.denoise(keys("w", "d"))
    assert not guard.seen, f"a chunk would wait for the device: {sorted(guard.seen)}"


def test_graphed_session_memory_is_flat():
    eng = make_engine(cuda_graphs=True, denoise_steps=2)
    s = eng.start(None, "p", 0)
    for _ in range(10):
        s.step(keys("w"))
    state, live = s.state_bytes(), _live_tensors()
    for i in range(60):
        s.step(keys("w") if i % 2 else keys("a"))
    assert s.state_bytes() == state and _live_tensors() == live


def test_replaced_prompt_buffers_are_recaptured():
    eng = make_engine(cuda_graphs=True)
    s = eng.start(None, "p", 0)
    for _ in range(4):
        s.step(keys("w"))
    old = s.graphs.passes[False]
    s.context = eng.encode_prompt("another prompt")  # replaced, not updated in place
    s.step(keys("w"))
    assert s.graphs.passes[False] is not old
