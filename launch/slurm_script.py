"""Render the sbatch script of one titan-world job (readable: a user can read, edit, resubmit it).

Preemption design (docs/launch.md): SLURM sends SIGUSR1 to the *batch shell* only
(`--signal=B:USR1@S`). The shell is the one process that can requeue the job and that outlives
the ranks, so it owns the decision; it forwards the signal to every job step on every node with
`scancel --signal=USR1 $SLURM_JOB_ID` (steps only, not itself). On each node the
`launch.torchrun` agent forwards it to its ranks and turns elastic restarts off; the ranks
checkpoint and exit with EXIT_PREEMPTED (75); the shell then runs `scontrol requeue`, and the
requeued job starts the same command, which resumes from the last complete checkpoint (the
trainers resume a run.dir that holds checkpoints; the script passes no `--resume`, which is an
error when there is nothing to resume, as on the first attempt). Without `B:`, SLURM would
signal every process of the steps, but the shell would
not know, and a preemption by the scheduler (SIGTERM) looks the same to it as a crash.
"""

from __future__ import annotations

import datetime as dt
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from launch.torchrun import EXIT_PREEMPTED


@dataclass
class JobSpec:
    """Everything one job script needs, already resolved (no config lookups while rendering)."""

    run_dir: Path
    config_path: Path
    workdir: Path
    python: str
    entry: list[str]  # module + leading args, e.g. ["launch.cli", "train"]
    job_name: str
    nodes: int
    gpus_per_node: int
    ranks_per_node: int
    cpus_per_task: int | None
    time: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_seconds: int = 300
    requeue: bool = True
    max_requeues: int = 20
    max_restarts: int = 3
    one_task_per_gpu: bool = False
    master_port: int | None = None
    stage: str | None = None  # curriculum stage this job trains (chain mode)
    trainer_args: list[str] = field(default_factory=list)  # extra overrides (chain: train.steps=N)
    env: dict[str, str] = field(default_factory=dict)
    extra_sbatch: list[str] = field(default_factory=list)
    overrides_note: list[str] = field(default_factory=list)  # the user's overrides, for the header
    script_path: Path | None = None  # where the script is written (for the resubmit hint)


def _q(s: object) -> str:
    return shlex.quote(str(s))


def sbatch_options(spec: JobSpec) -> list[str]:
    tasks = spec.ranks_per_node if spec.one_task_per_gpu else 1
    opts = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}", f"--ntasks-per-node={tasks}"]
    if spec.gpus_per_node > 0:
        opts.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        opts.append(f"--cpus-per-task={spec.cpus_per_task}")
    opts.append(f"--time={spec.time}")
    for key in ("partition", "account", "qos"):
        if getattr(spec, key):
            opts.append(f"--{key}={getattr(spec, key)}")
    opts.append(f"--signal=B:USR1@{spec.signal_seconds}")
    opts.append("--requeue" if spec.requeue else "--no-requeue")
    log_dir = spec.run_dir / "slurm" / "logs"
    opts += ["--open-mode=append", f"--output={log_dir}/%j.out", f"--chdir={spec.workdir}"]
    opts += list(spec.extra_sbatch)
    return opts


def launch_command(spec: JobSpec) -> list[list[str]]:
    """The srun line, in readable groups: one torchrun agent per node (default) or one task per rank."""
    srun = ["srun", "--kill-on-bad-exit=0", f"--nodes={spec.nodes}"]
    if spec.gpus_per_node > 0:
        srun.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        srun.append(f"--cpus-per-task={spec.cpus_per_task}")
    trainer = [*spec.entry, "--config", str(spec.config_path), *spec.trainer_args]  # resumes if run.dir has checkpoints
    if spec.one_task_per_gpu:
        srun.append(f"--ntasks-per-node={spec.ranks_per_node}")
        groups = [srun, ["$PYTHON", "-m", "launch.slurm_task", "--from-slurm", "--log-dir", "$LOG_DIR"], trainer]
    else:
        srun.append("--ntasks-per-node=1")
        torchrun = [
            "$PYTHON",
            "-m",
            "launch.torchrun",
            "--nnodes=$SLURM_JOB_NUM_NODES",
            f"--nproc-per-node={spec.ranks_per_node}",
            f"--max-restarts={spec.max_restarts}",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT",
            "--rdzv-id=$SLURM_JOB_ID-$ATTEMPT",
        ]
        groups = [srun, torchrun, ["-m", "launch.slurm_task", "--log-dir", "$LOG_DIR"], trainer]
    # $VARS in double quotes so the shell expands them; everything else shell-quoted
    return [[f'"{a}"' if "$" in a else _q(a) for a in g] for g in groups]


def render(spec: JobSpec) -> str:
    now = dt.datetime.now().isoformat(timespec="seconds")
    mode = (
        "one task per GPU (no torchrun)"
        if spec.one_task_per_gpu
        else "one torchrun per node (c10d rendezvous on the first node)"
    )
    device = f"{spec.gpus_per_node} GPU(s)" if spec.gpus_per_node > 0 else "CPU only (gloo)"
    header = [
        "#!/bin/bash",
        f"# titan-world SLURM job, written by `titan-world slurm submit` on {now}.",
        f"# Run dir: {spec.run_dir}   (config every node reads: {spec.config_path})",
        f"# Layout: {spec.nodes} node(s) x {spec.ranks_per_node} rank(s), {device}; {mode}.",
    ]
    if spec.stage:
        header.append(f"# Curriculum stage: {spec.stage}")
    if spec.overrides_note:
        header.append(f"# Overrides (already in the config file): {' '.join(spec.overrides_note)}")
    header += [
        f"# Preemption: SIGUSR1 reaches this script {spec.signal_seconds}s before the time limit; it forwards it",
        "# to the ranks, which checkpoint and exit 75; then it requeues the job, which resumes. See docs/launch.md.",
        "# Resubmit by hand: sbatch <this file>.   Follow: titan-world slurm status|logs|cancel RUN_DIR",
    ]
    sbatch = [f"#SBATCH {o}" for o in sbatch_options(spec)]
    exports = {
        "RUN_DIR": str(spec.run_dir),
        "PYTHON": spec.python,
        "STAGE": spec.stage or "",
        "MAX_REQUEUES": str(spec.max_requeues if spec.requeue else 0),
        "SCRIPT": str(spec.script_path or "<this script>"),
    }
    # a port free right now on this (the first) node: job-id-derived ports collide between jobs sharing a node
    port = (
        str(spec.master_port)
        if spec.master_port
        else ("""$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')""")
    )
    user_env = "\n".join(f"export {k}={_q(v)}" for k, v in spec.env.items())
    cmd = " \\\n    ".join(" ".join(g) for g in launch_command(spec))
    body = f"""
set -uo pipefail
{chr(10).join(f"{k}={_q(v)}" for k, v in exports.items())}
ATTEMPT=${{SLURM_RESTART_COUNT:-0}}
LOG_DIR="$RUN_DIR/slurm/logs/$SLURM_JOB_ID"
mkdir -p "$LOG_DIR"

# rendezvous on the first node of the allocation (this script runs there)
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT={port}
# NCCL: fail fast on a lost peer (so torchrun can restart) instead of hanging forever
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${{NCCL_DEBUG:-WARN}} TORCH_NCCL_DUMP_ON_TIMEOUT=${{TORCH_NCCL_DUMP_ON_TIMEOUT:-1}}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
{user_env}

record() {{  # one JSON line per event into the run dir (titan-world slurm status reads it)
  printf '{{"job_id":"%s","attempt":%s,"stage":"%s","event":"%s","rc":%s,"nodes":"%s","time":"%s"}}\\n' \\
    "$SLURM_JOB_ID" "$ATTEMPT" "$STAGE" "$1" "${{2:-null}}" "$SLURM_JOB_NODELIST" "$(date -Iseconds)" \\
    >> "$RUN_DIR/slurm/attempts.jsonl"
}}

preempted=0
on_preempt() {{
  [ "$preempted" = 1 ] && return
  preempted=1
  echo "[titan-world] $(date -Iseconds) SIGUSR1 (preemption or time limit): ranks checkpoint and exit"
  record signal
  scancel --signal=USR1 "$SLURM_JOB_ID" || echo "[titan-world] scancel --signal failed"
}}
trap on_preempt USR1

echo "[titan-world] $(date -Iseconds) job $SLURM_JOB_ID attempt $ATTEMPT on $SLURM_JOB_NODELIST" \\
  "(master $MASTER_ADDR:$MASTER_PORT)"
record start
{cmd} &
launcher=$!
while kill -0 "$launcher" 2>/dev/null; do wait "$launcher"; done  # wait returns early on a trapped signal
wait "$launcher"; rc=$?

if [ "$rc" -eq 0 ]; then
  echo "[titan-world] $(date -Iseconds) finished"; record done 0; exit 0
fi
if [ "$rc" -eq {EXIT_PREEMPTED} ] || [ "$preempted" = 1 ]; then
  if [ "$ATTEMPT" -lt "$MAX_REQUEUES" ]; then
    echo "[titan-world] $(date -Iseconds) checkpointed (rc=$rc):" \\
      "requeueing (attempt $((ATTEMPT + 1)) of at most $MAX_REQUEUES)"
    record requeue "$rc"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "[titan-world] scontrol requeue failed: resubmit with 'sbatch $SCRIPT' to resume"
  else
    echo "[titan-world] requeue limit ($MAX_REQUEUES) reached; resubmit with 'sbatch $SCRIPT' to resume"
  fi
fi
echo "[titan-world] $(date -Iseconds) failed with exit code $rc (rank logs: $LOG_DIR)"
record failed "$rc"
exit "$rc"
"""
    return "\n".join(header + sbatch) + "\n" + body
