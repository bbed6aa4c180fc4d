"""Launch section: SLURM resources, torchrun settings and the preemption/requeue policy.

Every field can be set in YAML (`launch:`), as an override (`launch.nodes=4`) or, for the
common ones, as a `titan-world slurm submit` flag (flags win). See docs/launch.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageResources:
    """Per curriculum stage resources for `--stages chain` (None: the launch.* value)."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    time: str | None = None


@dataclass
class LaunchConfig:
    nodes: int = 1
    gpus_per_node: int = 8  # 0: CPU-only tasks (gloo); then tasks_per_node ranks per node
    tasks_per_node: int | None = None  # ranks per node; None: gpus_per_node (or 1 on CPU)
    cpus_per_task: int | None = None  # None: let SLURM decide (CPU runs: one per rank)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    job_name: str | None = None  # None: run.name
    signal_seconds: int = 300  # SIGUSR1 to the batch script this long before the time limit
    max_restarts: int = 3  # torchrun elastic restarts of the worker group (crashes, lost ranks)
    max_requeues: int = 20  # preemption requeues before the job gives up
    one_task_per_gpu: bool = False  # default: one torchrun per node
    requeue: bool = True
    stages: str = "single"  # single: one allocation runs every stage | chain: one job per stage (afterok)
    stage_resources: dict[str, StageResources] = field(default_factory=dict)  # by stage name
    entry: str = "launch.cli train"  # module (+ leading args) every rank runs
    python: str | None = None  # interpreter on the nodes; None: the one that submits
    master_port: int | None = None  # None: a free port on the first node, picked at each start
    env: dict[str, str] = field(default_factory=dict)  # extra exports in the job script
    extra_sbatch: list[str] = field(default_factory=list)  # raw `#SBATCH` options, e.g. "--exclusive"
