"""Self-rollout through the rolling KV cache (LingBot §3.4.2, Self-Forcing).

The student generates chunk after chunk from its own outputs, exactly as the streaming engine
serves it: per chunk, fresh noise, a few denoising steps at the student's sigmas (x0 estimate,
then re-noise to the next sigma), stopping at a random *exit step*; then one pass at t = 0 on the
clean output writes the chunk's K/V into the cache (sink + rolling window), so later chunks
attend to clean frames. A rollout may be longer than the training clips: memory is the cache's.

Gradient truncation: only the exit-step pass of the last K chunks is recorded by autograd; every
other pass (earlier steps, earlier chunks, the t = 0 cache writes) runs under no_grad, so the
cache holds constants and gradients never reach earlier chunks. A recorded pass reads the cache
through `RecordedPassCache`, which concatenates instead of writing the chunk's K/V into the
buffer: the buffer is rewritten in place by later passes, and autograd must not depend on it (a
checkpointed student, whose recorded passes recompute in backward, reads a snapshot instead).

`self_rollout_uncached` is the same computation without a cache (each pass re-runs every earlier
frame at t = 0 under the block-causal mask); the tests check that both agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from titan_world.conditioning import i2v_condition
from titan_world.model.action import ActionInputs, WarpSource
from titan_world.model.kv_cache import KVCache, horizon_shift
from titan_world.model.rope import apply_rope
from titan_world.posttrain.causal import ChunkLayout


def student_sigmas(denoise_steps: list[int]) -> list[float]:
    """posttrain.denoise_steps (timesteps in 0..1000, decreasing) -> sigmas."""
    return [t / 1000.0 for t in denoise_steps]


class RecordedPassCache(KVCache):
    """Read-only view of a cache for a pass autograd records: keys = cat[chunk, stored frames],
    the same order (so the same numbers) as `KVCache.attend_region`, without in-place writes.

    `snapshot`: copy the stored frames of every layer now. A checkpointed (recomputed) pass reads
    its keys again in backward, after later chunks' t = 0 passes have overwritten the ring; the
    copy lives as long as the pass's graph (the checkpoint keeps this object), so the recompute
    reads what the forward read. Without recomputation the view suffices: autograd saves the
    concatenation, a copy of the same size."""

    def __init__(self, base: KVCache, snapshot: bool = False):  # noqa: D107 - shares the base's buffers
        self.__dict__.update(base.__dict__)
        lo = self.chunk * self.tpf
        hi = lo + self.stored_frames * self.tpf
        self.stored_k, self.stored_v = self.k[:, :, lo:hi], self.v[:, :, lo:hi]
        if snapshot:
            self.stored_k, self.stored_v = self.stored_k.clone(), self.stored_v.clone()

    def attend_region(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stored_k = self.stored_k[layer]
        if self._sink_base is not None and self.committed_frames >= self.sink:  # the sink as `KVCache` reads it
            self.prepare(k.shape[1] // self.tpf)
            sink = apply_rope(self._sink_base[layer], self._shift_cos, self._shift_sin)
            stored_k = torch.cat([sink, stored_k[:, sink.shape[1] :]], 1)
        return torch.cat([k, stored_k], 1), torch.cat([v, self.stored_v[layer]], 1)

    def commit(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        raise RuntimeError("a recorded (gradient) pass never writes the cache; the t = 0 pass does")


def denoise_chunk(
    predict: Callable[[torch.Tensor, float, bool], torch.Tensor],
    x: torch.Tensor,
    sigmas: list[float],
    draw_noise: Callable[[], torch.Tensor],
    sampler: str = "renoise",
) -> torch.Tensor:
    """The student's few-step sampling of one chunk, shared by self-rollout and the streaming engine
    (serving/streaming.py), so training and serving are one computation (tests/test_serving_fidelity.py).

    From noise `x` at sigmas[0], one pass per sigma: `predict(x, sigma, final)` -> velocity (fp32);
    x0 = x - sigma * v; between passes either re-noise the x0 estimate to the next sigma with
    `draw_noise()` (Self-Forcing; what post-training trains) or take an Euler step. The last sigma's
    x0 is returned (a rollout's exit step: pass `sigmas[: exit + 1]`)."""
    for i, sigma in enumerate(sigmas):
        final = i == len(sigmas) - 1
        v = predict(x, sigma, final)
        x0 = x - sigma * v
        if final:
            return x0
        nxt = sigmas[i + 1]
        x = (1 - nxt) * x0 + nxt * draw_noise() if sampler == "renoise" else x + (nxt - sigma) * v
    raise ValueError("denoise_chunk: no sigmas")


def sample_exit_steps(num_chunks: int, num_steps: int, generator: torch.Generator) -> list[int]:
    """One exit step per chunk, uniform in [0, num_steps). Draw it from a generator seeded the
    same on every rank (by the step number) so all ranks run the same number of passes."""
    return torch.randint(num_steps, (num_chunks,), generator=generator).tolist()


@dataclass
class RolloutInputs:
    """What a rollout is conditioned on. `given`: [B, C, P, h, w] clean latents (the start
    image); `actions`: per latent frame for the whole rollout (or None)."""

    given: torch.Tensor
    context: object  # [B, Lt, Dt] tensor or PreparedContext
    actions: ActionInputs | None
    layout: ChunkLayout
    with_i2v_channels: bool = True

    def cond(self) -> torch.Tensor | None:
        if not self.with_i2v_channels:
            return None
        b, c, p, h, w = self.given.shape
        lat = torch.zeros(b, c, self.layout.num_frames, h, w, device=self.given.device, dtype=self.given.dtype)
        lat[:, :, :p] = self.given
        mask = torch.zeros(b, self.layout.num_frames, dtype=torch.bool, device=self.given.device)
        mask[:, :p] = True
        return i2v_condition(lat, mask)


@dataclass
class Rollout:
    latents: torch.Tensor  # [B, C, F, h, w]: given frames then generated chunks
    grad_start: int  # first latent frame whose values carry gradient (F when none)
    exit_steps: list[int] = field(default_factory=list)
    chunks: list[torch.Tensor] = field(default_factory=list)  # each generated chunk's output


def _call(model, inp: RolloutInputs, cond, x, sigma, s, e, horizon=None, **kw):
    t = torch.full((x.shape[0],), sigma * 1000.0, device=x.device)
    acts = inp.actions.slice(s, e) if inp.actions is not None else None
    ref = inp.actions.c2w[:, horizon_shift(e, horizon)] if inp.actions is not None else None  # re-anchored poses
    c = cond[:, :, s:e] if cond is not None else None
    return model(x, t, inp.context, cond=c, actions=acts, action_reference=ref, frame_offset=s, **kw).float()


def self_rollout(
    model: torch.nn.Module,
    inp: RolloutInputs,
    sigmas: list[float],
    generator: torch.Generator,
    *,
    exit_steps: list[int] | None = None,
    grad_chunks: int = 0,
    sink_frames: int = 1,
    window_frames: int = 8,
    cache_dtype: torch.dtype | None = None,
    snapshot_recorded: bool = False,
    horizon_frames: int | None = None,
) -> Rollout:
    """Generate every chunk of `inp.layout` with the KV cache; grads only in the last `grad_chunks`.

    `cache_dtype`: the dtype the model computes K/V in; default its parameters' dtype. An FSDP
    student stores fp32 shards but may compute in bf16 (`Sharding.compute_dtype`).
    `snapshot_recorded`: the recorded passes read copies of the cache (`RecordedPassCache`); needed
    when the student's blocks are checkpointed and so recompute those passes in backward.
    `horizon_frames`: the trained horizon past which the sink and the pose reference are held
    (`horizon_shift`; None: never), as the streaming engine does in long sessions."""
    lay, cfg = inp.layout, model.cfg
    chunks = lay.chunks()
    exits = exit_steps if exit_steps is not None else [len(sigmas) - 1] * len(chunks)
    b, c, p, h, w = inp.given.shape
    tpf = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    heads = cfg.num_heads // (model.cp.size if model.cp is not None else 1)  # Ulysses: this rank's heads, every token
    cache = KVCache(
        cfg.num_layers,
        b,
        heads,
        cfg.head_dim,
        tpf,
        sink_frames=sink_frames,
        window_frames=window_frames,
        chunk_frames=max(lay.chunk_frames, lay.prefix),
        dtype=cache_dtype or next(model.parameters()).dtype,
        device=inp.given.device,
        horizon_frames=horizon_frames,
        rope_theta=cfg.rope_theta,
    )
    cond = inp.cond()
    out = [inp.given]
    first_grad = len(chunks) - grad_chunks if torch.is_grad_enabled() else len(chunks)
    with torch.no_grad():
        _call(model, inp, cond, inp.given, 0.0, 0, p, horizon_frames, kv_cache=cache, cache_write=True)
    for j, (s, e) in enumerate(chunks):
        record = j >= first_grad
        ws = _given_frame(inp, e - s)

        def predict(x, sigma, final, s=s, e=e, record=record, ws=ws):
            if final and record:
                recorded = RecordedPassCache(cache, snapshot_recorded)
                return _call(model, inp, cond, x, sigma, s, e, horizon_frames, kv_cache=recorded, warp_source=ws)
            with torch.no_grad():
                return _call(model, inp, cond, x, sigma, s, e, horizon_frames, kv_cache=cache, warp_source=ws)

        x = torch.randn(b, c, e - s, h, w, generator=generator, device=inp.given.device)
        x0 = denoise_chunk(
            predict,
            x,
            sigmas[: exits[j] + 1],
            lambda shape=x.shape: torch.randn(shape, generator=generator, device=inp.given.device),
        )
        out.append(x0)
        with torch.no_grad():
            _call(
                model,
                inp,
                cond,
                x0.detach(),
                0.0,
                s,
                e,
                horizon_frames,
                kv_cache=cache,
                cache_write=True,
                warp_source=ws,
            )
    grad_start = chunks[first_grad][0] if first_grad < len(chunks) else lay.num_frames
    return Rollout(torch.cat(out, dim=2), grad_start, list(exits), out[1:])


def _given_frame(inp: RolloutInputs, n: int) -> WarpSource | None:
    """A chunk's warp source under the KV cache, where the chunk's own cond holds no given frame: the
    last given frame and its pose, as the uncached forward finds them in its cond (and serving holds
    them for the whole session). Never the student's own previous output: re-projecting that fed each
    chunk's errors to the next, and 60-s streams dissolved into noise within 15 s."""
    if inp.actions is None:
        return None
    p = inp.given.shape[2]
    lat = inp.given[:, :, -1:].expand(-1, -1, n, -1, -1)
    c2w = inp.actions.c2w[:, p - 1 : p].expand(-1, n, -1, -1)
    return WarpSource(lat, c2w, torch.ones(lat.shape[0], n, dtype=torch.bool, device=lat.device))


@torch.no_grad()
def self_rollout_uncached(
    model: torch.nn.Module,
    inp: RolloutInputs,
    sigmas: list[float],
    generator: torch.Generator,
    *,
    exit_steps: list[int] | None = None,
    sink_frames: int = 1,
    window_frames: int | None = 8,
) -> torch.Tensor:
    """Reference: every pass re-runs all earlier (clean, t = 0) frames under the block-causal mask."""
    lay, cfg = inp.layout, model.cfg
    chunks = lay.chunks()
    exits = exit_steps if exit_steps is not None else [len(sigmas) - 1] * len(chunks)
    b, c, p, h, w = inp.given.shape
    tpf = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    cond = inp.cond()
    done = inp.given

    def denoise(x, sigma, s, e):
        seq = torch.cat([done, x], dim=2)
        t = torch.zeros(b, e, device=x.device)
        t[:, s:e] = sigma * 1000.0
        mask = ChunkLayout(e, lay.prefix, lay.chunk_frames).mask(tpf, sink_frames, window_frames)
        acts = inp.actions.slice(0, e) if inp.actions is not None else None
        ref = inp.actions.c2w[:, 0] if inp.actions is not None else None
        cc = cond[:, :, :e] if cond is not None else None
        v = model(seq, t, inp.context, cond=cc, actions=acts, action_reference=ref, attn_mask=mask).float()
        return x - sigma * v[:, :, s:e]

    for j, (s, e) in enumerate(chunks):
        x = torch.randn(b, c, e - s, h, w, generator=generator, device=inp.given.device)
        for i in range(exits[j]):
            x0 = denoise(x, sigmas[i], s, e)
            x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * torch.randn(x.shape, generator=generator, device=x.device)
        done = torch.cat([done, denoise(x, sigmas[exits[j]], s, e)], dim=2)
    return done
