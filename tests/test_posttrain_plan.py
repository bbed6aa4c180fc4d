"""Post-training stage-2 memory plan: its exact pieces equal what the code allocates (the rollout's
KV cache, the GAN head), the A14B numbers of docs/posttrain.md, mesh choice, and the CLI."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from titan_world.config import load_config, resolve_config_path
from titan_world.model.config import ModelConfig
from titan_world.posttrain.config import PostTrainConfig
from titan_world.posttrain.plan import gan_head_params, kv_cache_bytes, posttrain_plan, smallest_mesh


def _a14b() -> tuple[ModelConfig, PostTrainConfig]:
    cfg = load_config("posttrain/a14b_8gpu.yaml")
    cfg.model.num_experts = 1  # the student: one expert
    return cfg.model, cfg.posttrain


def _model(name: str) -> ModelConfig:
    return OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(resolve_config_path(f"model/{name}")))
    )


@pytest.mark.parametrize("blocks,queries", [(2, 4), (4, 3)])
def test_gan_head_formula_is_the_module(blocks, queries):
    from titan_world.posttrain.gan import GANHead

    assert gan_head_params(96, blocks, queries) == sum(p.numel() for p in GANHead(96, blocks, queries).parameters())


def test_kv_cache_formula_is_what_a_rollout_allocates(monkeypatch):
    """The rollout's own cache (captured from a real self_rollout) has the planned size."""
    from titan_world.model import build_model
    from titan_world.posttrain import rollout as rollout_mod
    from titan_world.posttrain.causal import ChunkLayout
    from titan_world.posttrain.rollout import RolloutInputs, self_rollout

    cfg = _model("tiny")
    cfg.action.enabled = False
    model = build_model(cfg)
    p = PostTrainConfig(chunk_frames=2, sink_frames=1, window_frames=3)
    made = []
    real = rollout_mod.KVCache

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(rollout_mod, "KVCache", spy)
    b, h = 2, 8  # 8x8 latents -> 4x4 = 16 tokens per frame
    lay = ChunkLayout(1 + 3 * p.chunk_frames, 1, p.chunk_frames)
    inp = RolloutInputs(torch.randn(b, cfg.out_dim, 1, h, h), torch.randn(b, 4, cfg.text_dim), None, lay)
    with torch.no_grad():
        self_rollout(
            model,
            inp,
            [1.0, 0.5],
            torch.Generator().manual_seed(0),
            sink_frames=p.sink_frames,
            window_frames=p.window_frames,
        )
    assert len(made) == 1
    assert made[0].nbytes() == kv_cache_bytes(cfg, p, tokens_per_frame=16, cp=1, batch=b, bytes_per=4)


def test_a14b_numbers_of_the_memory_plan():
    student, p = _a14b()
    eight = posttrain_plan(student, p, 480, 832, gpus=8, cp=1, teacher_experts=2, teacher_bytes=2, ac="none")
    assert eight.tokens_per_frame == 1560
    assert eight.state_gb["student"] == pytest.approx(28.6, abs=0.1)
    assert eight.state_gb["student_ema"] == pytest.approx(7.1, abs=0.1)  # posttrain.ema_decay 0.99: fp32 shards
    assert eight.state_gb["fake_score"] == pytest.approx(50.0, abs=0.1)
    assert eight.state_gb["teacher"] == pytest.approx(7.1, abs=0.1)
    assert eight.state_gb["gan_head"] == pytest.approx(1.7, abs=0.1)
    assert eight.phases_gb["kv_cache"] == pytest.approx(30.7, abs=0.1)
    assert eight.phases_gb["recorded_passes"] == pytest.approx(238, abs=1)  # no AC: 3 x (48.7 + 30.7)
    assert not eight.fits
    no_ac = posttrain_plan(
        student, p, 480, 832, gpus=8, cp=8, teacher_experts=2, teacher_bytes=2, ac="none", gpu_mem_gb=141
    )
    assert no_ac.phases_gb["kv_cache"] == pytest.approx(eight.phases_gb["kv_cache"] / 8)
    assert no_ac.phases_gb["recorded_passes"] == pytest.approx(eight.phases_gb["recorded_passes"] / 8)
    full = posttrain_plan(
        student, p, 480, 832, gpus=8, cp=8, teacher_experts=2, teacher_bytes=2, ac="full", gpu_mem_gb=141
    )
    assert no_ac.phases_gb["fake_grad_pass"] > 10 * full.phases_gb["fake_grad_pass"]
    # full AC: per recorded pass the blocks' inputs (1.92 GB) + the cache snapshot (26.8 GB),
    # + one block recomputed (1.22 GB), / 8
    assert full.phases_gb["recorded_passes"] == pytest.approx((3 * (1.92 + 26.8) + 1.22) / 8, rel=0.01)
    assert 115 < full.student_step_gb < 122 and full.fits  # one node of H200s


def test_smallest_mesh_for_a14b():
    student, p = _a14b()
    kw = dict(teacher_experts=2, teacher_bytes=2, ac="full")
    h100 = smallest_mesh(student, p, 480, 832, gpu_mem_gb=80, **kw)
    h200 = smallest_mesh(student, p, 480, 832, gpu_mem_gb=141, **kw)
    assert (h100.gpus, h100.cp) == (16, 8) and h100.fits
    assert (h200.gpus, h200.cp) == (8, 4) and h200.fits
    assert smallest_mesh(student, p, 480, 832, gpu_mem_gb=20, max_gpus=64, **kw) is None


def test_plan_refuses_a_cp_that_does_not_split_heads_or_frames():
    student, p = _a14b()
    with pytest.raises(ValueError, match="40 attention heads"):
        posttrain_plan(student, p, 480, 832, gpus=6, cp=3)
    with pytest.raises(ValueError, match="49 tokens"):  # 112x112 / 8 / 2 = 7x7
        posttrain_plan(student, p, 112, 112, gpus=8, cp=8)


def test_inspect_posttrain_cli(capsys):
    from launch.cli import main

    assert main(["inspect", "posttrain/a14b_8gpu.yaml", "--posttrain"]) == 0
    out = capsys.readouterr().out
    assert "smallest mesh" in out and "16 GPUs" in out and "cp=8" in out and "fits in 80 GB" in out
    assert main(["inspect", "posttrain/a14b_8gpu.yaml", "--posttrain", "--gpus", "8", "--cp", "8"]) == 0
    assert "does NOT fit in 80 GB" in capsys.readouterr().out
    assert main(["inspect", "posttrain/a14b_8gpu.yaml", "--posttrain", "--gpus", "8", "--cp", "3"]) == 2
    assert "divisible" in capsys.readouterr().err
