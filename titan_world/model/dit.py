"""The Wan2.x diffusion transformer, with Wan's native parameter names (README.md, Model).

Block math (e = time_projection(t) + modulation, 6 chunks, fp32):
    x += SA(LN1(x)·(1+e1)+e0)·e2 ;  x += CA(LN3(x), text) ;  x += FFN(LN2(x)·(1+e4)+e3)·e5
Our additions, all optional and off by default: per-frame timesteps (diffusion forcing),
RoPE frame offsets, block-causal masks, a KV cache for streaming, Ulysses context parallelism
through a small hook, and action AdaLN after self-attention (zero-initialised).

Precision as the reference implementations: in a bf16 model the parameters named by
`keeps_fp32` (time embedding and projection, AdaLN modulations, the cross-attention LayerNorm's
affine, the head) stay fp32 and run fp32 GEMMs, and the residual stream is fp32; attention and
FFN GEMMs read bf16. `WanDiT.to(torch.bfloat16)` keeps that split, and so does FSDP's mixed
precision (parallel/fsdp.py). Measured against diffusers in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from titan_world.model.action import ActionEmbedding, ActionInputs, ActionModulation, WarpSource, warp_condition
from titan_world.model.attention import AttnMask, attention, resolve_backend
from titan_world.model.config import ModelConfig
from titan_world.model.context_parallel import ContextParallel
from titan_world.model.kv_cache import KVCache
from titan_world.model.rope import apply_rope, rope_angles


def sinusoidal_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """cat[cos, sin] of t * 10000^(-i/(dim/2)), in float64 as Wan does (diffusers uses float32,
    which differs by ~1e-4 at t ~ 1000: sin of a 1000-radian angle in float32)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=dtype, device=t.device) / half)
    angles = t.to(dtype)[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight).type_as(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, affine parameters too (Wan's WanLayerNorm), whatever the param dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] * (1 + scale) + shift, with shift/scale [B, S, D] over S equal segments of L
    (S = 1: one timestep; S = frames: per-frame timesteps; S = L: per token). Returns fp32."""
    b, l, d = x.shape
    s = shift.shape[1]
    xs = x.float().view(b, s, l // s, d)
    return (xs * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, l, d)


def gated(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    b, l, d = y.shape
    s = gate.shape[1]
    return (y.float().view(b, s, l // s, d) * gate[:, :, None]).view(b, l, d)


def fp32_region(x: torch.Tensor):
    """No autocast inside (the reference runs its fp32 modules under autocast(float32))."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def linear_input(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """x in the dtype of `layer`'s weight (what its GEMM runs in)."""
    return x.to(layer.weight.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, rope, mask, backend, cp: ContextParallel | None, kv: KVStep | None):
        b, l, d = x.shape
        q = apply_rope(self.norm_q(self.q(x)).view(b, l, self.num_heads, self.head_dim), *rope)
        k = apply_rope(self.norm_k(self.k(x)).view(b, l, self.num_heads, self.head_dim), *rope)
        v = self.v(x).view(b, l, self.num_heads, self.head_dim)

        def attn_fn(q, k, v):  # full sequence, this rank's heads
            if kv is None:
                return attention(q, k, v, mask, backend)
            return cached_attention(kv, q, k, v, backend)

        out = cp.attention(q, k, v, attn_fn) if cp is not None else attn_fn(q, k, v)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, lt, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, lt, self.num_heads, self.head_dim)
        v = self.v(context).view(b, lt, self.num_heads, self.head_dim)
        return k, v

    def forward(self, x, context_kv, backend):
        b, l, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, l, self.num_heads, self.head_dim)
        k, v = context_kv
        return self.o(attention(q, k, v, None, backend).flatten(2))


@dataclass
class KVStep:
    cache: KVCache
    layer: int
    write: bool


@torch.compiler.disable
def cached_attention(kv: KVStep, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Attend over the cache's visible keys plus this chunk's, then (clean pass) commit the chunk.

    Kept out of torch.compile on purpose: the cache's layer index and fill level are Python ints
    that change from layer to layer (and chunk to chunk until the cache is full), and a compiled
    block would specialise (recompile) on each; the attention kernel is one SDPA call either way.
    (CUDA graphs capture it regardless: serving/graphs.py.)
    """
    k_all, v_all = kv.cache.attend_region(kv.layer, k, v)
    out = attention(q, k_all, v_all, None, backend)
    if kv.write:
        kv.cache.commit(kv.layer, k, v)
    return out


class WanBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.layer_idx = layer_idx
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, eps)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.action_proj = ActionModulation(dim) if cfg.action.enabled else None

    def forward(
        self,
        x,
        e,
        context,
        rope,
        mask=None,
        action=None,
        cp=None,
        kv: KVStep | None = None,
        backend="sdpa",
        context_kv=None,
    ):
        """x: the fp32 residual stream [B, L, D]; attention and FFN read their weights' dtype.
        kv: this layer's view of a streaming KV cache, built by the caller (outside torch.compile)
        so a compiled block never reads the layer index and serves every layer with one graph."""
        e0, e1, e2, e3, e4, e5 = (self.modulation[:, None].float() + e).unbind(2)  # each [B, S, D]
        y = self.self_attn(linear_input(modulate(self.norm1(x), e0, e1), self.self_attn.q), rope, mask, backend, cp, kv)
        x = x.float() + gated(y, e2)
        if self.action_proj is not None and action is not None:
            x = self.action_proj(x, action)
        ckv = context_kv if context_kv is not None else self.cross_attn.context_kv(context)
        x = x + self.cross_attn(linear_input(self.norm3(x), self.cross_attn.q), ckv, backend).float()
        y = self.ffn(linear_input(modulate(self.norm2(x), e3, e4), self.ffn[0]))
        return x + gated(y, e5)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size, eps: float):
        super().__init__()
        self.norm = LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation[:, None].float() + e[:, :, None]).unbind(2)
        with fp32_region(x):
            return self.head(linear_input(modulate(self.norm(x), shift, scale), self.head))


@dataclass
class Tokens:
    """What the blocks read, computed by `WanDiT.embed` from the raw inputs (for this rank's
    shard of the sequence under context parallelism)."""

    x: torch.Tensor  # [B, L, D] patch tokens
    e0: torch.Tensor  # [B, S, D] time embedding (the head's modulation)
    e: torch.Tensor  # [B, S, 6, D] the blocks' AdaLN modulation, S = 1, frames or tokens
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [L, head_dim / 2]
    action: torch.Tensor | None  # [B, L, D] action embedding
    context: torch.Tensor | None  # [B, Lt, D] embedded text (None with a PreparedContext)
    context_kv: list  # per block: (k, v) from a PreparedContext, or None
    mask: AttnMask | None
    grid: tuple[int, int, int]  # (frames, height, width) in tokens
    seq_len: int  # tokens before CP padding


@dataclass
class PreparedContext:
    """Text context embedded once, with every block's cross-attention K/V (prompt-level cache)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]


# Parameters kept in fp32 when the model computes in bf16, as the references do: the official code
# holds fp32 weights under bf16 autocast and runs these under autocast(float32); diffusers keeps
# the same modules fp32 (`_keep_in_fp32_modules`). Matched against a parameter name's parts.
KEEP_FP32_PREFIXES = ("time_embedding.", "time_projection.", "head.")
KEEP_FP32_PARTS = frozenset({"modulation", "norm3"})


def keeps_fp32(name: str) -> bool:
    """Whether parameter `name` of a WanDiT stays fp32 in a bf16 model (small: 0.1% of the weights)."""
    return name.startswith(KEEP_FP32_PREFIXES) or not KEEP_FP32_PARTS.isdisjoint(name.split("."))


class WanDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(
            cfg.in_dim, dim, kernel_size=tuple(cfg.patch_size), stride=tuple(cfg.patch_size)
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(cfg, i) for i in range(cfg.num_layers))
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        self.action_embedding = None
        if cfg.action.enabled:
            a = cfg.action
            self.action_embedding = ActionEmbedding(
                dim,
                a.num_keys,
                a.spatial_stride,
                tuple(cfg.patch_size[1:]),
                a.hidden_dim,
                a.use_camera,
                world_frame=a.pose_frame == "world",
                ray_frequencies=a.ray_frequencies,
            )
        self.cp: ContextParallel | None = None
        self.attn_backend = cfg.attn_backend
        self.init_weights()

    # -- setup -----------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Wan's initialisation (see `init_parameter`), drawn from the global RNG; a no-op on meta."""
        if self.patch_embedding.weight.is_meta:
            return
        with torch.no_grad():
            for name, p in self.named_parameters():
                self.init_parameter(name, p)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill `tensor` (the full shape of parameter `name`) with Wan's initialisation.

        One rule per parameter, so a meta-built (sharded) model can be initialised one tensor at
        a time (titan_world.model.io.weight_reader). Linear: xavier-uniform weights, zero biases;
        text/time embeddings: normal(0.02); head and action modulations: zero, so a fresh adapter
        is a no-op; AdaLN modulations: normal(0, dim^-1/2); norms: ones/zeros; patch embedding:
        xavier on the flattened kernel, bias as torch's Conv3d default.
        """
        owner, _, leaf = name.rpartition(".")
        module = self.get_submodule(owner)
        with torch.no_grad():
            if leaf == "modulation":
                nn.init.normal_(tensor, std=self.cfg.dim**-0.5, generator=generator)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                if leaf == "weight":
                    nn.init.ones_(tensor)
                else:
                    nn.init.zeros_(tensor)
            elif module is self.patch_embedding:
                fan_in = module.in_channels * math.prod(module.kernel_size)  # (no op on a sharded weight)
                if leaf == "weight":
                    nn.init.xavier_uniform_(tensor.view(tensor.shape[0], fan_in), generator=generator)
                else:
                    nn.init.uniform_(tensor, -(fan_in**-0.5), fan_in**-0.5, generator=generator)
            elif isinstance(module, nn.Linear):
                if leaf == "bias" or module is self.head.head or ".action_proj." in name:
                    nn.init.zeros_(tensor)
                elif name.startswith(("text_embedding.", "time_embedding.")):
                    nn.init.normal_(tensor, std=0.02, generator=generator)
                else:
                    nn.init.xavier_uniform_(tensor, generator=generator)
            else:
                raise ValueError(f"WanDiT.init_parameter: no initialisation rule for {name!r}")

    def keeps_fp32(self, name: str) -> bool:
        """The precision rule (`keeps_fp32`), for FSDP's mixed precision (parallel/fsdp.py)."""
        return keeps_fp32(name)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.bfloat16()`, ... leave the `keeps_fp32` parameters fp32 (moved to the new
        device): the one place the precision rule lives for every loader and caster."""
        kept = {
            name: p.detach() for name, p in self.named_parameters() if keeps_fp32(name) and p.dtype == torch.float32
        }
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self.get_parameter(name)
            if new.is_floating_point() and new.dtype.itemsize < 4:
                new.data = old.to(new.device)  # (the same Parameter object: optimizers keep it)
        return out

    def set_context_parallel(self, cp: ContextParallel | None) -> None:
        self.cp = cp if cp is not None and cp.size > 1 else None

    def set_attn_backend(self, name: str, device="cpu") -> str:
        self.attn_backend = resolve_backend(name, device)
        return self.attn_backend

    def action_parameters(self) -> list[nn.Parameter]:
        params = list(self.action_embedding.parameters()) if self.action_embedding is not None else []
        for block in self.blocks:
            if block.action_proj is not None:
                params += list(block.action_proj.parameters())
        return params

    # -- helpers ---------------------------------------------------------------------------------
    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        f, h, w = latent_shape[-3:]
        pt, ph, pw = self.cfg.patch_size
        return f // pt, h // ph, w // pw

    def time_embeddings(self, t: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] / [B, S] -> (e0 [B, S, D], e [B, S, 6, D]) in fp32."""
        t = torch.as_tensor(t, device=self.patch_embedding.weight.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            t = t[:, None]
        with fp32_region(t):
            sinusoid = sinusoidal_embedding(t, self.cfg.freq_dim)
            e0 = self.time_embedding(linear_input(sinusoid, self.time_embedding[0])).float()
            e = self.time_projection(linear_input(e0, self.time_projection[1])).float().unflatten(-1, (6, self.cfg.dim))
        return e0, e

    @torch.no_grad()
    def prepare_context(self, context: torch.Tensor) -> PreparedContext:
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        return PreparedContext([block.cross_attn.context_kv(ctx) for block in self.blocks])

    def unpatchify(self, x: torch.Tensor, grid) -> torch.Tensor:
        b = x.shape[0]
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        x = x.view(b, f, h, w, pt, ph, pw, self.cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, self.cfg.out_dim, f * pt, h * ph, w * pw)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | PreparedContext,
        *,
        cond: torch.Tensor | None = None,
        actions: ActionInputs | None = None,
        action_reference: torch.Tensor | None = None,
        frame_offset: int = 0,
        attn_mask: AttnMask | None = None,
        kv_cache: KVCache | None = None,
        cache_write: bool = False,
        warp_source: WarpSource | None = None,
    ) -> torch.Tensor:
        """Velocity prediction [B, out_dim, F, H, W] for noisy latents x [B, out_dim, F, H, W].

        t: [B] (one timestep per sample) or [B, F] (per latent frame: diffusion forcing).
        cond: [B, in_dim - out_dim, F, H, W] concatenated after x (i2v mask + conditioning latent).
        warp_source: with `model.action.warp_cond`, the frame each generated frame's cond re-projects
        (default: the last given one in `cond`; a cached chunk past the start passes that frame).
        """
        tokens = self.embed(
            x,
            t,
            context,
            cond=cond,
            actions=actions,
            action_reference=action_reference,
            frame_offset=frame_offset,
            attn_mask=attn_mask,
            warp_source=warp_source,
        )
        out = self.backbone(tokens, kv_cache, cache_write)
        if kv_cache is not None and cache_write:
            kv_cache.advance(tokens.grid[0])
        return out

    def embed(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | PreparedContext,
        *,
        cond: torch.Tensor | None = None,
        actions: ActionInputs | None = None,
        action_reference: torch.Tensor | None = None,
        frame_offset: int = 0,
        attn_mask: AttnMask | None = None,
        warp_source: WarpSource | None = None,
    ) -> Tokens:
        """Patch tokens, time modulation, RoPE angles, action and text embeddings (this rank's
        shard of the sequence under context parallelism)."""
        b = x.shape[0]
        if cond is not None and actions is not None and self.cfg.action.warp_cond:
            cond = warp_condition(cond, actions, self.cfg.action.spatial_stride, warp_source)
        if cond is not None:
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        if x.shape[1] != self.cfg.in_dim:
            raise ValueError(f"model input has {x.shape[1]} channels (x + cond); model.in_dim={self.cfg.in_dim}")
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2).float()  # the residual stream is fp32
        seq_len, tpf = x.shape[1], grid[1] * grid[2]
        cos, sin = rope_angles(
            grid, self.cfg.head_dim, frame_offset=frame_offset, theta=self.cfg.rope_theta, device=x.device
        )
        e0, e = self.time_embeddings(t, b)
        if e.shape[1] not in (1, grid[0], seq_len):
            raise ValueError(
                f"timesteps give {e.shape[1]} values per sample; expected 1, {grid[0]} (frames) or {seq_len} (tokens)"
            )
        if isinstance(context, PreparedContext):
            context_kv, ctx = context.kv, None
        else:
            context_kv, ctx = (
                [None] * len(self.blocks),
                self.text_embedding(context.to(self.text_embedding[0].weight.dtype)),
            )
        action = None
        if self.action_embedding is not None and actions is not None:
            action = self.action_embedding(actions, grid, action_reference, self.cfg.action.translation_scale)

        mask = attn_mask
        cp = self.cp
        if cp is not None:
            padded = -(-seq_len // cp.size) * cp.size
            pad = padded - seq_len
            if pad and mask is None:
                mask = AttnMask(grid[0], tpf)
            if mask is not None:
                mask = mask.with_padding(padded)
            if e.shape[1] > 1:  # per-frame timesteps: expand to tokens so shards need not align to frames
                e0 = e0.repeat_interleave(seq_len // e0.shape[1], dim=1)
                e = e.repeat_interleave(seq_len // e.shape[1], dim=1)
                e0, e = cp.scatter(F.pad(e0, (0, 0, 0, pad)), 1), cp.scatter(F.pad(e, (0, 0, 0, 0, 0, pad)), 1)
            x = cp.scatter(F.pad(x, (0, 0, 0, pad)), 1)
            cos, sin = (cp.scatter(F.pad(r, (0, 0, 0, pad)), 0) for r in (cos, sin))
            if action is not None:
                action = cp.scatter(F.pad(action, (0, 0, 0, pad)), 1)
        return Tokens(x, e0, e, (cos, sin), action, ctx, list(context_kv), mask, grid, seq_len)

    def backbone(self, tokens: Tokens, kv_cache: KVCache | None = None, cache_write: bool = False) -> torch.Tensor:
        """Blocks, head and unpatchify: [B, out_dim, F, H, W]. Reads only `tokens`, the weights and
        the cache's fixed buffers, so a streaming pass can be replayed as a CUDA graph."""
        cp = self.cp
        if cp is not None and kv_cache is not None and tokens.seq_len % cp.size:
            raise ValueError(
                f"context parallel streaming needs chunk tokens ({tokens.seq_len}) divisible by cp={cp.size}"
            )
        x = tokens.x
        for block, ckv in zip(self.blocks, tokens.context_kv):
            x = block(
                x,
                tokens.e,
                tokens.context,
                tokens.rope,
                tokens.mask,
                tokens.action,
                cp,
                KVStep(kv_cache, block.layer_idx, cache_write) if kv_cache is not None else None,
                self.attn_backend,
                ckv,
            )
        x = self.head(x, tokens.e0)
        if cp is not None:
            x = cp.gather(x, 1)[:, : tokens.seq_len]
        return self.unpatchify(x, tokens.grid)
