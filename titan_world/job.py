"""The job runtime every training job runs on: `train`, `post-train causal`, `post-train dmd`.

`Job` owns what is the same for all of them: the process group and mesh, the run dir (rank 0's,
broadcast), the dataset, the checkpointer and the resume point, the step loop with its signals,
non-finite guard, metrics, checkpoint cadence and export. A job subclass says what differs:
`build` (its networks, built on the meta device and filled shard by shard, its optimizers and
loader), `train_step`, `state` (what a checkpoint holds), `record` and `export`.

Faults behave the same in every job (train/faults.py):
  * SIGUSR1/SIGTERM (preemption): the step finishes, a checkpoint is written, exit 75;
  * Ctrl-C: the same with exit 130 (a second Ctrl-C exits at once); the previous signal
    handlers are restored when the job returns;
  * a step whose loss or gradient norm is non-finite on any rank is skipped (no update, no
    periodic checkpoint); more than `train.max_bad_steps` in a row stop with exit 3, naming the
    last good checkpoint.
The ranks agree on skipping and stopping with one collective per step (`agree`).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.checkpoint import Checkpointer
from parallel.distributed import destroy, init_distributed
from parallel.mesh import build_mesh
from parallel.ulysses import UlyssesContext
from titan_world.config import ConfigError, TitanConfig, resolve_run_dir, save_config
from titan_world.data.loader import check_data_path, prepare_dataset
from titan_world.exit_codes import EXIT_DIVERGED
from titan_world.train.faults import INTERRUPT, PREEMPT, NonFiniteGuard, StopFlag, stop_exit_code, stop_message
from titan_world.train.metrics import MetricsLogger, ProfilerWindow
from titan_world.train.state import resume_point


def noise_seed(*parts) -> int:
    """The seed of a noise generator: crc32 of its identity ("seed/step/..."), the same on every
    rank and in every run: what the jobs' per-sample / per-rank noise draws from."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def poisoned(batch):
    """The batch with non-finite latents (`train.inject_nan_steps`: every loss of the step is NaN)."""
    if isinstance(batch, list):
        return [poisoned(b) for b in batch]
    return {**batch, "latents": batch["latents"] * float("nan")}


class Job:
    """Setup, resume and the step loop shared by every job; subclasses override the hooks below."""

    tag = "job"  # prefix of log lines ("train", "post-train dmd")
    loss_key = "loss"  # the metric the non-finite guard names

    def __init__(self, cfg: TitanConfig, resume: bool = False):
        self.cfg, t = cfg, cfg.train
        self.rank, self.world, self.device = init_distributed()
        self.check_config(resume)
        check_data_path(cfg)
        self.mesh = build_mesh(cfg.parallel, self.world, self.device.type)
        self.dp_rank, self.dp_size = self.mesh.dp_rank, self.mesh.dp_size
        self.cp = UlyssesContext.from_mesh(self.mesh, cfg.parallel.cp_backend)
        if resume and not cfg.run.dir:
            raise ConfigError("resume: run.dir is unset; name the run to continue (run.dir=RUN_DIR)")
        self.run_dir = self._shared_run_dir()
        self.ckpt = Checkpointer(self.run_dir, keep_last=t.keep_last)
        path = resume_point(self.ckpt, resume)  # before anything is written into the run dir
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
            prepare_dataset(cfg, progress=cfg.run.progress)  # the other ranks wait for it
        self._barrier()
        self.stop = StopFlag(self.tag)
        self.on_step: Callable[[int], None] | None = None  # called as each step starts (tests send signals)
        self.position: dict = {"step": 0}  # checkpointed: step, skipped, bad_streak, job counters
        self.resumed_from: Path | None = None
        self.last_saved = -1
        torch.manual_seed(t.seed)  # modules with no per-tensor init (the GAN head) start the same on every rank
        self.build(path)
        if path is not None:
            self.load(path)
            self.resumed_from, self.last_saved = self.ckpt.loaded_from, self.position["step"]
        self.batches = self.loader.batches()

    # -- what a job overrides ---------------------------------------------------------------------
    def check_config(self, resume: bool) -> None:
        """Checks that need the world size or the file system (raise ConfigError naming the key)."""

    def build(self, resume_from: Path | None) -> None:
        """Networks (sharded, then filled: by the checkpoint load when resuming), optimizers,
        `self.loader`, `self.total` (steps)."""
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def train_step(self, step: int, batch) -> dict:
        """One update; the metrics it returns hold `skipped` and `stop` from `agree`."""
        raise NotImplementedError

    def export(self, log: MetricsLogger) -> None:
        raise NotImplementedError

    def next_batch(self, step: int):
        return next(self.batches)

    def record(self, step: int, out: dict, batch, dt: float) -> dict:
        values = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in out.items()}
        return {"step": step, "stage": self.tag.split()[-1], **values, "step_time_s": dt}

    def log_due(self, step: int) -> bool:
        return True

    def announce(self, log: MetricsLogger) -> None:
        """Lines logged when the loop starts."""

    def after_step(self, log: MetricsLogger) -> None:
        """After the step counter moved (training enters its next curriculum stage here)."""

    # -- shared pieces ----------------------------------------------------------------------------
    @property
    def shards(self) -> bool:
        """Networks are FSDP-sharded: several ranks (post-training: unless posttrain.fsdp=false)."""
        return self.world > 1

    @property
    def fsdp_mesh(self):
        """The mesh `parallelize` shards over, None when the networks are not sharded."""
        return self.mesh if self.shards else None

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _shared_run_dir(self) -> Path:
        box = [str(resolve_run_dir(self.cfg)) if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        self.cfg.run.dir = box[0]
        run_dir = Path(box[0])
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir

    def load(self, path: Path) -> None:
        """Restore `state()` from checkpoint `path` (an older one if it fails to load)."""
        self.ckpt.load(path, self.state())

    def save(self) -> Path:
        self.last_saved = self.position["step"]
        return self.ckpt.save(self.position["step"], self.state())

    def stop_flags(self, step: int) -> list[float]:
        """This rank's [preempt, interrupt] request, summed over ranks with the step's other values
        (`train.preempt_at_step`: behave as if SIGUSR1 arrived during that step)."""
        hook = self.cfg.train.preempt_at_step is not None and step + 1 == self.cfg.train.preempt_at_step
        return [float(self.stop.code == PREEMPT or hook), float(self.stop.code == INTERRUPT)]

    @staticmethod
    def stop_code(preempt: float, interrupt: float) -> float:
        return INTERRUPT if interrupt else PREEMPT if preempt else 0.0  # a Ctrl-C on any rank wins

    def agree(self, step: int, values: list[float]) -> tuple[bool, float]:
        """(skip: a value is non-finite on some rank, the agreed stop code): one all-reduce."""
        bad = float(not all(math.isfinite(v) for v in values))
        flags = torch.tensor([bad, *self.stop_flags(step)], device=self.device)
        if self.world > 1:
            dist.all_reduce(flags)
        bad, preempt, interrupt = flags.tolist()
        return bad > 0, self.stop_code(preempt, interrupt)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> int:
        cfg, t, pos = self.cfg, self.cfg.train, self.position
        log = MetricsLogger(
            self.run_dir,
            cfg,
            rank=self.rank,
            total_steps=self.total,
            initial_step=pos["step"],
            resumed=self.resumed_from is not None,
        )
        prof = ProfilerWindow(list(t.profile_steps), self.run_dir, self.rank, self.device)
        guard = NonFiniteGuard(pos, t.max_bad_steps, self.tag, log.message, self.ckpt.latest)
        self.stop.install()
        if self.resumed_from is not None:
            log.message(f"[{self.tag}] resumed from {self.resumed_from} at step {pos['step']}")
        self.announce(log)
        rc = 0
        try:
            while pos["step"] < self.total:
                step = pos["step"]
                t0 = time.perf_counter()
                prof.step_begin(step)
                batch = self.next_batch(step)
                if step in t.inject_nan_steps:  # test hook: a batch that makes every loss non-finite
                    batch = poisoned(batch)
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                if self.on_step is not None:
                    self.on_step(step)
                out = self.train_step(step, batch)
                skipped, stop = out.pop("skipped"), out.pop("stop")
                dt = time.perf_counter() - t0
                trace = prof.step_end(step)
                if trace:
                    log.message(f"[{self.tag}] profiler trace: {trace}")
                pos["step"] = step + 1
                if self.log_due(step):
                    log.log(self.record(step, {**out, "skipped": skipped}, batch, dt))
                log.progress(1, {k: f"{v:.4f}" for k, v in out.items() if k.endswith("loss")})
                if guard.after_step(step, out[self.loss_key], skipped):
                    rc = EXIT_DIVERGED
                    break
                self.after_step(log)
                if stop:
                    log.message(stop_message(self.tag, stop, self.save()))
                    rc = stop_exit_code(stop)
                    break
                # no periodic save inside a streak of skipped steps: the last checkpoint stays the last good one
                due = t.ckpt_every and pos["step"] % t.ckpt_every == 0 and pos["step"] < self.total
                if due and not guard.in_streak:
                    self.save()
            if rc == 0:
                if self.last_saved != pos["step"]:
                    self.save()
                if t.export:
                    self.export(log)
        finally:
            self.stop.restore()
            log.close()
            self.loader.close()
        return rc


def run_job(job: type[Job], cfg: TitanConfig, resume: bool = False) -> int:
    """Build the job, run it, tear the process group down; returns the exit code."""
    try:
        return job(cfg, resume).fit()
    finally:
        destroy()
