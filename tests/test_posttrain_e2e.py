"""Post-training jobs end to end on the synthetic world: resume parity and DMD before/after."""

from __future__ import annotations

import json
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
    return load_config(None, [f"run.dir={tmp / run}", f"data.path={data}", "data.synth_episodes=6", "data.synth_seconds=2.0",
                              "run.progress=false", "run.wandb=disabled", f"posttrain.teacher={teacher}", *extra])


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
    common = ["posttrain.rollout_chunks=2", "posttrain.gan_weight=0.1", "posttrain.fake_updates=2", "train.ckpt_every=0"]
    assert run_stage("dmd", _cfg(tmp, data, "full", teacher, "train.steps=4", *common)) == 0
    assert run_stage("dmd", _cfg(tmp, data, "cut", teacher, "train.steps=2", *common)) == 0
    assert run_stage("dmd", _cfg(tmp, data, "cut", teacher, "train.steps=4", *common), resume=True) == 0
    full, cut = _losses(tmp / "full"), _losses(tmp / "cut")
    assert [r["step"] for r in cut] == [0, 1, 2, 3]
    for a, b in zip(full, cut):
        for k in ("dmd_loss", "fake_loss", "d_loss", "g_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)
    assert (tmp / "cut" / "model" / "config.json").is_file()
    meta = json.loads((tmp / "cut" / "model" / "config.json").read_text())
    assert meta["titan_world"]["causal_chunk_frames"] == 1


def test_causal_stage_runs_and_exports(world):
    tmp, data, teacher = world
    assert run_stage("causal", _cfg(tmp, data, "causal", teacher, "train.steps=3")) == 0
    rec = _losses(tmp / "causal")
    assert len(rec) == 3 and all(r["loss"] >= 0 for r in rec)
    assert (tmp / "causal" / "model" / "posttrain.json").is_file()


def test_tiny_dmd_before_after_against_the_simulator(world, tmp_path):
    """Teacher (short train run) -> causal stage -> DMD; 4-step student vs ground truth before/after DMD."""
    from titan_world.posttrain.distill import Batch
    from titan_world.posttrain.evaluate import evaluate_student
    from titan_world.posttrain.loop import eval_batches, load_net
    from titan_world.model.codec import build_codec

    tmp, data, _ = world
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    teacher_run = tmp_path / "teacher"
    subprocess.run([sys.executable, "-m", "launch.cli", "train", f"run.dir={teacher_run}", "train.steps=120", f"data.path={data}",
                    "run.progress=false", "run.wandb=disabled", "model.action.enabled=true"], check=True, env=env)
    teacher = teacher_run / "model"
    assert run_stage("causal", _cfg(tmp_path, data, "causal", teacher, "train.steps=120")) == 0
    dmd = ["train.steps=40", f"posttrain.student={tmp_path / 'causal' / 'model'}", "posttrain.rollout_chunks=4"]
    assert run_stage("dmd", _cfg(tmp_path, data, "dmd", teacher, *dmd)) == 0
    cfg = _cfg(tmp_path, data, "eval", teacher, "posttrain.eval_clips=4")
    batches = eval_batches(cfg, 17, True, "cpu")
    codec = build_codec(cfg.data.codec.kind, cfg.data.codec.spatial_stride)
    before = evaluate_student(load_net(tmp_path / "causal" / "model", "cpu"), batches, cfg.posttrain, codec)
    after = evaluate_student(load_net(tmp_path / "dmd" / "model", "cpu"), batches, cfg.posttrain, codec)
    print(f"\n4-step causal student before DMD: {before}\n4-step student after DMD:        {after}")
    rec = _losses(tmp_path / "dmd")
    first, last = rec[:10], rec[-10:]
    gap0, gap1 = (sum(r["real_fake_gap"] for r in x) / len(x) for x in (first, last))
    print(f"DMD: real-fake gap {gap0:.4f} -> {gap1:.4f}; dmd_loss {rec[0]['dmd_loss']:.3g} -> {rec[-1]['dmd_loss']:.3g}")
    assert all(torch.isfinite(torch.tensor(r["dmd_loss"])) for r in rec)
    assert after["psnr"] > 0 and before["psnr"] > 0
    assert gap1 < gap0, "the fake score should track the student: the real-fake gap shrinks"
