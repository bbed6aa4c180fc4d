"""`titan-world slurm submit|status|cancel|logs`: a config to a preemption-safe SLURM job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.cli_common import add_config_arguments, config_from_args
from launch.slurm import SlurmError, cancel, follow, log_path, run_jobs, status_lines, submit

# submit flag -> launch.* key (flags win over the YAML and over launch.* overrides)
FLAG_KEYS = {
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "tasks_per_node": "tasks_per_node",
    "cpus_per_task": "cpus_per_task",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "time": "time",
    "signal_seconds": "signal_seconds",
    "max_restarts": "max_restarts",
    "stages": "stages",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser(
        "submit",
        help="write the sbatch script(s) into run.dir and submit them",
        description="Write a readable sbatch script into run.dir (plus the resolved config every node "
        "reads) and submit it. Overrides (key=value) work exactly as for `titan-world train`.",
    )
    add_config_arguments(s)
    s.add_argument("--nodes", type=int, help="nodes per job (launch.nodes)")
    s.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node; 0 = CPU-only tasks with gloo (launch.gpus_per_node)"
    )
    s.add_argument("--tasks-per-node", type=int, help="ranks per node (default: GPUs per node, 1 on CPU)")
    s.add_argument("--cpus-per-task", type=int, help="CPUs per SLURM task")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--time", help="time limit, e.g. 24:00:00 (launch.time)")
    s.add_argument(
        "--signal-seconds", type=int, help="SIGUSR1 this many seconds before the limit (launch.signal_seconds)"
    )
    s.add_argument("--max-restarts", type=int, help="torchrun elastic restarts per attempt (launch.max_restarts)")
    s.add_argument(
        "--one-task-per-gpu",
        action="store_true",
        default=None,
        help="srun one task per rank instead of one torchrun per node",
    )
    s.add_argument(
        "--stages",
        choices=("single", "chain"),
        help="single: one allocation for the whole curriculum; "
        "chain: one job per train stage, each after the previous (afterok)",
    )
    s.add_argument("--dry-run", action="store_true", help="print and write the script(s), do not submit")

    st = sub.add_parser("status", help="state of the run's jobs and their attempts")
    st.add_argument("run_dir", type=Path)
    c = sub.add_parser("cancel", help="cancel the run's pending/running jobs")
    c.add_argument("run_dir", type=Path)
    lg = sub.add_parser("logs", help="print a job's log (launcher) or one rank's log")
    lg.add_argument("run_dir", type=Path)
    lg.add_argument("--rank", type=int, default=None, help="global rank (default: the batch/launcher log)")
    lg.add_argument("--job", default=None, help="job id (default: the last submitted)")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")


def _submit(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(cfg.launch, key, value)
    if args.one_task_per_gpu:
        cfg.launch.one_task_per_gpu = True
    sub = submit(cfg, overrides=list(args.overrides), dry_run=args.dry_run)
    if sub.job_ids:
        print(
            f"run dir {sub.run_dir}\nfollow: titan-world slurm status {sub.run_dir}   |   "
            f"titan-world slurm logs {sub.run_dir} --rank 0 --follow"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "submit":
            return _submit(args)
        if args.action == "status":
            print("\n".join(status_lines(args.run_dir)))
            return 0
        if args.action == "cancel":
            ids = cancel(args.run_dir)
            print(f"cancelled {', '.join(ids)}" if ids else "nothing to cancel (no pending or running job)")
            return 0
        if args.action == "logs":
            path = log_path(args.run_dir, args.rank, args.job)
            if args.follow:
                follow(path, args.job or run_jobs(args.run_dir)[-1]["job_id"])
                return 0
            if not path.is_file():
                print(f"{path}: no log yet (job pending, or rank {args.rank} not started)", file=sys.stderr)
                return 1
            sys.stdout.write(path.read_text(errors="replace"))
            return 0
    except SlurmError as e:
        print(f"titan-world slurm: {e}", file=sys.stderr)
        return 1
    return 2
