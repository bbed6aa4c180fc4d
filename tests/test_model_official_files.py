"""Official Wan repository files (`Wan2.x_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`) <-> diffusers'
AutoencoderKLWan / transformers' UMT5EncoderModel: key maps both ways, loading, errors.

The key layouts were checked by hand against the official modules themselves (Wan2.2
wan/modules/vae2_1.py, vae2_2.py, t5.py built small with random weights: outputs through our
mapping equal theirs bit for bit); here the official key sets of the real configurations are
pinned by count and a CRC of the sorted names taken from those modules.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from titan_world.config import load_config
from titan_world.model import official
from titan_world.model.codec import WanVAECodec, build_codec
from titan_world.model.io import CheckpointError
from titan_world.model.text_encoder import TinyTextEncoder, UMT5Encoder, build_text_encoder

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# (layout, number of official keys, crc32 of the sorted official key names, parameters)
REAL_VAES = {
    "Wan2.1_VAE.pth": (
        official.VAELayout(96, 96, 16, (1, 2, 4, 4), 2, (False, True, True), False),
        194,
        2383391375,
        126_892_531,
    ),
    "Wan2.2_VAE.pth": (
        official.VAELayout(160, 256, 48, (1, 2, 4, 4), 2, (False, True, True), True),
        196,
        1698115950,
        704_688_668,
    ),
}
# a few names as the official code spells them (wan/modules/vae2_1.py, vae2_2.py)
OFFICIAL_VAE_KEYS = {
    "Wan2.1_VAE.pth": {
        "encoder.downsamples.2.resample.1.weight": "encoder.down_blocks.2.resample.1.weight",
        "encoder.downsamples.8.time_conv.bias": "encoder.down_blocks.8.time_conv.bias",
        "encoder.middle.1.to_qkv.weight": "encoder.mid_block.attentions.0.to_qkv.weight",
        "decoder.upsamples.4.shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.upsamples.7.time_conv.weight": "decoder.up_blocks.1.upsamplers.0.time_conv.weight",
        "decoder.head.2.weight": "decoder.conv_out.weight",
        "conv1.weight": "quant_conv.weight",
    },
    "Wan2.2_VAE.pth": {
        "encoder.downsamples.1.downsamples.2.time_conv.weight": "encoder.down_blocks.1.downsampler.time_conv.weight",
        "encoder.downsamples.0.downsamples.1.residual.3.gamma": "encoder.down_blocks.0.resnets.1.norm2.gamma",
        "decoder.upsamples.0.upsamples.3.time_conv.weight": "decoder.up_blocks.0.upsampler.time_conv.weight",
        "decoder.upsamples.2.upsamples.0.shortcut.weight": "decoder.up_blocks.2.resnets.0.conv_shortcut.weight",
        "conv2.bias": "post_quant_conv.bias",
    },
}


def _crc(keys) -> int:
    return zlib.crc32("\n".join(sorted(keys)).encode())


@pytest.mark.parametrize("name", sorted(REAL_VAES))
def test_real_vae_layouts_map_every_official_key_onto_diffusers(name):
    layout, count, crc, params = REAL_VAES[name]
    kmap = official.vae_key_map(layout)
    assert (len(kmap), _crc(kmap)) == (count, crc)
    for o, d in OFFICIAL_VAE_KEYS[name].items():
        assert kmap[o] == d
    with torch.device("meta"):
        vae = diffusers.AutoencoderKLWan(**layout.diffusers_config())
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert set(kmap.values()) == set(shapes)
    assert sum(torch.Size(shapes[d]).numel() for d in kmap.values()) == params
    # the layout is read back off the official names and shapes alone
    assert official.vae_layout_from_official({o: shapes[d] for o, d in kmap.items()}) == layout
    stride = vae.config.scale_factor_spatial
    assert stride == (16 if layout.is_residual else 8)


def test_umt5_xxl_official_keys_map_onto_transformers():
    kmap = official.t5_key_map(24)
    assert (len(kmap), _crc(kmap)) == (242, 4010791426)
    assert kmap["blocks.23.ffn.gate.0.weight"] == "encoder.block.23.layer.1.DenseReluDense.wi_0.weight"
    assert kmap["blocks.0.pos_embedding.embedding.weight"] == (
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    )
    shapes = {
        "token_embedding.weight": (256384, 4096),
        "blocks.0.pos_embedding.embedding.weight": (32, 64),
        "blocks.0.attn.q.weight": (4096, 4096),
        "blocks.0.ffn.fc1.weight": (10240, 4096),
        "blocks.23.norm1.weight": (4096,),
    }
    cfg = official.t5_config_from_official(shapes)
    got = (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads)
    assert got == (256384, 4096, 64, 10240, 24, 64) and cfg.relative_attention_num_buckets == 32
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(cfg)
    assert set(kmap.values()) | {"encoder.embed_tokens.weight"} == set(model.state_dict())


def tiny_vae(residual: bool):
    torch.manual_seed(0)
    if residual:  # Wan2.2-style: residual blocks, 2x2 patches, its own decoder width
        vae = diffusers.AutoencoderKLWan(
            base_dim=8,
            decoder_base_dim=12,
            z_dim=6,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            latents_mean=[0.0] * 6,
            latents_std=[1.0] * 6,
        )
    else:
        vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    with torch.no_grad():  # non-trivial norms and zero-initialised projections
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vae.eval()


@pytest.mark.parametrize("residual", [False, True], ids=["wan2.1", "wan2.2"])
def test_vae_roundtrip_and_saved_pth_gives_the_same_video(tmp_path, residual):
    vae = tiny_vae(residual)
    state = official.diffusers_vae_to_official(vae)
    config, back = official.official_vae_to_diffusers(state)
    assert set(back) == set(vae.state_dict()) and all(torch.equal(back[k], v) for k, v in vae.state_dict().items())
    for k in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "is_residual", "patch_size"):
        assert config[k] == vae.config[k], k
    assert ("encoder.downsamples.0.downsamples.0.residual.0.gamma" in state) == residual

    path = tmp_path / ("Wan2.2_VAE.pth" if residual else "Wan2.1_VAE.pth")
    official.save_official_vae(vae, path)
    loaded = official.load_official_vae(path)
    assert not any(p.is_meta for p in loaded.parameters())
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode(x).latent_dist.mode(), vae.encode(x).latent_dist.mode(), rtol=0, atol=0
        )
        side = 32 // vae.config.scale_factor_spatial
        z = torch.randn(1, vae.config.z_dim, 2, side, side)
        torch.testing.assert_close(loaded.decode(z).sample, vae.decode(z).sample, rtol=0, atol=0)

    codec = build_codec("wan_vae", path=str(path))  # data.codec.kind=wan_vae data.codec.path=Wan2.x_VAE.pth
    assert isinstance(codec, WanVAECodec)
    assert codec.stride == ((4, 16, 16) if residual else (4, 8, 8)) and codec.latent_channels == vae.config.z_dim
    assert codec.encode(x).shape == (1, vae.config.z_dim, 2, 32 // codec.stride[1], 32 // codec.stride[2])


def test_vae_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth"):
        build_codec("wan_vae", path=str(tmp_path / "Wan2.1_VAE.pth"))
    with pytest.raises(FileNotFoundError, match="diffusers VAE folder"):
        build_codec("wan_vae", path=str(tmp_path))
    state = official.diffusers_vae_to_official(tiny_vae(False))
    del state["decoder.head.2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"partial\.pth.*missing keys: decoder\.conv_out\.weight"):
        official.load_official_vae(tmp_path / "partial.pth")
    torch.save({"token_embedding.weight": torch.zeros(3, 4)}, tmp_path / "t5.pth")
    with pytest.raises(CheckpointError, match="not a Wan VAE"):
        official.load_official_vae(tmp_path / "t5.pth")


def tiny_umt5(tmp_path):
    """A small random umT5 encoder plus a (word-level) tokenizer folder where the official download has
    google/umt5-xxl/."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    words = "a red cube moves left then the blue sphere rolls right past camera".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "google" / "umt5-xxl"
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(tok_dir)
    cfg = transformers.UMT5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
    )
    model = transformers.UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model, tok_dir


def test_t5_roundtrip_and_official_files_encode_as_the_model(tmp_path):
    model, tok_dir = tiny_umt5(tmp_path)
    state = official.transformers_t5_to_official(model)
    assert "token_embedding.weight" in state and "blocks.1.ffn.fc2.weight" in state and len(state) == 2 + 2 * 10
    cfg, back = official.official_t5_to_transformers(state)
    assert set(back) == set(model.state_dict()) and all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert (cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.num_layers, cfg.d_ff) == (32, 8, 4, 2, 48)

    pth = tmp_path / official.T5_FILE
    official.save_official_t5(model, pth)
    loaded = official.load_official_t5_model(pth, dtype=torch.float32)
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).last_hidden_state,
            model(input_ids=ids, attention_mask=mask).last_hidden_state,
            rtol=0,
            atol=0,
        )

    # data.text_encoder.path = the .pth (tokenizer google/umt5-xxl/ beside it) or the folder holding both
    prompts = ["a red cube moves left", "the blue sphere rolls right past the camera"]
    reference = UMT5Encoder.from_model(model, tok_dir, text_len=16)
    for path in (pth, tmp_path):
        enc = build_text_encoder("umt5", text_dim=32, text_len=16, path=str(path), dtype=torch.float32)
        out = enc.encode(prompts)
        assert out.shape == (2, 16, 32) and out.abs().sum() > 0
        torch.testing.assert_close(out, reference.encode(prompts), rtol=0, atol=0)
        assert (out[0, 6:] == 0).all()  # zero past the prompt, as Wan pads


def test_a_real_model_never_gets_the_tiny_text_encoder_unasked(tmp_path):
    cfg = load_config("train/a14b_8gpu.yaml", [])  # the default data.text_encoder with a real model
    with pytest.raises(ValueError, match="text_dim 4096"):
        build_text_encoder(
            cfg.data.text_encoder.kind, cfg.model.text_dim, cfg.model.text_len, cfg.data.text_encoder.path
        )
    assert isinstance(build_text_encoder("auto", text_dim=64, text_len=32), TinyTextEncoder)  # the tiny model
    with pytest.raises(ValueError, match=f"text_dim 4096.*{official.T5_FILE}.*kind=tiny"):
        build_text_encoder("auto", text_dim=4096, text_len=512)
    assert isinstance(build_text_encoder("tiny", text_dim=4096, text_len=512), TinyTextEncoder)  # asked for by name
    (tmp_path / official.T5_FILE).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl"):
        build_text_encoder("auto", text_dim=4096, text_len=512, path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_text_encoder("umt5", text_dim=4096, text_len=512, path=str(tmp_path / "missing.pth"))
