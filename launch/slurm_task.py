"""One rank of a SLURM job: `python -m launch.slurm_task [--from-slurm] [--log-dir D] MODULE ARGS`.

Runs MODULE in *this* process (runpy), so signals reach the trainer directly and its exit code
is the task's. Before that it
- with `--from-slurm` (one task per GPU, no torchrun): maps SLURM_PROCID/NTASKS/LOCALID/NODEID
  to the torch.distributed variables RANK/WORLD_SIZE/LOCAL_RANK/GROUP_RANK;
- with `--log-dir`: appends this rank's stdout/stderr to D/rank-<RANK>.log (one file per rank,
  a header per attempt), which is what `titan-world slurm logs RUN --rank R` shows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import runpy
import sys
from collections.abc import Sequence


def torch_env_from_slurm(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed variables for a task started directly by srun."""
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID") if k not in env]
    if missing:
        raise RuntimeError(f"--from-slurm: {', '.join(missing)} not set (run this under srun)")
    ntasks_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
    local_world = ntasks_node.split("(")[0].split(",")[0]
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": local_world,
        "GROUP_RANK": env.get("SLURM_NODEID", "0"),
    }


def redirect_output(log_dir: str, rank: str) -> str:
    """Point fd 1 and 2 at the rank's log (append); return its path."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"rank-{rank}.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    header = (
        f"===== {dt.datetime.now().isoformat(timespec='seconds')} job {os.environ.get('SLURM_JOB_ID', '-')} "
        f"attempt {attempt} elastic-restart {restart} rank {rank} host {os.uname().nodename} =====\n"
    )
    os.write(fd, header.encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm_task", description=__doc__.splitlines()[0])
    parser.add_argument("--from-slurm", action="store_true", help="set RANK/WORLD_SIZE/... from SLURM_* (no torchrun)")
    parser.add_argument("--log-dir", default=None, help="append this rank's output to LOG_DIR/rank-<RANK>.log")
    parser.add_argument("module", help="module to run as __main__, e.g. launch.cli")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if ns.from_slurm:
        os.environ.update(torch_env_from_slurm(dict(os.environ)))
    if ns.log_dir:
        redirect_output(ns.log_dir, os.environ.get("RANK", "0"))
    sys.argv = [ns.module, *ns.args]
    runpy.run_module(ns.module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
