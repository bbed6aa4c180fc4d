"""A preallocated self-attention KV cache with an attention sink and a rolling local window.

Memory is fixed at construction: per layer [B, (C + S + W) * tokens_per_frame, H, D] for a
current-chunk slot of C frames, S sink frames and a ring of W window frames. Layout
`[chunk | sink | window ring]` keeps the keys a chunk attends to contiguous (a view, no copy):
the current chunk of n <= C frames is written at the end of the chunk slot, right before the
sink, so the visible region is `[C - n, C + stored)`. Keys are stored with RoPE already applied
at absolute frame positions, so their order in memory does not matter for attention; with
`horizon_frames`, the sink is read rotated to a bounded distance past that horizon (long sessions,
docs/serving.md).

Equivalent mask (tested): `AttnMask.block_causal(..., sink_frames=S, window_frames=W)` — a chunk
sees its own frames, the first S frames, and the W frames before it.

Every read and write is a fixed view or an `index_copy_` with a device index tensor, never a
Python slice that moves from chunk to chunk: once the cache is full (`is_full`), a pass does the
same work at the same addresses every time, which is what a CUDA graph replays
(`serving/graphs.py`). Nothing here waits for the device.
"""

from __future__ import annotations

import torch

from titan_world.model.rope import apply_rope, rope_angles


def horizon_shift(chunk_end: int, horizon_frames: int | None) -> int:
    """How far a chunk ending at latent frame `chunk_end` lies beyond the trained horizon (0 within it).

    The one rule for long sessions (docs/serving.md "Long sessions"): the attention sink is rotated
    `shift` frames forward and action poses are taken relative to latent frame `shift`, so every
    chunk past the horizon sees the sink distance and pose range of the last trained chunk."""
    return 0 if horizon_frames is None else max(0, chunk_end - horizon_frames)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        *,
        sink_frames: int = 1,
        window_frames: int = 8,
        chunk_frames: int = 3,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        horizon_frames: int | None = None,
        rope_theta: float = 10000.0,
    ):
        if window_frames < 1:
            raise ValueError(f"window_frames={window_frames}: expected >= 1")
        if window_frames < chunk_frames:  # two frames of one chunk would share a ring slot (racy index_copy_)
            raise ValueError(
                f"KV cache window_frames={window_frames} < chunk_frames={chunk_frames}: the local "
                "window must hold at least one chunk (serving./posttrain.window_frames >= chunk_frames)"
            )
        self.tpf, self.sink, self.window, self.chunk = tokens_per_frame, sink_frames, window_frames, chunk_frames
        shape = self.buffer_shape(
            num_layers, batch, heads, head_dim, tokens_per_frame, sink_frames, window_frames, chunk_frames
        )
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.committed_frames = 0  # frames ever written (the window keeps the last W of them)
        self._write_index = torch.zeros(chunk_frames * tokens_per_frame, dtype=torch.long, device=device)
        self._write_index_for: tuple[int, int] | None = None  # (committed_frames, frames) it holds
        # Long sessions: keys carry RoPE at absolute frames, so the sink (frames 0..S-1) drifts away
        # from the query. With `horizon_frames`, the sink's keys as written are kept in `_sink_base`
        # and every pass reads them rotated `horizon_shift` frames forward (a rotation on the
        # temporal RoPE pairs, exact identity at shift 0): past the horizon the query-to-sink
        # distance stays that of the last trained chunk. The window's distances are bounded anyway.
        self.horizon, self.rope_theta = horizon_frames, rope_theta
        self._sink_base = None
        if horizon_frames is not None and sink_frames > 0:
            self._sink_base = torch.zeros(
                num_layers, batch, sink_frames * tokens_per_frame, heads, head_dim, dtype=dtype, device=device
            )
            self._shift_cos = torch.ones(1, head_dim // 2, device=device)
            self._shift_sin = torch.zeros(1, head_dim // 2, device=device)
        self._shift_for = 0

    @staticmethod
    def buffer_shape(
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        sink_frames: int,
        window_frames: int,
        chunk_frames: int,
    ) -> tuple[int, int, int, int, int]:
        """Shape of each of the K and V buffers: every layer, `[chunk | sink | window ring]` frames
        of tokens (memory planners size the cache with this, without allocating it)."""
        return (num_layers, batch, (chunk_frames + sink_frames + window_frames) * tokens_per_frame, heads, head_dim)

    def reset(self) -> None:
        self.committed_frames = 0

    @property
    def stored_frames(self) -> int:
        return min(self.committed_frames, self.sink + self.window)

    @property
    def is_full(self) -> bool:
        """Sink and window are full: from here on every chunk's pass has the same shapes."""
        return self.committed_frames >= self.sink + self.window

    def nbytes(self) -> int:
        sink = self._sink_base.numel() * self._sink_base.element_size() if self._sink_base is not None else 0
        return self.k.numel() * self.k.element_size() * 2 + sink

    def attend_region(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the current chunk's k/v [B, n*tpf, H, D] into the chunk slot; return the visible keys."""
        n_tok = k.shape[1]
        if n_tok % self.tpf or n_tok > self.chunk * self.tpf:
            raise ValueError(
                f"chunk of {n_tok} tokens: expected a multiple of {self.tpf} and at most {self.chunk} frames"
            )
        c_tok = self.chunk * self.tpf
        start = c_tok - n_tok
        if self._sink_base is not None and self.committed_frames >= self.sink:
            self.prepare(n_tok // self.tpf)
            sink = slice(c_tok, c_tok + self.sink * self.tpf)
            self.k[layer, :, sink] = apply_rope(self._sink_base[layer], self._shift_cos, self._shift_sin)
        self.k[layer, :, start:c_tok] = k
        self.v[layer, :, start:c_tok] = v
        end = c_tok + self.stored_frames * self.tpf
        return self.k[layer, :, start:end], self.v[layer, :, start:end]

    def commit(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the chunk's k/v into the sink/window slots (after it attended). Call `advance` once after."""
        index = self.write_index(k.shape[1] // self.tpf)
        self.k[layer].index_copy_(1, index, k.to(self.k.dtype))
        self.v[layer].index_copy_(1, index, v.to(self.v.dtype))
        if self._sink_base is not None and self.committed_frames < self.sink:  # the sink is being written
            lo = self.chunk * self.tpf
            self._sink_base[layer].copy_(self.k[layer, :, lo : lo + self.sink * self.tpf])

    def prepare(self, frames: int) -> None:
        """Device buffers the next pass of a `frames`-frame chunk reads (its write slots and the
        sink's rotation), from host integers only; a graph replay calls this before replaying."""
        self.write_index(frames)
        if self._sink_base is None:
            return
        shift = horizon_shift(self.committed_frames + frames, self.horizon)
        if shift != self._shift_for:
            cos, sin = rope_angles(
                (1, 1, 1), self.k.shape[-1], frame_offset=shift, theta=self.rope_theta, device=self._shift_cos.device
            )
            self._shift_cos.copy_(cos)
            self._shift_sin.copy_(sin)
            self._shift_for = shift

    def write_index(self, frames: int) -> torch.Tensor:
        """Token slots the next `frames` committed frames go to, as a device tensor.

        Computed on the device once per chunk (the first layer's commit) into one preallocated
        buffer, from host integers only: no host sync mid-pass. A graph replay calls this before
        replaying, so the captured `index_copy_` reads the new slots from the same address.
        """
        if frames > self.chunk:
            raise ValueError(f"committing {frames} frames: the cache was built for chunks of at most {self.chunk}")
        key = (self.committed_frames, frames)
        if self._write_index_for != key:
            dev = self._write_index.device
            frame = torch.arange(self.committed_frames, self.committed_frames + frames, device=dev)
            slot = torch.where(frame < self.sink, frame, self.sink + (frame - self.sink) % self.window)
            tokens = (self.chunk + slot)[:, None] * self.tpf + torch.arange(self.tpf, device=dev)
            self._write_index[: frames * self.tpf].copy_(tokens.flatten())
            self._write_index_for = key
        return self._write_index[: frames * self.tpf]

    def advance(self, frames: int) -> None:
        self.committed_frames += frames
