"""`titan-world convert` both ways: converted weights reproduce diffusers' own outputs."""

from __future__ import annotations

import functools

import torch

from launch.cli import main
from titan_world.model import WanDiT, WanMoE, load_pretrained, save_pretrained
from titan_world.model.config import ModelConfig


def _model(seed: int) -> WanDiT:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        name="t",
        model_type="i2v",
        dim=48,
        ffn_dim=96,
        num_heads=4,
        num_layers=2,
        in_dim=20,
        out_dim=8,
        text_dim=16,
        text_len=8,
    )
    m = WanDiT(cfg).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    return m


def test_convert_roundtrip_matches_diffusers(tmp_path, monkeypatch):
    from diffusers import WanTransformer3DModel

    import titan_world.model.dit as dit

    model = _model(0)
    save_pretrained(model, tmp_path / "wan")
    assert main(["convert", "--to", "diffusers", str(tmp_path / "wan"), str(tmp_path / "diff")]) == 0
    import json

    from safetensors.torch import load_file

    config = json.loads((tmp_path / "diff" / "config.json").read_text())
    ref = WanTransformer3DModel.from_config(config).eval()  # from_pretrained needs `accelerate`
    ref.load_state_dict(load_file(str(tmp_path / "diff" / "diffusion_pytorch_model.safetensors")), strict=True)
    assert main(["convert", "--from", "diffusers", str(tmp_path / "diff"), str(tmp_path / "back")]) == 0
    back = load_pretrained(tmp_path / "back")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # diffusers computes the timestep sinusoid in float32 (we use float64 like Wan): match it here
    monkeypatch.setattr(dit, "sinusoidal_embedding", functools.partial(dit.sinusoidal_embedding, dtype=torch.float32))
    x, cond, ctx, t = (
        torch.randn(1, 8, 2, 8, 8),
        torch.randn(1, 12, 2, 8, 8),
        torch.randn(1, 8, 16),
        torch.tensor([640.0]),
    )
    with torch.no_grad():
        torch.testing.assert_close(
            back(x, t, ctx, cond=cond), ref(torch.cat([x, cond], 1), t, ctx, return_dict=False)[0], rtol=1e-4, atol=1e-4
        )


def test_convert_moe_root_and_errors(tmp_path, capsys):
    moe = WanMoE(_model(1), _model(2), 0.9)
    save_pretrained(moe, tmp_path / "moe")
    assert main(["convert", "--to", "diffusers", str(tmp_path / "moe"), str(tmp_path / "moe_diff")]) == 0
    assert (tmp_path / "moe_diff" / "low_noise_model" / "config.json").is_file()
    assert main(["convert", "--from", "diffusers", str(tmp_path / "moe"), str(tmp_path / "x")]) == 2
    assert "not a diffusers" in capsys.readouterr().err
    assert main(["convert", "--to", "diffusers", str(tmp_path / "missing"), str(tmp_path / "y")]) == 2


def test_lazy_state_is_written_one_shard_at_a_time(tmp_path, monkeypatch):
    """Converting a 57 GB fp32 expert must not hold it on the host: a LazyState is read tensor by
    tensor and each shard is written (and dropped) as soon as it is full."""
    import titan_world.model.io as io

    model = _model(3)
    save_pretrained(model, tmp_path / "wan")
    source = io.WeightFolder(tmp_path / "wan")
    read, save_file, reads, saved, pending = io.WeightFolder.read, io.save_file, [0], [0], []

    def counting_read(self, name, region=None):
        reads[0] += 1
        return read(self, name, region)

    def counting_save(tensors, path, **kw):
        pending.append((reads[0] - saved[0], len(tensors)))  # read but not yet written, vs this shard
        saved[0] += len(tensors)
        save_file(tensors, path, **kw)

    monkeypatch.setattr(io.WeightFolder, "read", counting_read)
    monkeypatch.setattr(io, "save_file", counting_save)
    names = {name: name for name in source.sources}
    io.save_state_dict(
        io.LazyState(source, names), tmp_path / "copy", io.config_json(model.cfg), max_shard_bytes=20_000
    )
    # at most the shard plus the tensor that did not fit in it
    assert len(pending) > 2 and all(held <= n + 1 for held, n in pending), pending
    copy = load_pretrained(tmp_path / "copy")
    for k, v in model.state_dict().items():
        assert torch.equal(copy.state_dict()[k], v), k


def test_dcp_run_exports_to_a_folder_our_loader_reads(tmp_path):
    """`--to safetensors`: the newest DCP checkpoint of a run, through the one shard writer, loads back exactly."""
    from omegaconf import OmegaConf

    from parallel.checkpoint import Checkpointer
    from titan_world.config import TitanConfig

    model = _model(3)
    Checkpointer(tmp_path / "run").save(2, {"model": model})
    OmegaConf.save(OmegaConf.structured(TitanConfig(model=model.cfg)), tmp_path / "run" / "config.yaml")
    assert main(["convert", "--to", "safetensors", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    copy = load_pretrained(tmp_path / "out")
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in model.state_dict().items())
