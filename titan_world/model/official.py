"""The official Wan repository's weight files, mapped onto diffusers / transformers modules.

An official Wan2.x download holds, beside the DiT folders, `Wan2.1_VAE.pth` (16 latent channels,
stride 4x8x8), `Wan2.2_VAE.pth` (48 channels, stride 4x16x16: the encoder sees 2x2 pixel patches)
and `models_t5_umt5-xxl-enc-bf16.pth` with the `google/umt5-xxl/` tokenizer folder. These are
plain `torch.save` state dicts in the Wan code's own module layout. Here each key is mapped onto
diffusers' `AutoencoderKLWan` or transformers' `UMT5EncoderModel` (both directions), so the rest
of the platform runs one implementation of each network. The mapping is generated from the
network's structure (read off the file's own key names and shapes), not from a fixed list, so
it also serves small test models.

Loading is bounded in memory: the file is memory-mapped and each tensor converted on its own
into a model built on the meta device (no second full copy in RAM).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from titan_world.model.io import CheckpointError, check_shapes

WAN21_VAE_FILE = "Wan2.1_VAE.pth"
WAN22_VAE_FILE = "Wan2.2_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"

# Per-channel latent statistics the official VAE wrappers normalise with (wan/modules/vae2_1.py,
# vae2_2.py); diffusers stores the same numbers as `latents_mean` / `latents_std`.
WAN21_LATENTS_MEAN = [
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
]
WAN21_LATENTS_STD = [
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
]
WAN22_LATENTS_MEAN = [
    -0.2289,
    -0.0052,
    -0.1323,
    -0.2339,
    -0.2799,
    0.0174,
    0.1838,
    0.1557,
    -0.1382,
    0.0542,
    0.2813,
    0.0891,
    0.1570,
    -0.0098,
    0.0375,
    -0.1825,
    -0.2246,
    -0.1207,
    -0.0698,
    0.5109,
    0.2665,
    -0.2108,
    -0.2158,
    0.2502,
    -0.2055,
    -0.0322,
    0.1109,
    0.1567,
    -0.0729,
    0.0899,
    -0.2799,
    -0.1230,
    -0.0313,
    -0.1649,
    0.0117,
    0.0723,
    -0.2839,
    -0.2083,
    -0.0520,
    0.3748,
    0.0152,
    0.1957,
    0.1433,
    -0.2944,
    0.3573,
    -0.0548,
    -0.1681,
    -0.0667,
]
WAN22_LATENTS_STD = [
    0.4765,
    1.0364,
    0.4514,
    1.1677,
    0.5313,
    0.4990,
    0.4818,
    0.5013,
    0.8158,
    1.0344,
    0.5894,
    1.0901,
    0.6885,
    0.6165,
    0.8454,
    0.4978,
    0.5759,
    0.3523,
    0.7135,
    0.6804,
    0.5833,
    1.4146,
    0.8986,
    0.5659,
    0.7069,
    0.5338,
    0.4889,
    0.4917,
    0.4069,
    0.4999,
    0.6866,
    0.4093,
    0.5709,
    0.6065,
    0.6415,
    0.4944,
    0.5726,
    1.2042,
    0.5458,
    1.6887,
    0.3971,
    1.0600,
    0.3943,
    0.5537,
    0.5444,
    0.4089,
    0.7468,
    0.7744,
]


# -- reading / writing .pth files -----------------------------------------------------------------
def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d state dict, memory-mapped (tensors are read from the file on use)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:  # a legacy (pre-zip) torch.save file cannot be memory-mapped
        if "mmap" not in str(e):
            raise CheckpointError(f"{path}: not a torch state dict ({e})") from e
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor)")
    return state


def _rename(state: dict[str, torch.Tensor], mapping: dict[str, str], where: str) -> dict[str, torch.Tensor]:
    unknown = sorted(set(state) - set(mapping))
    if unknown:
        raise CheckpointError(f"{where}: unexpected keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return {mapping[k]: v for k, v in state.items()}


def _assign(
    model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, dtype: torch.dtype, device
) -> torch.nn.Module:
    """Load `state` into a meta-built `model` one tensor at a time (converted to dtype/device)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, where)
    converted = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# -- Wan VAE --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VAELayout:
    """The structure of a Wan VAE, as diffusers' `AutoencoderKLWan` config names it."""

    base_dim: int
    decoder_base_dim: int
    z_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temperal_downsample: tuple[bool, ...]
    is_residual: bool  # Wan2.2: residual down/up blocks, 2x2 pixel patches (12 image channels)

    @property
    def patch_size(self) -> int | None:
        return 2 if self.is_residual else None

    def diffusers_config(self) -> dict:
        channels = 12 if self.is_residual else 3
        mean, std = {16: (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), 48: (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)}.get(
            self.z_dim, ([0.0] * self.z_dim, [1.0] * self.z_dim)
        )
        return dict(
            base_dim=self.base_dim,
            decoder_base_dim=self.decoder_base_dim,
            z_dim=self.z_dim,
            dim_mult=list(self.dim_mult),
            num_res_blocks=self.num_res_blocks,
            attn_scales=[],
            temperal_downsample=list(self.temperal_downsample),
            is_residual=self.is_residual,
            in_channels=channels,
            out_channels=channels,
            patch_size=self.patch_size,
            scale_factor_temporal=4,
            scale_factor_spatial=2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1),
            latents_mean=list(mean),
            latents_std=list(std),
        )

    @classmethod
    def from_diffusers_config(cls, cfg) -> VAELayout:
        if list(cfg.get("attn_scales") or []):
            raise ValueError(f"VAE attn_scales={cfg['attn_scales']}: the Wan VAEs have none (no mapping for them)")
        return cls(
            cfg["base_dim"],
            cfg.get("decoder_base_dim") or cfg["base_dim"],
            cfg["z_dim"],
            tuple(cfg["dim_mult"]),
            cfg["num_res_blocks"],
            tuple(cfg["temperal_downsample"]),
            bool(cfg.get("is_residual", False)),
        )


_CONV = ("weight", "bias")


def _pairs(official: str, diffusers: str, leaves=_CONV) -> list[tuple[str, str]]:
    return [(f"{official}.{leaf}", f"{diffusers}.{leaf}") for leaf in leaves]


def _resblock(o: str, d: str, in_dim: int, out_dim: int) -> list[tuple[str, str]]:
    """Official ResidualBlock: residual = [RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv], shortcut."""
    out = _pairs(f"{o}.residual.0", f"{d}.norm1", ("gamma",)) + _pairs(f"{o}.residual.2", f"{d}.conv1")
    out += _pairs(f"{o}.residual.3", f"{d}.norm2", ("gamma",)) + _pairs(f"{o}.residual.6", f"{d}.conv2")
    if in_dim != out_dim:
        out += _pairs(f"{o}.shortcut", f"{d}.conv_shortcut")
    return out


def _resample(o: str, d: str, temporal: bool) -> list[tuple[str, str]]:
    """Official Resample: resample = [pad or upsample, Conv2d], plus a causal time_conv when temporal."""
    time_conv = _pairs(f"{o}.time_conv", f"{d}.time_conv") if temporal else []
    return _pairs(f"{o}.resample.1", f"{d}.resample.1") + time_conv


def _middle(o: str, d: str, dim: int) -> list[tuple[str, str]]:
    """Official middle = [ResidualBlock, AttentionBlock, ResidualBlock]; diffusers' mid_block."""
    a, b = f"{o}.middle.1", f"{d}.mid_block.attentions.0"
    attn = _pairs(f"{a}.norm", f"{b}.norm", ("gamma",)) + _pairs(f"{a}.to_qkv", f"{b}.to_qkv")
    attn += _pairs(f"{a}.proj", f"{b}.proj")
    return (
        _resblock(f"{o}.middle.0", f"{d}.mid_block.resnets.0", dim, dim)
        + attn
        + _resblock(f"{o}.middle.2", f"{d}.mid_block.resnets.1", dim, dim)
    )


def _head(o: str, d: str) -> list[tuple[str, str]]:
    """Official head = [RMS_norm, SiLU, conv]."""
    return _pairs(f"{o}.head.0", f"{d}.norm_out", ("gamma",)) + _pairs(f"{o}.head.2", f"{d}.conv_out")


def vae_key_map(layout: VAELayout) -> dict[str, str]:
    """Official Wan VAE key -> diffusers `AutoencoderKLWan` key, for every parameter."""
    n, last = layout.num_res_blocks, len(layout.dim_mult) - 1
    pairs = _pairs("conv1", "quant_conv") + _pairs("conv2", "post_quant_conv")

    dims = [layout.base_dim * u for u in (1, *layout.dim_mult)]
    pairs += _pairs("encoder.conv1", "encoder.conv_in")
    k = 0  # Wan2.1: one flat list of residual blocks and resamples, indexed alike on both sides
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        temporal = i < last and layout.temperal_downsample[i]
        for j in range(n):
            if layout.is_residual:
                pairs += _resblock(
                    f"encoder.downsamples.{i}.downsamples.{j}", f"encoder.down_blocks.{i}.resnets.{j}", in_dim, out_dim
                )
            else:
                pairs += _resblock(f"encoder.downsamples.{k}", f"encoder.down_blocks.{k}", in_dim, out_dim)
                k += 1
            in_dim = out_dim
        if i < last:
            if layout.is_residual:
                pairs += _resample(
                    f"encoder.downsamples.{i}.downsamples.{n}", f"encoder.down_blocks.{i}.downsampler", temporal
                )
            else:
                pairs += _resample(f"encoder.downsamples.{k}", f"encoder.down_blocks.{k}", temporal)
                k += 1
    pairs += _middle("encoder", "encoder", dims[-1]) + _head("encoder", "encoder")

    dims = [layout.decoder_base_dim * u for u in (layout.dim_mult[-1], *layout.dim_mult[::-1])]
    upsample = layout.temperal_downsample[::-1]
    pairs += _pairs("decoder.conv1", "decoder.conv_in") + _middle("decoder", "decoder", dims[0])
    k = 0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0 and not layout.is_residual:
            in_dim //= 2  # Wan2.1's upsampling convolutions halve the channels
        temporal = i < last and upsample[i]
        for j in range(n + 1):
            if layout.is_residual:
                pairs += _resblock(
                    f"decoder.upsamples.{i}.upsamples.{j}", f"decoder.up_blocks.{i}.resnets.{j}", in_dim, out_dim
                )
            else:
                pairs += _resblock(f"decoder.upsamples.{k}", f"decoder.up_blocks.{i}.resnets.{j}", in_dim, out_dim)
                k += 1
            in_dim = out_dim
        if i < last:
            if layout.is_residual:
                pairs += _resample(
                    f"decoder.upsamples.{i}.upsamples.{n + 1}", f"decoder.up_blocks.{i}.upsampler", temporal
                )
            else:
                pairs += _resample(f"decoder.upsamples.{k}", f"decoder.up_blocks.{i}.upsamplers.0", temporal)
                k += 1
    pairs += _head("decoder", "decoder")
    return dict(pairs)


def vae_layout_from_official(shapes: dict[str, tuple], where: str = "VAE file") -> VAELayout:
    """Read the structure off an official VAE state dict's key names and shapes."""
    if "encoder.conv1.weight" not in shapes or "conv2.weight" not in shapes or "decoder.conv1.weight" not in shapes:
        raise CheckpointError(
            f"{where}: not a Wan VAE state dict (no encoder.conv1.weight / conv2.weight / decoder.conv1.weight)"
        )
    base_dim, image_channels = shapes["encoder.conv1.weight"][:2]
    residual = image_channels == 12
    mults, res_blocks, temporal = [], set(), []
    if residual:
        i = 0
        while f"encoder.downsamples.{i}.downsamples.0.residual.0.gamma" in shapes:
            j = 0
            while f"encoder.downsamples.{i}.downsamples.{j}.residual.0.gamma" in shapes:
                j += 1
            res_blocks.add(j)
            mults.append(shapes[f"encoder.downsamples.{i}.downsamples.0.residual.2.weight"][0] // base_dim)
            if f"encoder.downsamples.{i}.downsamples.{j}.resample.1.weight" in shapes:
                temporal.append(f"encoder.downsamples.{i}.downsamples.{j}.time_conv.weight" in shapes)
            i += 1
    else:
        k, count = 0, 0
        while True:
            if f"encoder.downsamples.{k}.residual.0.gamma" in shapes:
                if count == 0:
                    mults.append(shapes[f"encoder.downsamples.{k}.residual.2.weight"][0] // base_dim)
                count += 1
            elif f"encoder.downsamples.{k}.resample.1.weight" in shapes:
                temporal.append(f"encoder.downsamples.{k}.time_conv.weight" in shapes)
                res_blocks.add(count)
                count = 0
            else:
                if count:
                    res_blocks.add(count)
                break
            k += 1
    if not mults or len(res_blocks) != 1 or len(temporal) != len(mults) - 1:
        raise CheckpointError(
            f"{where}: the encoder's blocks do not form a Wan VAE "
            f"(stages {mults}, residual blocks per stage {sorted(res_blocks)})"
        )
    decoder_base = shapes["decoder.conv1.weight"][0] // mults[-1]
    return VAELayout(
        base_dim, decoder_base, shapes["conv2.weight"][0], tuple(mults), res_blocks.pop(), tuple(temporal), residual
    )


def official_vae_to_diffusers(
    state: dict[str, torch.Tensor], where: str = "VAE state dict"
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(diffusers config, diffusers state dict) from an official Wan VAE state dict."""
    layout = vae_layout_from_official({k: tuple(v.shape) for k, v in state.items()}, where)
    return layout.diffusers_config(), _rename(state, vae_key_map(layout), where)


def diffusers_vae_to_official(vae) -> dict[str, torch.Tensor]:
    """An `AutoencoderKLWan`'s weights in the official file's layout (what `Wan2.x_VAE.pth` holds)."""
    inverse = {d: o for o, d in vae_key_map(VAELayout.from_diffusers_config(vae.config)).items()}
    return _rename(vae.state_dict(), inverse, "diffusers AutoencoderKLWan")


def load_official_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """`Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` as a diffusers `AutoencoderKLWan` (eval, no grad)."""
    from diffusers import AutoencoderKLWan  # noqa: PLC0415 (optional dependency: the wan extra)

    state = read_pth(path)
    config, mapped = official_vae_to_diffusers(state, str(path))
    with torch.device("meta"):
        vae = AutoencoderKLWan(**config)
    return _assign(vae, mapped, str(path), dtype, device)


def save_official_vae(vae, path: str | Path) -> None:
    torch.save(diffusers_vae_to_official(vae), str(path))


# -- umT5 text encoder ----------------------------------------------------------------------------
_T5_BLOCK = {  # official T5SelfAttention leaf -> transformers UMT5Block leaf
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU(tanh)-gated branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def t5_key_map(num_layers: int) -> dict[str, str]:
    """Official umT5 encoder key -> transformers `UMT5EncoderModel` key (the token embedding is
    `shared.weight`, which transformers ties to `encoder.embed_tokens.weight`)."""
    pairs = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
    for i in range(num_layers):
        pairs.update({f"blocks.{i}.{o}": f"encoder.block.{i}.{d}" for o, d in _T5_BLOCK.items()})
    return pairs


def t5_config_from_official(shapes: dict[str, tuple], where: str = "T5 file"):
    """A transformers `UMT5Config` from an official umT5 encoder state dict's shapes (umT5-XXL:
    vocab 256384, d_model 4096, 64 heads, d_ff 10240, 24 layers, 32 buckets)."""
    from transformers import UMT5Config  # noqa: PLC0415 (slow import: transformers)

    if "token_embedding.weight" not in shapes or "blocks.0.pos_embedding.embedding.weight" not in shapes:
        raise CheckpointError(
            f"{where}: not an official umT5 encoder state dict (no token_embedding.weight / "
            "blocks.0.pos_embedding.embedding.weight)"
        )
    vocab, dim = shapes["token_embedding.weight"]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    return UMT5Config(
        vocab_size=vocab,
        d_model=dim,
        d_kv=shapes["blocks.0.attn.q.weight"][0] // heads,
        d_ff=shapes["blocks.0.ffn.fc1.weight"][0],
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,
    )


def official_t5_to_transformers(state: dict[str, torch.Tensor], where: str = "T5 state dict"):
    """(UMT5Config, transformers state dict) from an official umT5 encoder state dict."""
    config = t5_config_from_official({k: tuple(v.shape) for k, v in state.items()}, where)
    mapped = _rename(state, t5_key_map(config.num_layers), where)
    mapped["encoder.embed_tokens.weight"] = mapped["shared.weight"]
    return config, mapped


def transformers_t5_to_official(model) -> dict[str, torch.Tensor]:
    """A `UMT5EncoderModel`'s weights in the official `models_t5_umt5-xxl-enc-bf16.pth` layout."""
    state = dict(model.state_dict())
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    inverse = {d: o for o, d in t5_key_map(model.config.num_layers).items()}
    return _rename(state, inverse, "transformers UMT5EncoderModel")


def load_official_t5_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """`models_t5_umt5-xxl-enc-bf16.pth` as a transformers `UMT5EncoderModel` (eval, no grad)."""
    from transformers import UMT5EncoderModel  # noqa: PLC0415 (slow import: transformers)

    state = read_pth(path)
    config, mapped = official_t5_to_transformers(state, str(path))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    model = _assign(model, mapped, str(path), dtype, device)
    model.tie_weights()
    return model


def save_official_t5(model, path: str | Path) -> None:
    torch.save(transformers_t5_to_official(model), str(path))


def load_official_t5(
    path: str | Path,
    tokenizer_dir: str | Path | None = None,
    text_len: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
):
    """The official umT5 file + tokenizer folder as our text encoder (`UMT5Encoder`): prompts ->
    [B, text_len, 4096], zero past each prompt. `tokenizer_dir` defaults to `google/umt5-xxl/`
    beside the file, as the official download lays it out."""
    from titan_world.model.text_encoder import UMT5Encoder  # noqa: PLC0415 (import cycle: text_encoder imports this module)

    path = Path(path)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else path.parent / T5_TOKENIZER_DIR
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the official umT5 encoder weights, {T5_FILE})")
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(
            f"{tokenizer_dir}: no such folder (the umT5 tokenizer, {T5_TOKENIZER_DIR}/ of the "
            f"official download), needed with {path}"
        )
    model = load_official_t5_model(path, dtype, device)
    return UMT5Encoder.from_model(model, tokenizer_dir, text_len=text_len, device=device)


def official_folder_files(folder: str | Path) -> dict[str, Path]:
    """The text encoder / VAE files of an official download folder, by role ('t5', 'tokenizer',
    'vae'); raises naming the first file it needs and cannot find."""
    folder = Path(folder)
    vae = next((folder / f for f in (WAN22_VAE_FILE, WAN21_VAE_FILE) if (folder / f).is_file()), None)
    if vae is None:
        raise FileNotFoundError(f"{folder}: no {WAN21_VAE_FILE} or {WAN22_VAE_FILE} (the official VAE weights)")
    if not (folder / T5_FILE).is_file():
        raise FileNotFoundError(f"{folder / T5_FILE}: no such file (the official umT5 encoder weights)")
    if not (folder / T5_TOKENIZER_DIR).is_dir():
        raise FileNotFoundError(f"{folder / T5_TOKENIZER_DIR}: no such folder (the umT5 tokenizer)")
    return {"t5": folder / T5_FILE, "tokenizer": folder / T5_TOKENIZER_DIR, "vae": vae}
