"""CUDA graphs for steady-state streaming passes (`serving.cuda_graphs=true`).

Once a session's KV cache is full, every pass has the same shapes and reads and writes the same
buffers: the visible keys are a fixed view and the commit is an `index_copy_` with an index held
in a fixed buffer (titan_world/model/kv_cache.py). A pass is then `WanDiT.embed` run eagerly (a
few small kernels, and everything that needs the host: the RoPE angles of the frame offset, the
action embedding's matrix inverse) followed by `WanDiT.backbone` replayed from a graph. Replay
removes the per-kernel launch cost that bounds a 4,680-token pass: about 60 launches per block,
1,800 per pass for 30 blocks, each of which the GPU finishes faster than Python issues it.

Two graphs per session at most (passes that write the cache and passes that do not), captured
on the first steady-state pass of each kind: that pass runs eagerly as the warm-up (its result
is the real one), then the capture records it without running it. The graphs read the session's
prompt K/V tensors in place, so the session must update them in place (`copy_`) on a new prompt.

On CPU the same object runs `backbone` on the same fixed buffers without capturing, so what is
copied in and what is read from where is tested on every machine; capture and replay themselves
are checked on a GPU by `benchmarks/gpu_checks.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from titan_world.model.dit import Tokens, WanDiT
from titan_world.model.kv_cache import KVCache

log = logging.getLogger("titan_world.serving")


@dataclass
class _Pass:
    static: Tokens  # the buffers the graph reads; each call copies its tokens in
    out: torch.Tensor  # the buffer the graph writes
    graph: torch.cuda.CUDAGraph | None  # None on CPU: run backbone on `static`


def _tensors(tokens: Tokens) -> list[torch.Tensor | None]:
    """The per-pass inputs of the backbone (the prompt K/V are per session, read in place)."""
    return [tokens.x, tokens.e0, tokens.e, *tokens.rope, tokens.action]


class GraphedBackbone:
    """`graphs(tokens, write)` == `model.backbone(tokens, cache, write)` for full-cache passes."""

    def __init__(self, model: WanDiT, cache: KVCache):
        if model.cp is not None:
            raise ValueError(
                "serving.cuda_graphs with --gpus > 1 is not supported yet (graphs over NCCL all-to-all are untested)"
            )
        self.model, self.cache = model, cache
        self.device = cache.k.device
        self.passes: dict[bool, _Pass] = {}
        self.replays = 0  # passes served from a graph (or, on CPU, from the fixed buffers)
        self.failed: str | None = None  # why capture failed; the session then runs eagerly

    def ready(self, tokens: Tokens) -> bool:
        """True when this pass has the steady-state shapes the graphs are captured for."""
        return (
            self.failed is None and self.cache.is_full and tokens.grid[0] == self.cache.chunk and tokens.context is None
        )

    def __call__(self, tokens: Tokens, write: bool) -> torch.Tensor:
        p = self.passes.get(write)
        if p is not None and not self._same_prompt_buffers(p.static, tokens):
            log.warning(
                "serving graphs: the prompt K/V buffers were replaced (expected an in-place update); recapturing"
            )
            self.passes.clear()
            p = None
        if p is None:
            return self._capture(tokens, write)
        for dst, src in zip(_tensors(p.static), _tensors(tokens)):
            if dst is not None:
                dst.copy_(src)
        self.cache.prepare(tokens.grid[0])  # this chunk's slots and sink rotation, into the buffers the graph reads
        if p.graph is not None:
            p.graph.replay()
        else:
            p.out = self.model.backbone(p.static, self.cache, write)
        self.replays += 1
        return p.out.clone()  # the next replay overwrites p.out

    def state_bytes(self) -> int:
        """Bytes of the fixed input/output buffers (the graphs' private memory pools not included)."""
        ts = [t for p in self.passes.values() for t in [*_tensors(p.static), p.out] if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def close(self) -> None:
        self.passes.clear()

    # ---- internals -----------------------------------------------------------------------------
    @staticmethod
    def _same_prompt_buffers(static: Tokens, tokens: Tokens) -> bool:
        return all(
            a[0].data_ptr() == b[0].data_ptr() and a[1].data_ptr() == b[1].data_ptr()
            for a, b in zip(static.context_kv, tokens.context_kv)
        )

    def _capture(self, tokens: Tokens, write: bool) -> torch.Tensor:
        """Run this pass eagerly on the fixed buffers (the warm-up, and the real result), then
        record it. Capture failure is logged once and leaves the session eager."""
        x, e0, e, cos, sin, action = (t.clone() if t is not None else None for t in _tensors(tokens))
        static = replace(tokens, x=x, e0=e0, e=e, rope=(cos, sin), action=action)
        self.cache.prepare(tokens.grid[0])
        if self.device.type != "cuda":
            out = self.model.backbone(static, self.cache, write)
            self.passes[write] = _Pass(static, out, None)
            return out.clone()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
            result = self.model.backbone(static, self.cache, write).clone()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the decode thread keeps copying frames to the host during capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.model.backbone(static, self.cache, write)
        except Exception as err:  # noqa: BLE001 - any capture failure: keep serving, eagerly
            self.failed = f"{type(err).__name__}: {err}"
            log.warning("serving.cuda_graphs: capture failed (%s); this session runs without graphs", self.failed)
            self.passes.clear()
            return result
        self.passes[write] = _Pass(static, out, graph)
        log.info("serving graphs: captured the %s pass", "cache-writing" if write else "denoising")
        return result
