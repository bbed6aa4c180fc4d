"""Multi-node for real: the real tiny trainer as 2 SLURM nodes x 2 ranks, submitted with `titan-world
slurm submit` (real sbatch/srun) to the two-node cluster of tests/slurm_multinode.py (each slurmd in
its own network namespace; torchrun's c10d rendezvous on node1's address, gloo across the bridge).

Every job trains the same STEPS steps on the same dataset (made once with `titan-world data synth`);
its losses must equal one process's (`titan-world train`, no launcher): uninterrupted, preempted
(USR1 -> every rank checkpoints at the same step -> requeue -> resume), and with one node's ranks
killed mid-run (torchrun restarts the ranks of both nodes, which resume from the last checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import attempt_events, metrics_records, preempt_and_release, wait_for, wait_job_done
from slurm_multinode import TwoNodeCluster, slurm_two_nodes  # noqa: F401  (the module fixture)

from launch.cli import main as cli
from parallel.checkpoint import list_checkpoints, validate_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

REPO = Path(__file__).resolve().parents[1]
STEPS = 16
TRAIN = [  # the tiny model at 16x16, one stage, no export: what makes a 4-rank step cheap on 2 cores
    "data.height=16",
    "data.width=16",
    "model.num_layers=2",
    "train.global_batch=4",
    "train.lr=1e-3",
    "train.warmup_steps=2",
    f"train.steps={STEPS}",
    f"train.stages.0.steps={STEPS}",
    "train.stages.1.steps=0",
    "train.export=false",
    "run.wandb=disabled",
    "run.progress=false",
]
TWO_BY_TWO = ["--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "2"]
RANK_HOSTS = {0: "node1", 1: "node1", 2: "node2", 3: "node2"}  # torchrun's node-major rank order


@pytest.fixture(scope="module")
def dataset(slurm_two_nodes: TwoNodeCluster) -> Path:
    """One small synthetic dataset on the shared filesystem, read by every job."""
    out = slurm_two_nodes.shared / "data"
    assert (
        cli(
            [
                "data",
                "synth",
                "--out",
                str(out),
                "--episodes",
                "4",
                "--seconds",
                "1.0",
                "--height",
                "16",
                "--width",
                "16",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def one_process(dataset: Path, slurm_two_nodes: TwoNodeCluster) -> dict[int, float]:
    """Loss per step of the same training in one process, without any launcher."""
    run = slurm_two_nodes.shared / "one-process"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    argv = [
        sys.executable,
        "-m",
        "launch.cli",
        "train",
        *TRAIN,
        f"data.path={dataset}",
        f"run.dir={run}",
        "train.ckpt_every=0",
    ]
    proc = subprocess.run(
        argv, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = _losses_by_step(run)
    assert sorted(losses) == list(range(STEPS))
    return losses


def _losses_by_step(run: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (ran again after a restart) counts with its last value."""
    return {m["step"]: m["loss"] for m in metrics_records(run)}


def _assert_same_losses(run: Path, reference: dict[int, float]) -> None:
    losses = _losses_by_step(run)
    assert sorted(losses) == sorted(reference), (losses, reference)
    for step, loss in reference.items():  # 4 ranks' all-reduced mean vs one process: float32 rounding only
        assert losses[step] == pytest.approx(loss, rel=1e-5), (step, losses, reference)


def _submit(run: Path, dataset: Path, *extra: str) -> str:
    assert (
        cli(
            [
                "slurm",
                "submit",
                "--config",
                "tiny",
                *TWO_BY_TWO,
                *TRAIN,
                *extra,
                f"data.path={dataset}",
                f"run.dir={run}",
            ]
        )
        == 0
    )
    return json.loads((run / "slurm/jobs.jsonl").read_text().splitlines()[-1])["job_id"]


def _rank_log(run: Path, job_id: str, rank: int) -> str:
    return (run / f"slurm/logs/{job_id}/rank-{rank}.log").read_text(errors="replace")


def _assert_two_nodes(run: Path, job_id: str) -> None:
    """Ranks 0-1 ran on node1 and 2-3 on node2 (own hostnames), the rendezvous on node1."""
    assert "(master node1:" in (run / f"slurm/logs/{job_id}.out").read_text()
    for rank, host in RANK_HOSTS.items():
        hosts = set(re.findall(r" rank \d+ host (\S+) =====", _rank_log(run, job_id, rank)))
        assert hosts == {host}, (rank, hosts)
    assert "4 rank(s)" in _rank_log(run, job_id, 0)


def test_two_nodes_two_ranks_each_match_one_process(slurm_two_nodes, dataset, one_process, monkeypatch):
    monkeypatch.chdir(REPO)  # the job's working dir (sbatch --chdir)
    run = slurm_two_nodes.shared / "two-by-two"
    job_id = _submit(run, dataset, "train.ckpt_every=0")
    wait_job_done(job_id, run, timeout=240)
    assert attempt_events(run) == [(0, "start"), (0, "done")]
    _assert_two_nodes(run, job_id)
    assert [m["step"] for m in metrics_records(run)] == list(range(STEPS))
    _assert_same_losses(run, one_process)


def test_preempted_two_node_job_checkpoints_everywhere_requeues_and_matches(
    slurm_two_nodes, dataset, one_process, monkeypatch
):
    monkeypatch.chdir(REPO)
    run = slurm_two_nodes.shared / "preempted"
    job_id = _submit(run, dataset, "train.ckpt_every=0")
    logged = preempt_and_release(run, job_id, min_lines=2)
    assert logged < STEPS, f"the preemption landed after the last step ({logged} of {STEPS} logged)"
    ((stop_step, ckpt),) = list_checkpoints(run / "checkpoints")  # the preemption's, before the attempt 1 resumes
    wait_job_done(job_id, run, timeout=240)
    assert attempt_events(run) == [(0, "start"), (0, "signal"), (0, "requeue"), (1, "start"), (1, "done")]
    batch_log = (run / f"slurm/logs/{job_id}.out").read_text()
    assert len(re.findall(r"\[launch\.torchrun\] pid \d+: got SIGUSR1", batch_log)) == 2  # the agent of each node
    # one checkpoint of all 4 ranks (both nodes) at the step where they all stopped
    assert 2 <= stop_step < STEPS and validate_checkpoint(ckpt) is None
    marker = json.loads((ckpt / "COMPLETE").read_text())
    assert marker["step"] == stop_step and marker["world_size"] == 4
    assert {f"rank_{r:05d}.pt" for r in RANK_HOSTS} <= set(marker["sizes"])
    assert f"resumed from {ckpt} at step {stop_step}" in _rank_log(run, job_id, 0)
    _assert_two_nodes(run, job_id)
    assert [m["step"] for m in metrics_records(run)] == list(range(STEPS))  # each step once: resumed where it stopped
    _assert_same_losses(run, one_process)


def _ranks_of(cluster: TwoNodeCluster, node: str) -> list[int]:
    """The training ranks in a node's namespace: children of its torchrun agent."""

    def argv(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    pids = cluster.node_pids(node)
    return [p for p in pids if "launch.slurm_task" in argv(p) and "-m launch.torchrun" in argv(parent(p))]


def test_one_nodes_ranks_killed_restart_both_nodes_from_the_checkpoint(
    slurm_two_nodes, dataset, one_process, monkeypatch
):
    monkeypatch.chdir(REPO)
    run = slurm_two_nodes.shared / "node-ranks-killed"
    job_id = _submit(run, dataset, "train.ckpt_every=4")
    wait_for(lambda: (run / "checkpoints/step_00000004/COMPLETE").is_file(), 180, "the step-4 checkpoint", run)
    ranks = wait_for(
        lambda: (lambda r: r if len(r) == 2 else None)(_ranks_of(slurm_two_nodes, "node2")),
        30,
        "node2's two ranks",
        run,
    )
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    killed_after = len(metrics_records(run))
    assert killed_after < STEPS, f"the kill landed after the last step ({killed_after} of {STEPS} logged)"
    wait_job_done(job_id, run, timeout=240)
    assert attempt_events(run) == [(0, "start"), (0, "done")]  # no requeue: torchrun restarted the ranks
    for rank in (2, 3):  # node2's agent restarted its ranks (a failure: the count goes up)
        assert f"attempt 0 elastic-restart 1 rank {rank} host node2" in _rank_log(run, job_id, rank)
    log0 = _rank_log(run, job_id, 0)
    assert log0.count(" rank 0 host node1 =====") == 2  # node1's ranks were restarted too (new rendezvous round)
    resumed = re.search(r"resumed from (\S+) at step (\d+)", log0)
    assert resumed and int(resumed[2]) >= 4, log0
    _assert_two_nodes(run, job_id)
    for _, path in list_checkpoints(run / "checkpoints"):
        assert validate_checkpoint(path) is None, path
    _assert_same_losses(run, one_process)
