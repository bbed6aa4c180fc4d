"""Launch section: SLURM resources and torchrun settings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LaunchConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit
    max_restarts: int = 3  # torchrun elastic restarts on node failure
    one_task_per_gpu: bool = False  # default: one torchrun per node
    requeue: bool = True
    extra_sbatch: list[str] = field(default_factory=list)
