"""One job runtime (titan_world/job.py) under training and both post-training stages: the same
behaviour on a non-finite step, on SIGUSR1 and on resume; and the flash -> SDPA fallback in
post-training and serving. Tiny configs, one process."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
from pathlib import Path

import pytest
from posttrain_runs import COMMON, records, save_teacher

from serving.loading import build_engine
from titan_world.config import ConfigError, load_config
from titan_world.exit_codes import EXIT_DIVERGED, EXIT_PREEMPTED
from titan_world.model import attention
from titan_world.posttrain.loop import CausalJob, DMDJob
from titan_world.train.loop import Trainer

TRAIN = [
    "data.height=32",
    "data.width=32",
    "data.synth_episodes=4",
    "data.synth_seconds=1.2",
    "run.wandb=disabled",
    "run.progress=false",
    "train.global_batch=2",
    "model.num_layers=2",
    "train.stages.0.steps=5",
    "train.steps=5",
]
JOBS = {"train": Trainer, "causal": CausalJob, "dmd": DMDJob}
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("job_runtime")
    save_teacher(root / "teacher")
    return root


def _cfg(world: Path, kind: str, run_dir: Path, *extra: str):
    if kind == "train":
        args = [*TRAIN, f"data.path=synthetic:{world / 'train_data'}"]
    else:
        teacher = world / "teacher"
        args = [*COMMON, f"data.path=synthetic:{world / 'post_data'}", f"posttrain.teacher={teacher}"]
        args += [f"posttrain.student={teacher}", "train.steps=5"]
    return load_config(None, [*args, f"run.dir={run_dir}", *extra])


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize("kind", list(JOBS))
def test_non_finite_steps_are_skipped_then_stop_naming_the_last_good_checkpoint(kind, world, tmp_path, capsys):
    """Steps 2 and 3 see NaN data (the runtime's poisoned batch): step 2 is skipped, step 3 is one
    too many (train.max_bad_steps=1): exit 3, no checkpoint inside the streak, none exported."""
    run_dir = tmp_path / "run"
    cfg = _cfg(world, kind, run_dir, "train.ckpt_every=1", "train.max_bad_steps=1")
    cfg.train.inject_nan_steps = [2, 3]
    job = JOBS[kind](cfg)
    assert job.fit() == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "step 2: non-finite loss/grad" in err and "step skipped (1 in a row)" in err, err
    assert "2 consecutive non-finite losses" in err and "step_00000002" in err, err
    assert job.position["skipped"] == 2 and job.position["step"] == 4
    assert _checkpoints(run_dir) == ["step_00000001", "step_00000002"]
    assert not (run_dir / "model").exists()


@pytest.mark.parametrize("kind", list(JOBS))
def test_sigusr1_checkpoints_exits_75_restores_handlers_and_resumes(kind, world, tmp_path, capsys):
    """SIGUSR1 sent to the own process as step 1 starts: that step finishes, one checkpoint
    (step 2), exit 75, the previous handlers back; --resume continues at step 2 to the end."""
    run_dir = tmp_path / "run"
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    job = JOBS[kind](_cfg(world, kind, run_dir, "train.ckpt_every=0"))
    job.on_step = lambda step: os.kill(os.getpid(), signal.SIGUSR1) if step == 1 else None
    assert job.fit() == EXIT_PREEMPTED
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == before
    assert "preempted: checkpoint" in capsys.readouterr().err
    assert _checkpoints(run_dir) == ["step_00000002"]
    assert [r["step"] for r in records(run_dir)] == [0, 1]

    resumed = JOBS[kind](_cfg(world, kind, run_dir, "train.ckpt_every=0"), resume=True)
    assert resumed.position["step"] == 2
    assert resumed.fit() == 0
    assert [r["step"] for r in records(run_dir)] == [0, 1, 2, 3, 4]
    assert (run_dir / "model" / "config.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn installed: no fallback")
def test_flash_falls_back_to_sdpa_in_post_training_and_serving(world, tmp_path, caplog):
    """model.attn_backend=flash without flash-attn (or without CUDA): post-training's networks and
    the served model run SDPA, with the warning training gives."""
    attention._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=attention.log.name):
        job = CausalJob(_cfg(world, "causal", tmp_path / "run", "model.attn_backend=flash"))
    job.loader.close()
    assert job.student.attn_backend == "sdpa"
    assert "attn_backend=flash: package 'flash_attn' is not installed; falling back to sdpa" in caplog.text

    attention._warn_once.cache_clear()
    caplog.clear()
    cfg = load_config(None, ["model.attn_backend=flash", f"serving.checkpoint={world / 'teacher'}"])
    with caplog.at_level(logging.WARNING, logger=attention.log.name):
        engine = build_engine(cfg)
    assert engine.model.attn_backend == "sdpa"
    assert "falling back to sdpa" in caplog.text


@pytest.mark.parametrize(("kind", "key"), [("causal", "teacher"), ("dmd", "teacher"), ("dmd", "student")])
def test_a_missing_teacher_or_student_is_a_config_error_naming_the_key(kind, key, world, tmp_path):
    """Post-training starts only from the networks it is given (no teacher trained on the spot,
    no runs/demo looked up in the working directory); refused before the run dir exists."""
    cfg = _cfg(world, kind, tmp_path / "run")
    setattr(cfg.posttrain, key, None)
    with pytest.raises(ConfigError, match=f"posttrain.{key} is unset"):
        JOBS[kind](cfg)
    assert not (tmp_path / "run").exists()
