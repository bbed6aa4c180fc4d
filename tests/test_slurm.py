"""`titan-world slurm`: script content (no daemons) and real jobs on a local SLURM cluster.

The cluster tests use tests/slurm_cluster.py (own munged/slurmctld/slurmd, stopped at the end)
and the stand-in trainer tests/slurm_payload.py (same CLI and signal contract as
`titan-world train`); test_real_trainer_job runs the real tiny trainer once it exists.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from slurm_cluster import (  # noqa: F401  (slurm_cluster: the module fixture)
    attempt_events,
    job_state,
    metrics_records,
    preempt_and_release,
    slurm_cluster,
    wait_for,
    wait_job_done,
)

from launch.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = "launch.entry=tests.slurm_payload"


def _submit(capsys, run_dir: Path, *args: str) -> str:
    rc = cli(["slurm", "submit", "--config", "tiny", *args, f"run.dir={run_dir}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


# -- script content (no SLURM needed) -------------------------------------------------------------
def test_dry_run_writes_readable_script(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = _submit(
        capsys,
        tmp_path / "run",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--account",
        "proj",
        "--time",
        "02:00:00",
        "--dry-run",
        "train.lr=0.0001",
        "launch.signal_seconds=120",
    )
    script = (tmp_path / "run/slurm/job.sbatch").read_text()
    assert out.startswith(script)
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=02:00:00",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path}/run/slurm/logs/%j.out",
        f"#SBATCH --chdir={REPO}",
    ):
        assert line in script, line
    for piece in (
        'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1',
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "-m launch.torchrun",
        '"--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT"',
        "--rdzv-backend=c10d",
        "--nproc-per-node=8",
        "--max-restarts=3",
        "launch.slurm_task",
        "launch.cli train --config",
        f"{tmp_path}/run/config.yaml &\n",
        "trap on_preempt USR1",
        'scontrol requeue "$SLURM_JOB_ID"',
        'scancel --signal=USR1 "$SLURM_JOB_ID"',
    ):
        assert piece in script, piece
    assert subprocess.run(["bash", "-n", str(tmp_path / "run/slurm/job.sbatch")]).returncode == 0
    cfg_text = (tmp_path / "run/config.yaml").read_text()  # every node reads this one file
    assert "lr: 0.0001" in cfg_text and f"dir: {tmp_path}/run" in cfg_text
    assert not (tmp_path / "run/slurm/jobs.jsonl").exists()  # nothing submitted


def test_dry_run_cpu_one_task_per_rank(tmp_path, capsys):
    _submit(capsys, tmp_path / "r", "--gpus-per-node", "0", "--tasks-per-node", "3", "--one-task-per-gpu", "--dry-run")
    script = (tmp_path / "r/slurm/job.sbatch").read_text()
    assert "--gpus-per-node" not in script
    assert "#SBATCH --ntasks-per-node=3" in script and "#SBATCH --cpus-per-task=1" in script
    assert "launch.slurm_task --from-slurm" in script and "launch.torchrun" not in script


def test_dry_run_chain_stages_with_own_resources(tmp_path, capsys):
    cfg = tmp_path / "chain.yaml"  # a user config on top of tiny.yaml: stage 2s wants 3 nodes
    cfg.write_text("defaults:\n  - tiny\nlaunch:\n  stage_resources:\n    2s: {nodes: 3, time: '12:00:00'}\n")
    rc = cli(
        [
            "slurm",
            "submit",
            "--config",
            str(cfg),
            "--stages",
            "chain",
            "--gpus-per-node",
            "8",
            "--dry-run",
            f"run.dir={tmp_path}/c",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    s0 = (tmp_path / "c/slurm/stage0-1s.sbatch").read_text()
    s1 = (tmp_path / "c/slurm/stage1-2s.sbatch").read_text()
    from titan_world.config import load_config

    first, second = (s.steps for s in load_config().train.stages)  # tiny.yaml: stage 1s then 2s
    assert f"train.steps={first}" in s0 and "#SBATCH --nodes=1" in s0
    assert f"train.steps={first + second}" in s1 and "#SBATCH --nodes=3" in s1 and "#SBATCH --time=12:00:00" in s1
    assert out.count("dry run: wrote") == 2


def test_dry_run_post_training_job(tmp_path, capsys):
    """Post-training runs under the same script with another entry: one job, resumable (exit 75
    on SIGUSR1 -> requeue -> resume), its config in the run dir; a chain is refused."""
    _submit(
        capsys,
        tmp_path / "p",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--dry-run",
        "launch.entry=launch.cli post-train dmd",
    )
    script = (tmp_path / "p/slurm/job.sbatch").read_text()
    assert f"launch.cli post-train dmd --config {tmp_path}/p/config.yaml &\n" in script
    assert "#SBATCH --nodes=2" in script and "trap on_preempt USR1" in script
    assert (
        cli(
            [
                "slurm",
                "submit",
                "--config",
                "tiny",
                "--stages",
                "chain",
                "--dry-run",
                "launch.entry=launch.cli post-train dmd",
                f"run.dir={tmp_path}/q",
            ]
        )
        == 2
    )
    assert "launch.stages=single" in capsys.readouterr().err


def test_bad_values_and_missing_sbatch(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("defaults:\n  - tiny\nlaunch:\n  stage_resources:\n    nope: {nodes: 2}\n")
    assert (
        cli(["slurm", "submit", "--config", str(cfg), "--stages", "chain", f"run.dir={tmp_path}/x", "--dry-run"]) == 2
    )
    assert "unknown stage" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert cli(["slurm", "submit", f"run.dir={tmp_path}/y"]) == 1
    err = capsys.readouterr().err
    assert "sbatch" in err and "install" in err and "--dry-run" in err


# -- real jobs -----------------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_two_task_job_trains_and_finishes(slurm_cluster, tmp_path, capsys, monkeypatch):
    from slurm_payload import reference_losses

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    out = _submit(capsys, run, "--gpus-per-node", "0", "--tasks-per-node", "2", PAYLOAD, "train.steps=5")
    job_id = json.loads((run / "slurm/jobs.jsonl").read_text().splitlines()[0])["job_id"]
    assert f"submitted job {job_id}" in out
    wait_job_done(job_id, run)
    assert [m["step"] for m in metrics_records(run)] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in metrics_records(run)] == reference_losses(5, 2)  # 2 ranks really all-reduced
    assert attempt_events(run) == [(0, "start"), (0, "done")]
    for rank in (0, 1):
        assert "done at step 5" in (run / f"slurm/logs/{job_id}/rank-{rank}.log").read_text()
    assert cli(["slurm", "status", str(run)]) == 0
    status = capsys.readouterr().out
    assert f"job {job_id}: COMPLETED" in status and "0:start,0:done" in status and '"step": 5' in status
    assert cli(["slurm", "logs", str(run), "--rank", "1"]) == 0
    assert "rank 1/2: training steps 0..5" in capsys.readouterr().out
    assert cli(["slurm", "logs", str(run)]) == 0
    assert "finished" in capsys.readouterr().out
    assert cli(["slurm", "logs", str(run), "--rank", "0", "--follow"]) == 0  # job over: prints and returns
    assert "done at step 5" in capsys.readouterr().out


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_one_task_per_rank_job_then_cancel(slurm_cluster, tmp_path, capsys, monkeypatch):
    from slurm_payload import reference_losses

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"  # srun starts the 2 ranks itself (no torchrun): RANK/WORLD_SIZE from SLURM_*
    _submit(
        capsys, run, "--gpus-per-node", "0", "--tasks-per-node", "2", "--one-task-per-gpu", PAYLOAD, "train.steps=3"
    )
    job_id = json.loads((run / "slurm/jobs.jsonl").read_text())["job_id"]
    wait_job_done(job_id, run)
    assert [m["loss"] for m in metrics_records(run)] == reference_losses(3, 2)

    monkeypatch.setenv("TW_PAYLOAD_STEP_SLEEP", "5")
    long = tmp_path / "long"
    _submit(capsys, long, "--gpus-per-node", "0", "--tasks-per-node", "1", PAYLOAD, "train.steps=100")
    long_id = json.loads((long / "slurm/jobs.jsonl").read_text())["job_id"]
    wait_for(lambda: job_state(long_id).get("JobState") == "RUNNING", 60, "the job to run", long)
    assert cli(["slurm", "cancel", str(long)]) == 0
    assert f"cancelled {long_id}" in capsys.readouterr().out
    wait_for(lambda: job_state(long_id).get("JobState") == "CANCELLED", 60, "the job to be cancelled", long)
    assert cli(["slurm", "cancel", str(long)]) == 0
    assert "nothing to cancel" in capsys.readouterr().out


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_preempted_job_checkpoints_requeues_and_matches_uninterrupted(slurm_cluster, tmp_path, capsys, monkeypatch):
    from slurm_payload import reference_losses

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TW_PAYLOAD_STEP_SLEEP", "0.25")  # sbatch exports the submitter's environment
    run, total = tmp_path / "run", 16
    _submit(
        capsys,
        run,
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "2",
        PAYLOAD,
        f"train.steps={total}",
        "train.ckpt_every=1000",
    )
    job_id = json.loads((run / "slurm/jobs.jsonl").read_text().splitlines()[0])["job_id"]
    stopped_at = preempt_and_release(run, job_id, min_lines=3)  # steps logged by the first attempt
    assert 3 <= stopped_at < total, "the first attempt must stop mid-run"
    wait_job_done(job_id, run)
    losses = metrics_records(run)
    assert [m["step"] for m in losses] == list(range(1, total + 1))  # resumed exactly after the checkpoint
    assert [m["loss"] for m in losses] == reference_losses(total, 2)
    assert attempt_events(run) == [(0, "start"), (0, "signal"), (0, "requeue"), (1, "start"), (1, "done")]
    log = (run / f"slurm/logs/{job_id}/rank-0.log").read_text()
    assert f"checkpointed at step {stopped_at}, exiting 75" in log and f"resumed at step {stopped_at}" in log
    assert "attempt 1" in log


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_chained_stages_run_in_order(slurm_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    run, cfg = tmp_path / "run", tmp_path / "two_stages.yaml"
    cfg.write_text(
        "defaults:\n  - tiny\ntrain:\n  stages:\n    - {name: a, frames: 17, steps: 2}\n"
        "    - {name: b, frames: 33, steps: 3}\n"
    )
    rc = cli(
        [
            "slurm",
            "submit",
            "--config",
            str(cfg),
            "--stages",
            "chain",
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "1",
            PAYLOAD,
            f"run.dir={run}",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    jobs = [json.loads(x) for x in (run / "slurm/jobs.jsonl").read_text().splitlines()]
    assert [j["stage"] for j in jobs] == ["a", "b"] and jobs[1]["dependency"] == f"afterok:{jobs[0]['job_id']}"
    assert "after" in out
    wait_job_done(jobs[0]["job_id"], run)
    wait_job_done(jobs[1]["job_id"], run)
    assert [m["step"] for m in metrics_records(run)] == [1, 2, 3, 4, 5]  # stage b resumed stage a's checkpoint


def _trainer_missing() -> str | None:
    src = (REPO / "titan_world/train/cli.py").read_text()
    if "not implemented yet" in src or "placeholder" in src:
        return "titan_world/train/cli.py is still a placeholder (issue #7): the real-trainer SLURM test waits for it"
    return None


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
@pytest.mark.skipif(_trainer_missing() is not None, reason=str(_trainer_missing()))
def test_real_trainer_job_and_preemption(slurm_cluster, tmp_path, capsys, monkeypatch):
    """The real tiny trainer as a 2-rank job; then the same run preempted mid-way ends with the same loss."""
    monkeypatch.chdir(REPO)
    steps = 6
    common = [
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "2",
        f"train.steps={steps}",
        "train.ckpt_every=0",
        "run.wandb=disabled",
        "run.progress=false",
    ]
    ref, pre = tmp_path / "uninterrupted", tmp_path / "preempted"
    _submit(capsys, ref, *common)
    _submit(capsys, pre, *common)  # queued behind the first (2 CPUs); runs when it ends
    ref_id, pre_id = (json.loads((d / "slurm/jobs.jsonl").read_text())["job_id"] for d in (ref, pre))
    wait_job_done(ref_id, ref, timeout=180)
    assert [m["step"] for m in metrics_records(ref)] == list(range(steps))
    assert (ref / f"checkpoints/step_{steps:08d}").is_dir()

    first_attempt = preempt_and_release(pre, pre_id, min_lines=2)
    assert first_attempt < steps, "the preemption must land mid-run"
    wait_job_done(pre_id, pre, timeout=180)
    events = [e for _, e in attempt_events(pre)]
    assert events == ["start", "signal", "requeue", "start", "done"], events
    losses = metrics_records(pre)
    assert [m["step"] for m in losses] == list(range(steps))
    assert losses[-1]["loss"] == pytest.approx(metrics_records(ref)[-1]["loss"], rel=1e-6, abs=1e-7)
    assert "resumed from" in (pre / f"slurm/logs/{pre_id}/rank-0.log").read_text()
