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
from parallel.checkpoint import list_checkpoints, validate_checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from slurm_payload import reference_losses  # noqa: E402


def _losses(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_argv_and_child_detection(monkeypatch):
    argv = local_torchrun_argv(3, ["tests.slurm_payload", "train.steps=2"], max_restarts=1)
    assert argv[1:] == [
        "-m",
        "launch.torchrun",
        "--standalone",
        "--nproc-per-node=3",
        "--max-restarts=1",
        "-m",
        "tests.slurm_payload",
        "train.steps=2",
    ]
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
    args = ["tests.slurm_payload", f"run.dir={run}", "train.steps=6", "train.ckpt_every=2"]
    assert launch_local(2, args, env=env, max_restarts=1) == 0
    losses = _losses(run)
    assert [m["step"] for m in losses] == [
        1,
        2,
        3,
        3,
        4,
        5,
        6,
    ]  # step 3 ran again: restarted from the step-2 checkpoint
    assert {m["step"]: m["loss"] for m in losses} == dict(enumerate(reference_losses(6, 2), start=1))


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_75_without_restart_then_resumes(tmp_path):
    run, total = tmp_path / "run", 30
    code = (
        "import sys; from launch.torchrun import launch_local; "
        f"sys.exit(launch_local(2, ['tests.slurm_payload', 'run.dir={run}', 'train.steps={total}'], max_restarts=2))"
    )
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


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    """Running, i.e. neither gone nor a zombie waiting to be reaped (an orphan's reaper may be slow)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _run_dir_state(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkilled_launcher_takes_agent_and_ranks_with_it(tmp_path):
    """H2: `kill -9` of `titan-world train --nproc 2` stops the torchrun agent and both ranks (they
    checkpoint on the SIGTERM their parent's death sends, then exit) instead of leaving them training."""
    data, run = tmp_path / "data", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    synth = [
        sys.executable,
        "-m",
        "launch.cli",
        "data",
        "synth",
        "--out",
        str(data),
        "--episodes",
        "4",
        "--seconds",
        "1.0",
        "--height",
        "16",
        "--width",
        "16",
    ]
    assert subprocess.run(synth, cwd=REPO, env=env, capture_output=True, timeout=120).returncode == 0
    train = [
        sys.executable,
        "-m",
        "launch.cli",
        "train",
        "--nproc",
        "2",
        f"data.path={data}",
        f"run.dir={run}",
        "data.height=16",
        "data.width=16",
        "model.num_layers=2",
        "train.global_batch=2",
        "train.steps=100000",
        "train.stages.0.steps=100000",
        "train.stages.1.steps=0",
        "train.ckpt_every=0",
        "train.export=false",
        "run.wandb=disabled",
        "run.progress=false",
    ]
    launcher = subprocess.Popen(train, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file():
            assert time.monotonic() < deadline and launcher.poll() is None, "training did not start"
            time.sleep(0.2)
        below = _descendants(launcher.pid)  # the agent and its 2 ranks (and whatever they started)
        assert len(below) >= 3, below
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 90
        while any(_alive(p) for p in below):
            left = [p for p in below if _alive(p)]
            assert time.monotonic() < deadline, f"still running 90 s after the launcher was killed: {left}"
            time.sleep(0.2)
    finally:  # on failure (the old behaviour) do not leave them training
        for pid in [launcher.pid, *below, *_descendants(launcher.pid)]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    before = _run_dir_state(run)
    time.sleep(2.0)
    assert _run_dir_state(run) == before, "the run dir still changes after the launcher and its children are gone"
    (step, ckpt), *_ = list_checkpoints(run / "checkpoints")  # newest first: the ranks checkpointed on their SIGTERM
    assert step >= 1 and validate_checkpoint(ckpt) is None
