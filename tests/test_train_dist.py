"""The real CLI in subprocesses: `--nproc 2` (gloo, FSDP2) matches one process with the same
global batch, and SIGUSR1 checkpoints and exits 75, after which `--resume` finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dist")]

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "data.height=32",
    "data.width=32",
    "data.synth_episodes=6",
    "data.synth_seconds=2.0",
    "run.wandb=disabled",
    "run.progress=false",
    "train.global_batch=4",
    "train.lr=1e-3",
    "train.warmup_steps=2",
    "train.stages.0.steps=3",
    "train.stages.1.steps=3",
    "train.ckpt_every=0",
    "model.num_layers=2",
    "train.export=false",
]


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


def _run(*args: str, timeout: float = 240) -> tuple[int, str]:
    p = _cli(*args)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_match_one_process(tmp_path):
    data = str(tmp_path / "data")
    rc, out = _run(*BASE, f"data.path=synthetic:{data}", f"run.dir={tmp_path / 'one'}")
    assert rc == 0, out
    rc, out = _run("--nproc", "2", *BASE, f"data.path=synthetic:{data}", f"run.dir={tmp_path / 'two'}")
    assert rc == 0, out
    assert "2 rank(s)" in out
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)


def test_sigusr1_checkpoints_exits_75_and_resumes(tmp_path):
    from launch.torchrun import EXIT_PREEMPTED

    data, run_dir = str(tmp_path / "data"), tmp_path / "run"
    args = [
        *BASE,
        f"data.path=synthetic:{data}",
        f"run.dir={run_dir}",
        "train.stages.0.steps=400",
        "train.stages.1.steps=0",
        "train.steps=400",
    ]
    p = _cli(*args)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == EXIT_PREEMPTED, out
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").is_file(), out
    stopped_at = int(ckpts[-1].name.split("_")[1])
    assert 3 <= stopped_at < 400
    # finish quickly: the same run with fewer total steps resumes from the checkpoint
    rc, out = _run(*args[:-1], f"train.steps={stopped_at + 2}", "--resume")
    assert rc == 0, out
    assert f"resumed from {ckpts[-1]}" in out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(stopped_at + 2))
