"""launch.torchrun: local multi-process launches, exit codes, preemption and elastic restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.torchrun import EXIT_PREEMPTED, is_distributed_child, launch_local, local_torchrun_argv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from slurm_payload import reference_losses  # noqa: E402


def _losses(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_argv_and_child_detection(monkeypatch):
    argv = local_torchrun_argv(3, ["tests.slurm_payload", "train.steps=2"], max_restarts=1)
    assert argv[1:] == ["-m", "launch.torchrun", "--standalone", "--nproc-per-node=3", "--max-restarts=1",
                        "-m", "tests.slurm_payload", "train.steps=2"]
    with pytest.raises(ValueError, match="nproc"):
        local_torchrun_argv(0, ["m"])
    monkeypatch.delenv("RANK", raising=False)
    assert not is_distributed_child()
    monkeypatch.setenv("RANK", "1")
    assert is_distributed_child()


@pytest.mark.slow
def test_two_ranks_train_and_exit_codes_propagate(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    assert launch_local(2, ["tests.slurm_payload", f"run.dir={run}", "train.steps=4"]) == 0
    assert [m["loss"] for m in _losses(run)] == reference_losses(4, 2)
    # a config error in the ranks is the launcher's failure too (not 0, not hidden)
    assert launch_local(2, ["tests.slurm_payload", f"run.dir={run}", "train.nope=1"]) != 0


@pytest.mark.slow
def test_elastic_restart_resumes_after_a_rank_crash(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    env = {"TW_PAYLOAD_CRASH_AT": "3"}
    args = ["tests.slurm_payload", "--resume", f"run.dir={run}", "train.steps=6", "train.ckpt_every=2"]
    assert launch_local(2, args, env=env, max_restarts=1) == 0
    losses = _losses(run)
    assert [m["step"] for m in losses] == [1, 2, 3, 3, 4, 5, 6]  # step 3 ran again: restarted from the step-2 checkpoint
    assert {m["step"]: m["loss"] for m in losses} == dict(enumerate(reference_losses(6, 2), start=1))


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_75_without_restart_then_resumes(tmp_path):
    run, total = tmp_path / "run", 30
    code = ("import sys; from launch.torchrun import launch_local; "
            f"sys.exit(launch_local(2, ['tests.slurm_payload', '--resume', 'run.dir={run}', 'train.steps={total}'], max_restarts=2))")
    env = {**os.environ, "TW_PAYLOAD_STEP_SLEEP": "0.25"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    deadline = time.monotonic() + 60
    while not ((run / "metrics.jsonl").is_file() and len(_losses(run)) >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, "ranks did not start training"
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED  # max_restarts=2, yet no restart after a preemption
    stopped = json.loads((run / "payload_ckpt.json").read_text())["step"]
    assert 2 <= stopped < total and len(_losses(run)) == stopped
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0
    assert [m["loss"] for m in _losses(run)] == reference_losses(total, 2)
