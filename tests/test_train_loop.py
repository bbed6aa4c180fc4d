"""Trainer: loss falls, exact resume (stage + step + data position), NaN handling, corrupt
checkpoints, MoE expert sync, config errors, FLOPs. Tiny: 32x32 frames, 2-sample batches."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from titan_world.config import load_config
from titan_world.exit_codes import EXIT_DIVERGED, EXIT_PREEMPTED
from titan_world.train.loop import plan_stages, train

BASE = [
    "data.height=32",
    "data.width=32",
    "data.synth_episodes=6",
    "data.synth_seconds=2.0",
    "run.wandb=disabled",
    "run.progress=false",
    "train.global_batch=2",
    "train.lr=1e-3",
    "train.warmup_steps=2",
    "train.stages.0.steps=6",
    "train.stages.1.steps=6",
    "train.ckpt_every=4",
    "model.num_layers=2",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    from titan_world.data.loader import prepare_dataset

    path = str(tmp_path_factory.mktemp("train_data") / "synthetic")
    prepare_dataset(load_config(None, [*BASE, f"data.path=synthetic:{path}"]), progress=False)
    return path


def cfg_for(data_dir: str, run_dir: Path, *extra: str):
    return load_config(None, [*BASE, f"data.path=synthetic:{data_dir}", f"run.dir={run_dir}", *extra])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted 12-step, two-stage run (checkpoints at 4, 8, 12)."""
    run_dir = tmp_path_factory.mktemp("ref")
    assert train(cfg_for(data_dir, run_dir)) == 0
    return run_dir


def test_reference_run_outputs(reference):
    recs = metrics(reference)
    assert [r["step"] for r in recs] == list(range(12))
    assert [r["stage"] for r in recs] == ["1s"] * 6 + ["2s"] * 6
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "model_tflops", "peak_mem_gb"):
        assert all(r[key] is not None and r[key] > 0 for r in recs), key
    assert all(r["mfu"] is None for r in recs)  # CPU: no peak table entry
    assert (reference / "config.yaml").is_file()
    assert (reference / "model" / "config.json").is_file()
    from titan_world.model import load_pretrained

    assert load_pretrained(reference / "model").cfg.num_layers == 2


def test_loss_goes_down(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = cfg_for(
        data_dir,
        run_dir,
        "train.stages.0.steps=60",
        "train.stages.1.steps=0",
        "train.steps=60",
        "train.ckpt_every=0",
        "train.export=false",
        "train.global_batch=4",
        "train.lr=2e-3",
    )
    assert train(cfg) == 0
    losses = [r["loss"] for r in metrics(run_dir)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)


def test_float8_run_trains_and_exports_plain_weights(data_dir, tmp_path, capsys):
    """parallel.float8: the blocks' GEMMs run in FP8, the loss falls as in fp32, and the exported
    checkpoint (same names and shapes) loads into a plain model."""
    from titan_world.model import load_pretrained

    run_dir = tmp_path / "run"
    cfg = cfg_for(
        data_dir,
        run_dir,
        "parallel.float8=rowwise",
        "train.stages.0.steps=60",
        "train.stages.1.steps=0",
        "train.steps=60",
        "train.ckpt_every=0",
        "train.global_batch=4",
        "train.lr=2e-3",
    )
    assert train(cfg) == 0
    assert "FP8 GEMMs (rowwise) in 20 linear layers" in capsys.readouterr().err  # 2 blocks x (4 + 4 + 2)
    losses = [r["loss"] for r in metrics(run_dir)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)
    plain = load_pretrained(run_dir / "model")
    assert type(plain.blocks[0].ffn[0]) is torch.nn.Linear


def test_preempted_run_resumes_to_identical_losses(data_dir, reference, tmp_path):
    run_dir = tmp_path / "run"
    assert train(cfg_for(data_dir, run_dir, "train.preempt_at_step=7")) == EXIT_PREEMPTED
    assert (run_dir / "checkpoints" / "step_00000007" / "COMPLETE").is_file()
    assert train(cfg_for(data_dir, run_dir), resume=True) == 0
    got, want = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in got] == list(range(12))
    assert [r["stage"] for r in got] == [r["stage"] for r in want]  # resumed into stage 2s at step 7
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # bit-exact


def test_resume_at_a_stage_boundary(data_dir, reference, tmp_path):
    run_dir = tmp_path / "run"
    assert train(cfg_for(data_dir, run_dir, "train.preempt_at_step=6")) == EXIT_PREEMPTED
    assert train(cfg_for(data_dir, run_dir), resume=True) == 0
    got = metrics(run_dir)
    assert got[6]["stage"] == "2s"
    assert [r["loss"] for r in got] == [r["loss"] for r in metrics(reference)]


def test_corrupt_latest_checkpoint_falls_back(data_dir, reference, tmp_path):
    run_dir = tmp_path / "run"
    assert train(cfg_for(data_dir, run_dir, "train.preempt_at_step=10")) == EXIT_PREEMPTED
    latest = run_dir / "checkpoints" / "step_00000010"
    victim = next(latest.glob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated shard: sizes no longer match COMPLETE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train(cfg_for(data_dir, run_dir), resume=True) == 0
    assert any("step_00000010" in str(w.message) for w in caught)
    # resumed from step 8: steps 8.. are redone and match the uninterrupted run
    assert [r["loss"] for r in metrics(run_dir)] == [r["loss"] for r in metrics(reference)]


def test_nan_loss_is_skipped_and_counted(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = cfg_for(data_dir, run_dir, "train.steps=6", "train.export=false")
    cfg.train.inject_nan_steps = [2, 3]  # (list overrides on the command line: see docs/train.md)
    assert train(cfg) == 0
    recs = metrics(run_dir)
    assert recs[2]["loss"] is None and recs[3]["loss"] is None
    assert recs[5]["skipped_total"] == 2 and recs[5]["loss"] is not None


def test_too_many_nans_stop_and_keep_last_good_checkpoint(data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = cfg_for(data_dir, run_dir, "train.ckpt_every=2", "train.max_bad_steps=2")
    cfg.train.inject_nan_steps = [3, 4, 5, 6, 7]
    assert train(cfg) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "3 consecutive non-finite losses" in err and "train.max_bad_steps=2" in err and "step_00000002" in err
    # no checkpoint is written inside the streak: step 2 (before the first NaN) stays the newest
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]
    assert not (run_dir / "model").exists()


def test_moe_expert_choice_is_synced_and_logged(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = cfg_for(data_dir, run_dir, "model.num_experts=2", "train.steps=6", "train.export=true", "train.ckpt_every=0")
    assert train(cfg) == 0
    experts = [r["expert"] for r in metrics(run_dir)]
    assert set(experts) <= {"high", "low"} and len(experts) == 6
    assert (run_dir / "model" / "high_noise_model").is_dir() and (run_dir / "model" / "moe.json").is_file()


def test_single_expert_sigma_range(data_dir, tmp_path):
    from titan_world.train.loop import Trainer

    cfg = cfg_for(data_dir, tmp_path / "run", "model.num_experts=2", "train.expert=high", "train.steps=1")
    trainer = Trainer(cfg)
    try:
        assert trainer._sigma_range(None) == (cfg.model.boundary, 1.0)
        assert not hasattr(trainer.model, "high")  # one expert per job: a dense network
    finally:
        trainer.loader.close()
        from parallel import destroy

        destroy()


def test_config_errors_before_work(data_dir, tmp_path, capsys):
    from launch.cli import main

    run_dir = tmp_path / "never"
    rc = main(["train", f"data.path=synthetic:{data_dir}", f"run.dir={run_dir}", "train.task=action_finetune"])
    assert rc == 2 and "train.base_checkpoint" in capsys.readouterr().err
    rc = main(
        ["train", "--nproc", "2", f"data.path=synthetic:{data_dir}", f"run.dir={run_dir}", "train.global_batch=3"]
    )
    assert rc == 2 and "train.global_batch=3" in capsys.readouterr().err
    rc = main(["train", f"run.dir={run_dir}", "train.stages.0.frames=18"])
    assert rc == 2 and "frames=18" in capsys.readouterr().err
    assert not run_dir.exists()


def test_plan_stages_truncates_and_extends():
    cfg = load_config(None, ["train.stages.0.steps=60", "train.stages.1.steps=40", "train.steps=70"])
    assert [(s.name, s.start, s.end) for s in plan_stages(cfg)] == [("1s", 0, 60), ("2s", 60, 70)]
    cfg = load_config(None, ["train.stages.0.steps=60", "train.steps=30"])
    assert [(s.name, s.start, s.end) for s in plan_stages(cfg)] == [("1s", 0, 30)]
    cfg = load_config(None, ["train.stages.0.steps=60", "train.stages.1.steps=40", "train.steps=150"])
    assert plan_stages(cfg)[-1].end == 150


def test_flops_formula_matches_design_reference():
    from omegaconf import OmegaConf

    from titan_world.model.config import ModelConfig
    from titan_world.model.flops import sample_flops

    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load("configs/model/wan2.1-1.3b.yaml"))
    )
    f = sample_flops(cfg, 21, 60, 104)
    assert f.tokens == 32760
    assert abs(f.train_step / 2.754 / 1e12 - 308) < 2  # benchmarks/RESULTS.md: diffusers' step = 308 model-TFLOP/s


def test_ema_profiler_and_grad_accumulation(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = cfg_for(
        data_dir, run_dir, "train.steps=4", "train.ema_decay=0.5", "train.micro_batch=1", "train.ckpt_every=2"
    )
    cfg.train.profile_steps = [1, 2]
    assert train(cfg) == 0
    assert (run_dir / "profile" / "trace_rank0.json").is_file()
    assert len(metrics(run_dir)) == 4

    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(run_dir / "checkpoints" / "step_00000004")).read_metadata()
    assert any(k.startswith("ema.") for k in meta.state_dict_metadata)
