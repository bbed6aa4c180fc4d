"""Memory planner: the published Wan sizes (param counts, token counts) and sane monotonic behaviour."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from parallel.planner import format_plan, format_recommendations, num_tokens, param_count, plan, recommend
from titan_world.config import resolve_config_path
from titan_world.model.config import ModelConfig


def _cfg(name: str) -> ModelConfig:
    return OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(resolve_config_path(f"model/{name}")))
    )


def test_counts_match_design():
    assert num_tokens(81, 480, 832) == 32_760
    assert num_tokens(961, 480, 832) == 375_960
    assert param_count(_cfg("wan2.2-i2v-a14b")) / 1e9 == pytest.approx(14.29, rel=0.01)
    assert param_count(_cfg("wan2.1-1.3b")) / 1e9 == pytest.approx(1.42, rel=0.01)


def test_plan_scales_and_formats():
    a14 = _cfg("wan2.2-i2v-a14b")
    one = plan(a14, 961, 480, 832, cp=1, ac="full")
    eight = plan(a14, 961, 480, 832, cp=8, ac="full")
    assert not one.fits and eight.fits
    assert eight.gb["activations"] < one.gb["activations"] / 7
    assert (
        plan(a14, 81, 480, 832, dp_shard=8, ac="none").gb["activations"]
        > plan(a14, 81, 480, 832, dp_shard=8, ac="full").gb["activations"]
    )
    assert "fits" in format_plan(eight)
    with pytest.raises(ValueError, match="num_heads"):
        plan(a14, 81, 480, 832, cp=3)


def test_recommendation_per_stage():
    recs = recommend(_cfg("wan2.2-i2v-a14b"), [("5s", 81), ("60s", 961)])
    assert all(p is not None and p.fits for _, p in recs)
    assert recs[1][1].cp >= recs[0][1].cp
    assert "60s" in format_recommendations(recs)


@pytest.mark.parametrize("name", ["tiny", "wan2.1-1.3b", "wan2.2-i2v-a14b"])
def test_param_count_formula_matches_the_model(name):
    """The planner's closed-form count (one expert: a job trains one) must equal the real module's
    (built on meta: no memory), so a change to the model cannot silently skew the memory plan."""
    import torch

    from titan_world.model import build_model

    cfg = _cfg(name)
    with torch.device("meta"):
        model = build_model(cfg)
    real = sum(p.numel() for p in model.parameters()) // cfg.num_experts
    assert param_count(cfg) == real


def test_cluster_prediction_picks_the_smallest_fitting_cp():
    from parallel.planner import cluster_prediction

    a14 = _cfg("wan2.2-i2v-a14b")
    five = cluster_prediction(a14, 81, 64, 480, 832, flops_per_sample=3.0e15, tflops=400.0)
    assert five["cp"] == 1 and five["a2a_s"] == 0.0 and five["global_batch"] == 64
    assert five["step_s"] == pytest.approx(3.0e15 / 400e12)  # FSDP traffic (2.25 s) hides under 7.5 s of compute
    sixty = cluster_prediction(a14, 961, 64, 480, 832, flops_per_sample=3.7e17, tflops=400.0)
    assert sixty["cp"] > 1 and sixty["gb_per_gpu"] <= 80.0
    assert not plan(a14, 961, 480, 832, dp_shard=64 // (sixty["cp"] // 2), cp=sixty["cp"] // 2).fits
    assert sixty["step_s"] > sixty["compute_s"] > 0  # the all-to-all is on the critical path
    assert cluster_prediction(a14, 961, 1, 480, 832, flops_per_sample=3.7e17, tflops=400.0) is None


def test_ac_skip_spends_spare_memory_up_to_the_limit():
    """parallel.ac_skip_last: each un-checkpointed block costs its activations; `max_ac_skip` is the
    last count that still fits (1.3B at 480p x 81 on one 80 GB GPU: about half the blocks)."""
    from parallel.planner import max_ac_skip

    c = _cfg("wan2.1-1.3b")
    acts = [plan(c, 81, 480, 832, ac="attention", ac_skip_last=k).gb["activations"] for k in (0, 1, 10, c.num_layers)]
    assert acts == sorted(acts) and acts[-1] == pytest.approx(plan(c, 81, 480, 832, ac="none").gb["activations"])
    k = max_ac_skip(c, 81, 480, 832, ac="attention")
    assert 0 < k < c.num_layers
    assert plan(c, 81, 480, 832, ac="attention", ac_skip_last=k).fits
    assert not plan(c, 81, 480, 832, ac="attention", ac_skip_last=k + 1).fits
    assert max_ac_skip(_cfg("wan2.2-i2v-a14b"), 961, 480, 832, ac="full") is None  # 60 s on one GPU: nothing fits
