"""TinyCodec: exact when channels=0; with K channels a compressing, orthogonal low-pass codec."""

from __future__ import annotations

import math

import pytest
import torch

from titan_world.data.synth import make_episode
from titan_world.model.codec import TinyCodec, check_frame_count, low_frequency_basis


def _video() -> torch.Tensor:
    ep = make_episode(5, 64, 64, 2.0)
    return torch.from_numpy(ep.frames[:17]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def test_exact_codec_round_trips_bit_for_bit():
    v = _video()
    codec = TinyCodec(4)
    lat = codec.encode(v)
    assert lat.shape == (1, 192, 5, 16, 16)
    assert torch.equal(codec.decode(lat), v)


def test_lossy_codec_is_a_projection_with_good_reconstruction():
    v = _video()
    codec = TinyCodec(4, 16)
    lat = codec.encode(v)
    assert lat.shape == (1, 16, 5, 16, 16)
    rec = codec.decode(lat)
    psnr = 10 * math.log10(4 / (rec - v).pow(2).mean().item())
    assert psnr > 14  # a low-pass image of a textured scene (16.6 dB here), far from noise (< 8 dB)
    torch.testing.assert_close(codec.encode(rec), lat, rtol=0, atol=1e-4)  # re-encoding is a no-op
    assert torch.allclose(codec.compress(TinyCodec(4).encode(v)), lat, atol=1e-6)  # stored exact -> compress
    basis = low_frequency_basis(4, 16).double()
    gram = basis @ basis.T
    assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-5)  # orthogonal rows


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        check_frame_count(16)
    with pytest.raises(ValueError, match="channels=500"):
        TinyCodec(4, 500).encode(_video())
    with pytest.raises(ValueError, match="expects 16"):
        TinyCodec(4, 16).decode(torch.zeros(1, 8, 2, 4, 4))


def test_tiny_stream_decoder_equals_decoding_the_whole_stream():
    codec = TinyCodec(4, 16)
    lat = codec.encode(_video())  # 5 latent frames
    stream = codec.stream_decoder()
    parts = [stream.decode(lat[:, :, :1]), stream.decode(lat[:, :, 1:3]), stream.decode(lat[:, :, 3:])]
    assert [p.shape[2] for p in parts] == [1, 8, 8]
    torch.testing.assert_close(torch.cat(parts, 2), codec.decode(lat), rtol=0, atol=1e-6)


def tiny_wan_vae(path) -> None:
    """A small random-weight Wan VAE saved where `WanVAECodec` loads from (the real loading path;
    weights do not matter for what these tests check)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).save_pretrained(path)


def test_wan_stream_decoder_equals_one_decode_of_the_stream(tmp_path):
    """Chunk by chunk through the causal cache == diffusers' decode of all latents at once; a fresh
    decoder per chunk with one latent of context (the old stateless way) leaves seams."""
    from titan_world.model.codec import ContextStreamDecoder, WanStreamDecoder, WanVAECodec

    tiny_wan_vae(tmp_path / "vae")
    codec = WanVAECodec(str(tmp_path / "vae"))
    lat = torch.randn(1, 16, 7, 4, 4)
    whole = codec.decode(lat)
    assert whole.shape == (1, 3, 25, 32, 32)
    stream = codec.stream_decoder()
    assert isinstance(stream, WanStreamDecoder)
    parts = [stream.decode(lat[:, :, s:e]) for s, e in ((0, 1), (1, 4), (4, 7))]
    assert [p.shape[2] for p in parts] == [1, 12, 12]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-5)
    assert stream.nbytes() > 0
    restarted = ContextStreamDecoder(codec)  # the per-chunk restart
    restarted.decode(lat[:, :, 3:4])
    seam = (restarted.decode(lat[:, :, 4:7]) - whole[:, :, 13:]).abs().max()
    assert seam > 1e-3, "a restarted decoder must differ from the causal one (else this test shows nothing)"
