"""The light streaming decoder (serving.light_decoder): stream == clip, persistence, errors,
distillation from the codec, and the serving engine decoding with it."""

from __future__ import annotations

import json

import pytest
import torch

from launch.cli import main
from titan_world.model.codec import TinyCodec
from titan_world.model.light_decoder import (
    LightDecodedCodec,
    LightDecoder,
    LightDecoderConfig,
    LightStreamDecoder,
    load_light_decoder,
    save_light_decoder,
)

SMALL = [
    "data.height=32",
    "data.width=32",
    "data.synth_episodes=4",
    "data.synth_seconds=1.0",
    "run.progress=false",
    "run.wandb=disabled",
]


def _decoder(seed: int = 0, **kw) -> LightDecoder:
    torch.manual_seed(seed)
    return LightDecoder(
        LightDecoderConfig(**{"latent_channels": 16, "spatial_stride": 4, "width": 24, "depth": 1, **kw})
    ).eval()


def test_stream_decoding_equals_one_decode_of_the_clip():
    d = _decoder()
    z = torch.randn(2, 16, 6, 5, 7)
    with torch.no_grad():
        clip = d(z).clamp(-1, 1)
    assert clip.shape == (2, 3, 1 + 4 * 5, 20, 28)  # the first latent frame is one video frame
    stream = LightStreamDecoder(d)
    parts = [stream.decode(z[:, :, a:b]) for a, b in ((0, 1), (1, 3), (3, 6))]
    assert [p.shape[2] for p in parts] == [1, 8, 12]
    torch.testing.assert_close(torch.cat(parts, 2), clip, rtol=1e-5, atol=1e-6)
    assert stream.nbytes() == z[:, :, :1].numel() * 4


def test_save_load_roundtrip_and_clear_errors(tmp_path):
    d = _decoder(1)
    save_light_decoder(d, tmp_path / "run" / "decoder", teacher="tiny")
    loaded = load_light_decoder(tmp_path / "run")  # a run dir holding decoder/
    z = torch.randn(1, 16, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), d(z), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_light_decoder(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "WanModel"}))
    with pytest.raises(ValueError, match="not a light decoder"):
        load_light_decoder(tmp_path / "other")
    with pytest.raises(ValueError, match="expects 16 latent channels at stride 4; the codec gives 192 at stride 4"):
        LightDecodedCodec(TinyCodec(4, 0), d)
    with pytest.raises(ValueError, match="power of two"):
        LightDecoderConfig(spatial_stride=6).validate()


def test_distilled_decoder_learns_the_codec(tmp_path, capsys):
    """A few dozen CPU steps take it from noise to a close copy of the tiny codec's decode."""
    run = tmp_path / "run"
    args = [
        "distill-decoder",
        f"run.dir={run}",
        f"data.path=synthetic:{tmp_path / 'data'}",
        "decoder.steps=60",
        "decoder.width=32",
        "decoder.depth=1",
        "decoder.eval_batches=2",
        *SMALL,
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "serving.light_decoder=" in out
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    result = json.loads((run / "decoder_metrics.json").read_text())
    assert result["psnr_vs_teacher_db"] > 18.0, result
    decoder = load_light_decoder(run)
    assert decoder.cfg.latent_channels == 16 and decoder.cfg.spatial_stride == 4  # the tiny codec's interface


def test_serving_engine_streams_through_the_light_decoder(tmp_path):
    from serving.loading import build_engine
    from titan_world.config import load_config
    from titan_world.model.codec import video_to_frames

    d = _decoder(2, spatial_stride=4)
    save_light_decoder(d, tmp_path / "dec")
    cfg = load_config(
        None,
        ["data.height=32", "data.width=32", f"serving.light_decoder={tmp_path / 'dec'}", "serving.checkpoint=null"],
    )
    engine = build_engine(cfg)
    assert isinstance(engine.codec, LightDecodedCodec)
    session = engine.start(None, "a red house", seed=0)
    chunks = [session.denoise(torch.zeros(4, 8)) for _ in range(3)]
    frames = [session.decode(c) for c in chunks]
    # what the engine sent == the light decoder run over the session's latents as one stream
    latents = torch.cat([session.start_latents] + [c.payload.latents for c in chunks], 2)
    with torch.no_grad():
        whole = video_to_frames(d(latents).clamp(-1, 1))[0]
    start = session.start_latents.shape[2]
    sent = torch.from_numpy(whole[1 + 4 * (start - 1) :])
    import numpy as np

    assert np.array_equal(np.concatenate(frames), sent.numpy())
    bad = load_config(None, ["data.height=32", "data.width=32", f"serving.light_decoder={tmp_path / 'nope'}"])
    from serving.engine import EngineError

    with pytest.raises(EngineError, match="serving.light_decoder=.*nope.*no config.json"):
        build_engine(bad)


def test_distills_from_the_wan_vae(tmp_path):
    """The real teacher path: a dataset encoded by a (small, random) Wan VAE and distillation
    against its decode; the result plugs into that codec."""
    from test_model_codec import tiny_wan_vae

    from titan_world.model.codec import WanVAECodec

    tiny_wan_vae(tmp_path / "vae")
    run = tmp_path / "run"
    args = [
        "distill-decoder",
        f"run.dir={run}",
        f"data.path=synthetic:{tmp_path / 'data'}",
        "data.codec.kind=wan_vae",
        f"data.codec.path={tmp_path / 'vae'}",
        "model.action.spatial_stride=8",
        "decoder.steps=20",
        "decoder.eval_batches=1",
        *SMALL,
    ]
    assert main(args) == 0
    result = json.loads((run / "decoder_metrics.json").read_text())
    assert result["teacher"].startswith("wan_vae:") and result["teacher_decoder_params"] > 0
    codec = LightDecodedCodec(WanVAECodec(str(tmp_path / "vae")), load_light_decoder(run))  # same latent interface
    assert codec.decode(torch.randn(1, 16, 2, 4, 4)).shape == (1, 3, 5, 32, 32)
