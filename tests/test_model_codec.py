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
