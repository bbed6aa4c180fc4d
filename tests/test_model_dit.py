"""The DiT: Wan key names and sizes, diffusers parity, backends, RoPE offsets, KV cache, I/O errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from titan_world.config import CONFIG_ROOT, load_config
from titan_world.model import (
    AttnMask,
    CheckpointError,
    KVCache,
    WanDiT,
    WanMoE,
    build_model,
    load_pretrained,
    save_pretrained,
)
from titan_world.model.config import ModelConfig
from titan_world.model.diffusers_names import native_config_to_diffusers, native_to_diffusers
from titan_world.model.dit import keeps_fp32


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        name="t",
        model_type="t2v",
        dim=48,
        ffn_dim=96,
        num_heads=4,
        num_layers=2,
        in_dim=8,
        out_dim=8,
        text_dim=16,
        text_len=8,
    )
    base.update(kw)
    return ModelConfig(**base)


def model_cfg(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((CONFIG_ROOT / "model" / f"{name}.yaml").read_text()))


@pytest.mark.parametrize(
    "name, params",
    [
        ("wan2.1-1.3b", 1_418_996_800),
        ("wan2.2-ti2v-5b", 4_999_787_712),
        ("wan2.2-i2v-a14b", 14_288_901_184),
        ("wan2.2-t2v-a14b", 14_288_491_584),
    ],
)
def test_every_size_builds_on_meta_with_wan_names(name, params):
    cfg = model_cfg(name)
    with torch.device("meta"):
        model = WanDiT(cfg)
    state = model.state_dict()
    assert sum(v.numel() for v in state.values()) == params
    d, L = cfg.dim, cfg.num_layers
    expect = {
        "patch_embedding.weight": (d, cfg.in_dim, 1, 2, 2),
        "text_embedding.0.weight": (d, 4096),
        "text_embedding.2.weight": (d, d),
        "time_embedding.0.weight": (d, 256),
        "time_projection.1.weight": (6 * d, d),
        f"blocks.{L - 1}.self_attn.q.weight": (d, d),
        f"blocks.{L - 1}.self_attn.norm_q.weight": (d,),
        f"blocks.{L - 1}.cross_attn.norm_k.weight": (d,),
        f"blocks.{L - 1}.norm3.weight": (d,),
        f"blocks.{L - 1}.ffn.0.weight": (cfg.ffn_dim, d),
        f"blocks.{L - 1}.ffn.2.weight": (d, cfg.ffn_dim),
        f"blocks.{L - 1}.modulation": (1, 6, d),
        "head.head.weight": (cfg.out_dim * 4, d),
        "head.modulation": (1, 2, d),
    }
    for key, shape in expect.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("blocks.0.norm1.", "blocks.0.norm2.", "head.norm.")) for k in state)  # no affine


def test_a14b_is_two_experts():
    cfg = model_cfg("wan2.2-i2v-a14b")
    with torch.device("meta"):
        moe = build_model(cfg)
    assert isinstance(moe, WanMoE)
    assert sum(p.numel() for p in moe.parameters()) == 2 * 14_288_901_184


# (preset, boundary, shift, steps, guidance high-noise, guidance low-noise) from Wan2.2 wan/configs/wan_*.py
# (Wan2.1 1.3B: Wan2.1 generate.py's t2v defaults), written down here independently of presets.py.
OFFICIAL_SAMPLING = {
    "wan2.2-t2v-a14b": ("wan2.2-t2v-a14b", 0.875, 12.0, 40, 4.0, 3.0),
    "wan2.2-i2v-a14b": ("wan2.2-i2v-a14b", 0.900, 5.0, 40, 3.5, 3.5),
    "wan2.2-ti2v-5b": ("wan2.2-ti2v-5b", None, 5.0, 50, 5.0, 5.0),
    "wan2.1-1.3b": ("wan2.1-t2v", None, 5.0, 50, 5.0, 5.0),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_SAMPLING))
def test_presets_carry_the_official_sampling_defaults(name):
    from titan_world.model.presets import PRESETS

    cfg = model_cfg(name)
    preset, boundary, shift, steps, high, low = OFFICIAL_SAMPLING[name]
    p = PRESETS[preset]
    assert (p.shift, p.steps, p.guidance_high, p.guidance_low, p.boundary) == (shift, steps, high, low, boundary)
    if boundary is not None:
        assert cfg.num_experts == 2 and cfg.boundary == boundary


def test_t2v_a14b_is_two_text_only_experts():
    cfg = model_cfg("wan2.2-t2v-a14b")
    assert (cfg.model_type, cfg.in_dim, cfg.out_dim, cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers) == (
        "t2v",
        16,
        16,
        5120,
        13824,
        40,
        40,
    )
    with torch.device("meta"):
        moe = build_model(cfg)
    assert isinstance(moe, WanMoE) and moe.boundary == 0.875
    per_expert = sum(p.numel() for p in moe.high.parameters())
    assert round(per_expert / 1e9, 2) == 14.29  # the I2V expert minus its 20 extra patch-embedding input channels


def test_matches_diffusers_wan_transformer(monkeypatch):
    """Same weights, same input -> same output. Our timestep sinusoid is float64 (as Wan's own
    code); diffusers computes it in float32, so for an exact comparison we use float32 here."""
    import functools

    from diffusers import WanTransformer3DModel

    import titan_world.model.dit as dit

    monkeypatch.setattr(dit, "sinusoidal_embedding", functools.partial(dit.sinusoidal_embedding, dtype=torch.float32))

    cfg = tiny_cfg(model_type="i2v", in_dim=20, out_dim=8)
    torch.manual_seed(0)
    ours = WanDiT(cfg).eval()
    for p in ours.parameters():  # non-trivial head and norms
        p.data.normal_(0, 0.2)
    ref = WanTransformer3DModel(
        **{k: v for k, v in native_config_to_diffusers(cfg).items() if not k.startswith("_")}
    ).eval()
    missing, unexpected = ref.load_state_dict(native_to_diffusers(ours.state_dict()), strict=True)
    x, cond = torch.randn(2, 8, 3, 8, 8), torch.randn(2, 12, 3, 8, 8)
    t, ctx = torch.tensor([999.0, 321.0]), torch.randn(2, 8, 16)
    with torch.no_grad():
        a = ours(x, t, ctx, cond=cond)
        b = ref(torch.cat([x, cond], 1), t, ctx, return_dict=False)[0]
    # outputs reach |10|; the two implementations round differently in fp32 (RoPE, GELU) at ~1e-5 relative
    assert ((a - b).norm() / b.norm()).item() < 3e-5
    torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-4)


def _diffusers_bf16(ref):
    """diffusers' model as `from_pretrained(torch_dtype=torch.bfloat16)` gives it: bf16 except its
    `_keep_in_fp32_modules` (applied by hand: that path needs accelerate)."""
    import copy

    keep = type(ref)._keep_in_fp32_modules
    out = copy.deepcopy(ref).to(torch.bfloat16)
    for name, p in out.named_parameters():
        if any(m in name.split(".") for m in keep):
            p.data = ref.get_parameter(name).data.clone()
    return out


def test_bf16_keeps_the_reference_fp32_modules_and_is_at_least_as_precise_as_diffusers(monkeypatch):
    """In bf16, time embedding/projection, modulations, the cross-attention norm and the head stay fp32
    and the residual stream is fp32 (the official code's rule). Measured against the fp32 output of
    the same weights, our bf16 forward is then more precise than diffusers' bf16 forward (which also
    keeps its fp32 modules but rounds the residual stream and the time embedding to bf16); before,
    with everything bf16, it was less precise. Numbers: benchmarks/RESULTS.md."""
    import functools

    from diffusers import WanTransformer3DModel

    import titan_world.model.dit as dit

    monkeypatch.setattr(dit, "sinusoidal_embedding", functools.partial(dit.sinusoidal_embedding, dtype=torch.float32))
    cfg = tiny_cfg(
        model_type="i2v", dim=256, ffn_dim=512, num_layers=4, in_dim=36, out_dim=16, text_dim=64, text_len=16
    )
    torch.manual_seed(0)
    ours = WanDiT(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = WanTransformer3DModel(**{k: v for k, v in native_config_to_diffusers(cfg).items() if k[0] != "_"}).eval()
    ref.load_state_dict(native_to_diffusers(ours.state_dict()), strict=True)
    ours16, ref16 = WanDiT(cfg).eval(), _diffusers_bf16(ref)
    ours16.load_state_dict(ours.state_dict())
    ours16 = ours16.to(torch.bfloat16)
    fp32 = {n for n, p in ours16.named_parameters() if p.dtype == torch.float32}
    assert fp32 == {n for n, _ in ours16.named_parameters() if dit.keeps_fp32(n)}
    assert {
        "time_embedding.0.weight",
        "time_projection.1.weight",
        "blocks.3.modulation",
        "blocks.0.norm3.weight",
        "head.head.weight",
        "head.modulation",
    } <= fp32
    assert ours16.blocks[0].ffn[0].weight.dtype == ours16.blocks[0].self_attn.norm_q.weight.dtype == torch.bfloat16

    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(1, 16, 5, 16, 16, generator=g), torch.randn(1, 20, 5, 16, 16, generator=g)
    t, ctx = torch.tensor([937.0]), torch.randn(1, 16, 64, generator=g)
    with torch.no_grad():
        truth = ours(x, t, ctx, cond=cond)
        a = ours16(x.bfloat16(), t, ctx.bfloat16(), cond=cond.bfloat16())
        b = ref16(torch.cat([x, cond], 1).bfloat16(), t, ctx.bfloat16(), return_dict=False)[0].float()
    rel = lambda u, v: ((u.float() - v).norm() / v.norm()).item()  # noqa: E731
    assert a.dtype == torch.float32  # the head runs in fp32
    assert rel(a, truth) < 0.7 * rel(b, truth)  # measured 3.7e-3 vs 7.4e-3 (all-bf16 before: 7.8e-3)
    assert rel(a, b) < 1.2e-2  # bf16 vs bf16: both sides' own GEMM rounding (7e-3)


def test_bf16_train_step_gemms_stay_bf16():
    """bf16 weights (or fp32 weights under bf16 autocast, the single-GPU train step): attention, FFN
    and embedding GEMMs run in bf16; only the small reference-fp32 modules run fp32."""
    model = _randomized(tiny_cfg(model_type="i2v", in_dim=20, out_dim=8))
    dtypes: dict[str, torch.dtype] = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)):
            m.register_forward_hook(lambda mod, inp, out, name=name: dtypes.__setitem__(name, out.dtype))
    x, cond, ctx = torch.randn(1, 8, 3, 8, 8), torch.randn(1, 12, 3, 8, 8), torch.randn(1, 8, 16)
    fp32_gemms = {"time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"}
    for setup in ("bf16 weights", "fp32 weights, bf16 autocast"):
        dtypes.clear()
        net = model.to(torch.bfloat16) if setup == "bf16 weights" else model.float()
        with torch.autocast("cpu", torch.bfloat16, enabled=setup != "bf16 weights"):
            out = net(x, torch.tensor([500.0]), ctx, cond=cond)
            out.float().pow(2).mean().backward()
        assert out.dtype == torch.float32
        assert {n for n, d in dtypes.items() if d == torch.float32} == fp32_gemms, setup
        bf16 = {n for n, d in dtypes.items() if d == torch.bfloat16}
        assert bf16 >= {
            "blocks.1.self_attn.q",
            "blocks.1.cross_attn.o",
            "blocks.1.ffn.0",
            "blocks.1.ffn.2",
            "text_embedding.0",
            "patch_embedding",
        }, setup
        model.zero_grad(set_to_none=True)


def _fsdp_gemm_dtypes() -> dict[str, str]:
    from parallel import apply_fsdp, build_mesh, init_distributed
    from parallel.config import ParallelConfig
    from parallel.fsdp import mixed_precision_policy

    init_distributed()
    model = _randomized(tiny_cfg(model_type="i2v", in_dim=20, out_dim=8))
    dtypes: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)):
            m.register_forward_hook(lambda mod, inp, out, name=name: dtypes.__setitem__(name, str(out.dtype)))
    pc = ParallelConfig()
    apply_fsdp(model, build_mesh(pc), pc, mp_policy=mixed_precision_policy(pc, "cuda"))  # the GPU policy, on CPU
    x, cond, ctx = torch.randn(1, 8, 3, 8, 8), torch.randn(1, 12, 3, 8, 8), torch.randn(1, 8, 16)
    model(x, torch.tensor([500.0]), ctx, cond=cond).float().mean().backward()
    return dtypes


@pytest.mark.xdist_group(name="dist")
def test_fsdp_bf16_policy_runs_the_reference_fp32_modules_in_fp32():
    from dist_utils import run_distributed

    dtypes = run_distributed(_fsdp_gemm_dtypes, 1, timeout=120)[0]
    fp32 = {n for n, d in dtypes.items() if d == "torch.float32"}
    assert fp32 == {"time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"}
    assert dtypes["blocks.1.ffn.0"] == dtypes["blocks.0.self_attn.q"] == dtypes["text_embedding.0"] == "torch.bfloat16"


def test_loading_in_bf16_keeps_the_fp32_modules(tmp_path):
    model = _randomized(tiny_cfg())
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    for name, p in loaded.named_parameters():
        fp32 = name.startswith(("time_", "head.")) or name.endswith(("modulation", "norm3.weight", "norm3.bias"))
        assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    torch.testing.assert_close(loaded.blocks[0].modulation, model.blocks[0].modulation, rtol=0, atol=0)


def test_per_frame_timesteps_equal_per_sample_when_constant():
    model = WanDiT(tiny_cfg()).eval()
    for p in model.head.parameters():
        p.data.normal_(0, 0.2)
    x, ctx = torch.randn(1, 8, 3, 8, 8), torch.randn(1, 8, 16)
    with torch.no_grad():
        a = model(x, torch.tensor([400.0]), ctx)
        b = model(x, torch.full((1, 3), 400.0), ctx)
        c = model(x, torch.tensor([[400.0, 400.0, 10.0]]), ctx)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, :, 2], c[:, :, 2])


def _randomized(cfg) -> WanDiT:
    model = WanDiT(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


def test_rope_offset_chunk_equals_slice_of_full_block_causal():
    """A chunk computed alone with frame_offset equals the same frames of a full forward in
    which those frames see nothing but their own chunk (first chunk at offset 0)."""
    model = _randomized(tiny_cfg())
    x, ctx, t = torch.randn(1, 8, 4, 8, 8), torch.randn(1, 8, 16), torch.tensor([500.0])
    tpf = 16
    with torch.no_grad():
        full = model(x, t, ctx, attn_mask=AttnMask.block_causal(4, tpf, chunk_frames=2, window_frames=0))
        chunk = model(x[:, :, 2:], t, ctx, frame_offset=2)
    torch.testing.assert_close(chunk, full[:, :, 2:], rtol=1e-5, atol=1e-5)
    # Attention inside one chunk only sees relative positions, so check the angles themselves too
    # (the KV-cache test covers a chunk attending to earlier frames, where offsets matter).
    from titan_world.model.rope import rope_angles

    cos_full, sin_full = rope_angles((4, 4, 4), 12)
    cos_off, sin_off = rope_angles((2, 4, 4), 12, frame_offset=2)
    torch.testing.assert_close(cos_off, cos_full[32:], rtol=0, atol=0)
    torch.testing.assert_close(sin_off, sin_full[32:], rtol=0, atol=0)
    assert not torch.allclose(cos_off, cos_full[:32])


@pytest.mark.parametrize("window", [None, 2])
def test_kv_cache_streaming_equals_block_causal_full_forward(window):
    """Chunk-by-chunk with the KV cache (clean K/V written per chunk) == one masked forward."""
    model = _randomized(tiny_cfg())
    frames, chunk, tpf = 6, 2, 16
    x, ctx, t = torch.randn(1, 8, frames, 8, 8), torch.randn(1, 8, 16), torch.tensor([0.0])
    mask = AttnMask.block_causal(frames, tpf, chunk, sink_frames=1, window_frames=window)
    w = window if window is not None else frames
    cache = KVCache(2, 1, 4, 12, tpf, sink_frames=1, window_frames=w, chunk_frames=chunk)
    with torch.no_grad():
        full = model(x, t, ctx, attn_mask=mask)
        outs = [
            model(x[:, :, s : s + chunk], t, ctx, frame_offset=s, kv_cache=cache, cache_write=True)
            for s in range(0, frames, chunk)
        ]
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_memory_is_flat():
    model = _randomized(tiny_cfg())
    cache = KVCache(2, 1, 4, 12, 16, sink_frames=1, window_frames=2, chunk_frames=1)
    ptr, nbytes = cache.k.data_ptr(), cache.nbytes()
    ctx = model.prepare_context(torch.randn(1, 8, 16))
    with torch.no_grad():
        for s in range(20):
            model(
                torch.randn(1, 8, 1, 8, 8), torch.tensor([0.0]), ctx, frame_offset=s, kv_cache=cache, cache_write=True
            )
    assert (cache.k.data_ptr(), cache.nbytes(), cache.stored_frames, cache.committed_frames) == (ptr, nbytes, 3, 20)


def test_prepared_context_equals_raw_context():
    model = _randomized(tiny_cfg())
    x, ctx, t = torch.randn(1, 8, 2, 8, 8), torch.randn(1, 8, 16), torch.tensor([700.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, model.prepare_context(ctx)), model(x, t, ctx))


def test_flex_backend_agrees_with_sdpa_on_block_causal():
    model = _randomized(tiny_cfg())
    x, ctx, t = torch.randn(1, 8, 4, 8, 8), torch.randn(1, 8, 16), torch.tensor([500.0])
    mask = AttnMask.block_causal(4, 16, chunk_frames=2, sink_frames=1, window_frames=1)
    with torch.no_grad():
        a = model(x, t, ctx, attn_mask=mask)
        model.set_attn_backend("flex")
        b = model(x, t, ctx, attn_mask=mask)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_missing_optional_backends_fall_back_to_sdpa():
    model = WanDiT(tiny_cfg())
    assert model.set_attn_backend("flash") == "sdpa"
    assert model.set_attn_backend("xformers") == "sdpa"


def test_save_load_roundtrip_sharded_and_moe(tmp_path):
    model = _randomized(tiny_cfg())
    save_pretrained(model, tmp_path / "dense", max_shard_bytes=20_000)
    assert (tmp_path / "dense" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_pretrained(tmp_path / "dense")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    moe = WanMoE(_randomized(tiny_cfg()), _randomized(tiny_cfg()), 0.9)
    save_pretrained(moe, tmp_path / "moe")
    assert (tmp_path / "moe" / "high_noise_model" / "config.json").is_file()
    again = load_pretrained(tmp_path / "moe")
    assert isinstance(again, WanMoE)
    torch.testing.assert_close(again.low.head.head.weight, moe.low.head.head.weight)


def test_load_in_another_dtype_converts_one_tensor_at_a_time(tmp_path, monkeypatch):
    """A 14B fp32 expert loaded in bf16 must not hold its fp32 copy (57 GB) on the host."""
    import weakref

    from titan_world.model import io

    model = _randomized(tiny_cfg())
    save_pretrained(model, tmp_path / "m")
    read, alive, most = io.WeightFolder.read, [], [0]

    def counting_read(self, name, region=None):
        alive[:] = [r for r in alive if r() is not None]
        most[0] = max(most[0], len(alive))  # file tensors still held when the next one is read
        t = read(self, name, region)
        if not keeps_fp32(name):  # (a reference-fp32 parameter is the file's fp32 tensor itself: no copy)
            alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(io.WeightFolder, "read", counting_read)
    loaded = load_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert most[0] == 0
    for k, v in model.state_dict().items():
        got, dtype = loaded.state_dict()[k], torch.float32 if keeps_fp32(k) else torch.bfloat16
        assert got.dtype == dtype and got.device.type == "cpu"
        torch.testing.assert_close(got, v.to(dtype), rtol=0, atol=0)
    kept = load_pretrained(tmp_path / "m")  # no dtype: the file's
    assert {v.dtype for v in kept.state_dict().values()} == {torch.float32}


def test_loads_diffusers_format_folder(tmp_path):
    model = _randomized(tiny_cfg())
    from safetensors.torch import save_file

    folder = tmp_path / "diffusers"
    folder.mkdir()
    save_file(native_to_diffusers(model.state_dict()), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(native_config_to_diffusers(model.cfg) | {"text_dim": 16}))
    loaded = load_pretrained(folder)
    torch.testing.assert_close(loaded.blocks[1].norm3.weight, model.blocks[1].norm3.weight)


def test_bad_checkpoints_name_keys_and_shapes(tmp_path):
    model = _randomized(tiny_cfg())
    save_pretrained(model, tmp_path / "ok")
    state = {k: v for k, v in model.state_dict().items() if k != "blocks.1.ffn.2.bias"}
    state["blocks.0.self_attn.q.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    from titan_world.model.io import config_json, save_state_dict

    save_state_dict(state, tmp_path / "bad", config_json(model.cfg))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path / "bad")
    msg = str(info.value)
    assert (
        "blocks.1.ffn.2.bias" in msg
        and "extra.weight" in msg
        and "blocks.0.self_attn.q.weight: checkpoint (3, 3)" in msg
    )
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "empty")


def test_tiny_default_config_builds_and_runs():
    cfg = load_config().model
    model = build_model(cfg)
    c = cfg.out_dim
    out = model(
        torch.randn(1, c, 2, 16, 16),
        torch.tensor([100.0]),
        torch.randn(1, 32, 64),
        cond=torch.randn(1, cfg.in_dim - c, 2, 16, 16),
    )
    assert out.shape == (1, c, 2, 16, 16)


def test_compiled_streaming_matches_eager_without_recompiling_per_chunk():
    """torch.compile'd blocks + KV cache: same output as eager, and the number of compiled graphs
    does not grow with the session (cache indices are kept out of the graphs)."""
    import torch._dynamo.testing

    from parallel.compile import compile_blocks

    model = _randomized(tiny_cfg(num_layers=3))
    ctx = model.prepare_context(torch.randn(1, 8, 16))

    def stream(chunks: int) -> torch.Tensor:
        cache = KVCache(3, 1, 4, 12, 16, sink_frames=1, window_frames=2, chunk_frames=1)
        outs = []
        with torch.no_grad():
            for s in range(chunks):
                x = torch.randn(1, 8, 1, 8, 8, generator=torch.Generator().manual_seed(s))
                for t, write in ((1000.0, False), (500.0, False), (0.0, True)):
                    outs.append(model(x, torch.tensor([t]), ctx, frame_offset=s, kv_cache=cache, cache_write=write))
        return torch.stack(outs)

    eager = stream(8)
    counter = torch._dynamo.testing.CompileCounter()
    compile_blocks(model, backend=counter)
    torch.testing.assert_close(stream(4), eager[: 4 * 3], rtol=1e-5, atol=1e-6)
    graphs_after_4 = counter.frame_count
    torch.testing.assert_close(stream(8), eager, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == graphs_after_4


def test_compiled_streaming_shares_its_graphs_across_layers():
    """A compiled block with a KV cache compiles the same graphs for 1 layer as for 4: the layer
    index stays out of the graph (before, each layer recompiled, and past dynamo's recompile
    limit of 8 the remaining layers of a 30-layer student ran eagerly)."""
    import torch._dynamo.testing

    from parallel.compile import compile_blocks

    def graphs(layers: int) -> int:
        torch._dynamo.reset()
        model = _randomized(tiny_cfg(num_layers=layers))
        ctx = model.prepare_context(torch.randn(1, 8, 16))
        counter = torch._dynamo.testing.CompileCounter()
        compile_blocks(model, backend=counter)
        cache = KVCache(layers, 1, 4, 12, 16, sink_frames=1, window_frames=2, chunk_frames=1)
        with torch.no_grad():
            for s in range(3):
                for t, write in ((1000.0, False), (0.0, True)):
                    model(
                        torch.randn(1, 8, 1, 8, 8),
                        torch.tensor([t]),
                        ctx,
                        frame_offset=s,
                        kv_cache=cache,
                        cache_write=write,
                    )
        return counter.frame_count

    assert graphs(4) == graphs(1)
