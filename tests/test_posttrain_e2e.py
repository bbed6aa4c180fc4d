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
