"""Post-training jobs end to end on the synthetic world: resume parity and DMD before/after."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titan_world.config import load_config
from titan_world.model import build_model, save_pretrained
from titan_world.posttrain.loop import run_stage

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dist")]


def _cfg(tmp: Path, data: Path, run: str, teacher: Path, *extra: str):
    return load_config(
        None,
        [
            f"run.dir={tmp / run}",
            f"data.path=synthetic:{data}",
            "data.synth_episodes=6",
            "data.synth_seconds=2.0",
            "run.progress=false",
            "run.wandb=disabled",
            f"posttrain.teacher={teacher}",
            f"posttrain.student={teacher}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("posttrain")
    torch.manual_seed(0)
    cfg = load_config(None, ["model.action.enabled=true"])
    teacher = build_model(cfg.model)
    for p in teacher.head.parameters():
        p.data.normal_(0, 0.02)
    save_pretrained(teacher, tmp / "teacher")
    return tmp, tmp / "data", tmp / "teacher"


def _losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dmd_resume_reproduces_uninterrupted_losses(world):
    tmp, data, teacher = world
    common = [
        "posttrain.rollout_chunks=2",
        "posttrain.grad_chunks=2",
        "posttrain.gan_weight=0.1",
        # the GAN variant that trains the fake-score trunk with approximate R1 (head-only resumes: test_posttrain_fsdp)
        "posttrain.gan_train_trunk=true",
        "posttrain.gan_r1_weight=100",
        "posttrain.fake_updates=2",
        "train.ckpt_every=0",
        "posttrain.ema_start_step=1",
    ]  # the student's EMA averages across the resume
    assert run_stage("dmd", _cfg(tmp, data, "full", teacher, "train.steps=4", *common)) == 0
    assert run_stage("dmd", _cfg(tmp, data, "cut", teacher, "train.steps=2", *common)) == 0
    assert run_stage("dmd", _cfg(tmp, data, "cut", teacher, "train.steps=4", *common), resume=True) == 0
    full, cut = _losses(tmp / "full"), _losses(tmp / "cut")
    assert [r["step"] for r in cut] == [0, 1, 2, 3]
    for a, b in zip(full, cut):
        for k in ("dmd_loss", "fake_loss", "d_loss", "g_loss", "r1"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)
    # The student's EMA (exported by default) is checkpointed with the job: the resumed run exports the same weights.
    from titan_world.posttrain.loop import load_net

    exported_full, exported_cut = (load_net(tmp / run / "model", "cpu").state_dict() for run in ("full", "cut"))
    for k, v in exported_full.items():
        assert torch.allclose(v, exported_cut[k], atol=1e-7, rtol=1e-5), k
    assert (tmp / "cut" / "model" / "config.json").is_file()
    meta = json.loads((tmp / "cut" / "model" / "config.json").read_text())
    assert meta["titan_world"]["causal_chunk_frames"] == 1


def test_causal_stage_runs_and_exports(world):
    tmp, data, teacher = world
    assert run_stage("causal", _cfg(tmp, data, "causal", teacher, "train.steps=3")) == 0
    rec = _losses(tmp / "causal")
    assert len(rec) == 3 and all(r["loss"] >= 0 for r in rec)
    # Serving reads the student's geometry back from posttrain.json, including the horizon past which
    # the sink keeps its trained distance (stage 1 saw 17-frame clips: 5 latent frames).
    meta = json.loads((tmp / "causal" / "model" / "posttrain.json").read_text())
    assert meta["kv_refresh"] == "clean" and meta["horizon_frames"] == 5, meta


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory):
    """A tiny action-enabled teacher from `titan-world train` (150 steps of 17-frame clips), trained
    once per session; returns (model dir, data dir)."""
    tmp = tmp_path_factory.mktemp("posttrain_teacher")
    data = tmp / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "train",
            f"run.dir={tmp / 'run'}",
            "train.steps=150",
            f"data.path=synthetic:{data}",
            "data.synth_episodes=6",
            "data.synth_seconds=2.0",
            "train.ckpt_every=0",
            "run.progress=false",
            "run.wandb=disabled",
            "model.action.enabled=true",
        ],
        check=True,
        env=env,
    )
    return tmp / "run" / "model", data


def test_tiny_dmd_before_after_against_the_simulator(trained_teacher, tmp_path):
    """Teacher (short train run) -> causal stage -> DMD; the 4-step student before and after DMD,
    same held-out clips, actions and noise, against the simulator and the teacher's 20-step samples.
    Prints the table (PSNR and latent MSE vs the simulator, detail, distribution distances).

    Asserted, because it held over train.seed 0-2 (this test: 0) — the student after DMD is closer
    to the simulator in *distribution* (`gauss_gt`: the Fréchet distance between Gaussians fitted to
    the generated and the simulator's latent tokens, the cheap cousin of FVD) and in *detail* (its
    frames' high-frequency energy relative to the simulator's moves toward 1: the causal student's
    4-step samples are too smooth), and closer to the teacher's distribution (`gauss_teacher`, what
    DMD optimises). Measured (seeds 0 / 1 / 2): gauss_gt 1.13→0.99 / 1.26→1.09 / 1.19→1.06, detail
    0.83→1.01 / 0.84→0.96 / 0.73→0.98, gauss_teacher 0.26→0.18 / 0.26→0.18 / 0.22→0.15, yaw error within
    ±0.13°. PSNR (−0.1 to −0.26 dB) and latent MSE (+1 to +4%) are printed, not asserted: they reward
    the conditional mean, and at this scale the teacher's sharper samples score below the causal
    student on them (on the demo chain's 1,300-step teacher DMD raises PSNR too: docs/posttrain.md).
    With a 40-step teacher (this test before) nothing held over the seeds: its samples are noise
    (detail 7x the simulator's) and gauss_gt rose for seed 1. Yaw error is only guarded (noise)."""
    from titan_world.model.codec import codec_from_config
    from titan_world.posttrain.evaluate import evaluate_student, evaluate_teacher, held_out_batches, metrics_table
    from titan_world.posttrain.loop import load_net

    torch.set_num_threads(1)
    teacher, data = trained_teacher
    assert run_stage("causal", _cfg(tmp_path, data, "causal", teacher, "train.steps=40", "train.ckpt_every=0")) == 0
    dmd = [
        "train.steps=30",
        "train.ckpt_every=0",
        f"posttrain.student={tmp_path / 'causal' / 'model'}",
        "posttrain.rollout_chunks=2",
        "posttrain.grad_chunks=2",
        "posttrain.student_lr=1e-4",
    ]
    assert run_stage("dmd", _cfg(tmp_path, data, "dmd", teacher, *dmd)) == 0
    cfg = _cfg(tmp_path, data, "eval", teacher)
    batches = held_out_batches(cfg, 4, 17, True)
    codec = codec_from_config(cfg.data.codec)
    t_metrics, t_clips = evaluate_teacher(load_net(teacher, "cpu").eval(), batches, codec, steps=20)
    before = evaluate_student(
        load_net(tmp_path / "causal" / "model", "cpu").eval(), batches, cfg.posttrain, codec, reference=t_clips
    )
    after = evaluate_student(
        load_net(tmp_path / "dmd" / "model", "cpu").eval(), batches, cfg.posttrain, codec, reference=t_clips
    )
    rows = {"teacher, 20 bidirectional steps": t_metrics, "causal student, 4 steps": before, "after DMD": after}
    print("\n" + metrics_table(rows))
    rec = _losses(tmp_path / "dmd")
    assert len(rec) == 30 and all(torch.isfinite(torch.tensor([r["dmd_loss"], r["fake_loss"]])).all() for r in rec)
    assert t_metrics["gauss_gt"] < before["gauss_gt"], (
        "the teacher should be the closer distribution (else DMD has nothing to pull toward)"
    )
    assert after["gauss_gt"] < before["gauss_gt"], (
        "after DMD the student's samples should be distributed closer to the simulator's"
    )
    assert abs(math.log(after["detail"])) < abs(math.log(before["detail"])), (
        "after DMD the student's detail (high-frequency energy / the simulator's) should be closer to 1"
    )
    assert after["gauss_teacher"] < before["gauss_teacher"], (
        "DMD should bring the student's distribution toward the teacher's"
    )
    assert after["yaw_mae_deg"] < before["yaw_mae_deg"] * 1.1, "DMD should not break action following"
