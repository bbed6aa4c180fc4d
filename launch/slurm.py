"""SLURM jobs of a run: plan them from the config, write their scripts, submit, follow, cancel.

A run directory is the unit a user deals with. Submitting writes into it
- `config.yaml`: the resolved config (overrides applied, run.dir absolute) every node reads;
- `slurm/<job>.sbatch`: the job script(s), readable and resubmittable by hand;
- `slurm/jobs.jsonl`: one line per submitted job (id, stage, script, dependency);
- `slurm/attempts.jsonl`: written by the job itself: start/signal/requeue/done/failed per attempt;
- `slurm/logs/<jobid>.out` (launcher + torchrun) and `slurm/logs/<jobid>/rank-<R>.log`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch.slurm_script import JobSpec, render
from titan_world.config import ConfigError, TitanConfig, resolve_run_dir, save_config


class SlurmError(RuntimeError):
    """A SLURM command failed or is missing; the message says what to do."""


def require(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        raise SlurmError(
            f"`{command}` not found: install the SLURM client tools (Debian: apt-get install slurm-client, "
            "or run on a cluster login node), or use `titan-world slurm submit --dry-run` to only write the script"
        )
    return path


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    require(argv[0])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


# -- planning -------------------------------------------------------------------------------
def _ranks_per_node(gpus: int, tasks: int | None) -> int:
    return tasks if tasks else (gpus if gpus > 0 else 1)


def _check_launch(cfg: TitanConfig) -> None:
    lc = cfg.launch
    if lc.nodes < 1:
        raise ConfigError(f"launch.nodes={lc.nodes}: expected >= 1")
    if lc.gpus_per_node < 0:
        raise ConfigError(f"launch.gpus_per_node={lc.gpus_per_node}: expected >= 0 (0: CPU-only tasks)")
    if lc.tasks_per_node is not None and lc.tasks_per_node < 1:
        raise ConfigError(f"launch.tasks_per_node={lc.tasks_per_node}: expected >= 1")
    if lc.stages not in ("single", "chain"):
        raise ConfigError(f"launch.stages={lc.stages!r}: expected single (one allocation) or chain (one job per stage)")
    if lc.signal_seconds < 0:
        raise ConfigError(f"launch.signal_seconds={lc.signal_seconds}: expected >= 0")
    names = {s.name for s in cfg.train.stages}
    unknown = sorted(set(lc.stage_resources) - names)
    if unknown:
        raise ConfigError(f"launch.stage_resources: unknown stage(s) {unknown}; stages are {sorted(names)}")


def plan_jobs(
    cfg: TitanConfig, run_dir: Path, config_path: Path, *, workdir: Path, overrides: list[str] = ()
) -> list[JobSpec]:
    """One JobSpec (single) or one per curriculum stage (chain: stage k trains up to its last step)."""
    _check_launch(cfg)
    lc = cfg.launch
    entry = shlex.split(lc.entry)
    if not entry:
        raise ConfigError("launch.entry='': expected a module, e.g. 'launch.cli train'")

    def spec(stage: str | None, res, trainer_args: list[str], tag: str) -> JobSpec:
        gpus = res.gpus_per_node if res and res.gpus_per_node is not None else lc.gpus_per_node
        tasks = res.tasks_per_node if res and res.tasks_per_node is not None else lc.tasks_per_node
        ranks = _ranks_per_node(gpus, tasks)
        cpus = lc.cpus_per_task or (None if gpus > 0 else (1 if lc.one_task_per_gpu else ranks))
        name = lc.job_name or cfg.run.name
        return JobSpec(
            run_dir=run_dir,
            config_path=config_path,
            workdir=workdir,
            python=lc.python or sys.executable,
            entry=entry,
            job_name=f"{name}-{stage}" if stage else name,
            nodes=(res.nodes if res and res.nodes else lc.nodes),
            gpus_per_node=gpus,
            ranks_per_node=ranks,
            cpus_per_task=cpus,
            time=(res.time if res and res.time else lc.time),
            partition=lc.partition,
            account=lc.account,
            qos=lc.qos,
            signal_seconds=lc.signal_seconds,
            requeue=lc.requeue,
            max_requeues=lc.max_requeues,
            max_restarts=lc.max_restarts,
            one_task_per_gpu=lc.one_task_per_gpu,
            master_port=lc.master_port,
            stage=stage,
            trainer_args=trainer_args,
            env=dict(lc.env),
            extra_sbatch=list(lc.extra_sbatch),
            overrides_note=list(overrides),
            script_path=run_dir / "slurm" / f"{tag}.sbatch",
        )

    if lc.stages == "single":
        return [spec(None, None, [], "job")]
    if "post-train" in entry:
        raise ConfigError(
            f"launch.stages=chain with launch.entry={lc.entry!r}: a chain splits train.stages into jobs, which only "
            "`train` runs; submit post-training with launch.stages=single"
        )
    jobs, done = [], 0
    limit = cfg.train.steps
    for i, stage in enumerate(cfg.train.stages):
        if limit is not None and done >= limit:
            break
        done += stage.steps
        end = done if limit is None else min(done, limit)
        res = lc.stage_resources.get(stage.name)
        jobs.append(spec(stage.name, res, [f"train.steps={end}"], f"stage{i}-{stage.name}"))
    return jobs


# -- submit ---------------------------------------------------------------------------------
@dataclass
class Submission:
    run_dir: Path
    jobs: list[JobSpec]
    job_ids: list[str]


def prepare_run(cfg: TitanConfig) -> tuple[Path, Path]:
    """Make run.dir absolute, create it and write the config every node reads."""
    run_dir = resolve_run_dir(cfg).resolve()
    cfg.run.dir = str(run_dir)
    (run_dir / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    save_config(cfg, config_path)
    return run_dir, config_path


def submit(
    cfg: TitanConfig, *, overrides: list[str] = (), dry_run: bool = False, workdir: Path | None = None, echo=print
) -> Submission:
    """Write the script(s) into the run dir; unless dry_run, sbatch them (chained with afterok)."""
    if not dry_run:
        require("sbatch")
    run_dir, config_path = prepare_run(cfg)
    jobs = plan_jobs(cfg, run_dir, config_path, workdir=(workdir or Path.cwd()).resolve(), overrides=list(overrides))
    for job in jobs:
        job.script_path.write_text(render(job))
        job.script_path.chmod(0o755)
    ids: list[str] = []
    for job in jobs:
        if dry_run:
            echo(job.script_path.read_text())
            echo(f"# dry run: wrote {job.script_path} (not submitted)")
            continue
        argv = ["sbatch", "--parsable"]
        dep = f"afterok:{ids[-1]}" if ids else None
        if dep:
            argv += [f"--dependency={dep}", "--kill-on-invalid-dep=yes"]
        proc = _run([*argv, str(job.script_path)])
        if proc.returncode != 0:
            raise SlurmError(f"sbatch {job.script_path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        job_id = proc.stdout.strip().split(";")[0]
        ids.append(job_id)
        append_jsonl(
            run_dir / "slurm" / "jobs.jsonl",
            {
                "job_id": job_id,
                "stage": job.stage,
                "script": str(job.script_path),
                "dependency": dep,
                "nodes": job.nodes,
                "ranks_per_node": job.ranks_per_node,
                "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
        echo(f"submitted job {job_id}{f' (stage {job.stage}, after {ids[-2]})' if dep else ''}: {job.script_path}")
    return Submission(run_dir, jobs, ids)


# -- run-dir records --------------------------------------------------------------------------
def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed job
    return out


def run_jobs(run_dir: Path) -> list[dict]:
    jobs = read_jsonl(Path(run_dir) / "slurm" / "jobs.jsonl")
    if not jobs:
        raise SlurmError(
            f"{run_dir}: no SLURM jobs recorded (slurm/jobs.jsonl); submit with `titan-world slurm submit`"
        )
    return jobs


# -- follow-ups -------------------------------------------------------------------------------
ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
}


def job_info(job_id: str) -> dict[str, str] | None:
    """`scontrol show job` as a dict (None once SLURM forgot the job: accounting is optional)."""
    proc = _run(["scontrol", "show", "job", "-o", str(job_id)], timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def status_lines(run_dir: Path) -> list[str]:
    run_dir = Path(run_dir)
    attempts = read_jsonl(run_dir / "slurm" / "attempts.jsonl")
    lines = [f"run {run_dir}"]
    for job in run_jobs(run_dir):
        jid = job["job_id"]
        mine = [a for a in attempts if a.get("job_id") == jid]
        info = job_info(jid)
        if info is not None:
            state = info.get("JobState", "?")
            extra = (
                f"reason={info.get('Reason')} restarts={info.get('Restarts')} "
                f"nodes={info.get('NodeList')} runtime={info.get('RunTime')}"
            )
        else:
            last = mine[-1]["event"] if mine else "unknown"
            state, extra = f"not in SLURM (last recorded event: {last})", ""
        events = ",".join(f"{a['attempt']}:{a['event']}" for a in mine) or "none yet"
        stage = f" stage={job['stage']}" if job.get("stage") else ""
        lines.append(f"  job {jid}{stage}: {state} {extra}".rstrip())
        lines.append(f"    attempts: {events}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        tail = read_jsonl(metrics)
        if tail:
            lines.append(f"  last metrics: {json.dumps(tail[-1])}")
    return lines


def cancel(run_dir: Path) -> list[str]:
    """scancel every job of the run that SLURM still knows as active; return their ids."""
    cancelled = []
    for job in run_jobs(run_dir):
        info = job_info(job["job_id"])
        if info is None or info.get("JobState") not in ACTIVE:
            continue
        proc = _run(["scancel", job["job_id"]])
        if proc.returncode != 0:
            raise SlurmError(f"scancel {job['job_id']} failed: {proc.stderr.strip()}")
        cancelled.append(job["job_id"])
        append_jsonl(
            Path(run_dir) / "slurm" / "attempts.jsonl",
            {
                "job_id": job["job_id"],
                "attempt": info.get("Restarts"),
                "stage": job.get("stage") or "",
                "event": "cancelled",
                "rc": None,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    return cancelled


def log_path(run_dir: Path, rank: int | None = None, job_id: str | None = None) -> Path:
    """The batch log of a job (default: the last submitted) or one rank's log."""
    jobs = run_jobs(run_dir)
    jid = job_id or jobs[-1]["job_id"]
    base = Path(run_dir) / "slurm" / "logs"
    return base / f"{jid}.out" if rank is None else base / str(jid) / f"rank-{rank}.log"


def follow(path: Path, job_id: str, out=None, poll: float = 1.0) -> None:
    """Print `path` and keep printing what is appended until the job leaves SLURM's queue."""
    out = out or sys.stdout
    pos = 0
    while True:
        if path.is_file():
            with open(path, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                out.write(chunk)
                out.flush()
        info = job_info(job_id)
        if info is None or info.get("JobState") not in ACTIVE:
            if not path.is_file() or path.stat().st_size == pos:
                return
        time.sleep(poll)
