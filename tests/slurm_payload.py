"""A stand-in trainer for the launcher tests: same CLI and signal contract as `titan-world train`.

`python -m tests.slurm_payload --config FILE [--resume] [key=value ...]` runs a deterministic
toy regression on WORLD_SIZE ranks (gloo all-reduce), writes RUN_DIR/metrics.jsonl lines
{"step", "loss"} and checkpoints RUN_DIR/payload_ckpt.json atomically. On SIGUSR1/SIGTERM it
finishes the current step, agrees with the other ranks to stop (all-reduce, so every rank stops
at the same step), checkpoints and exits with EXIT_PREEMPTED (75). Like the trainer, it continues
from the checkpoint when the run dir holds one, and `--resume` with none is an error (exit 2).
The loss sequence depends only on the step, so an interrupted-and-resumed run ends with exactly
the loss of an uninterrupted one.
Env TW_PAYLOAD_STEP_SLEEP (seconds per step) keeps it running long enough to be preempted;
TW_PAYLOAD_CRASH_AT=STEP makes the last rank die at that step in the first torchrun attempt
(to test elastic restarts).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launch.torchrun import EXIT_PREEMPTED
from titan_world.config import load_config

DIM = 8


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, DIM, generator=g, dtype=torch.float64)
    w_true = torch.arange(1, DIM + 1, dtype=torch.float64) / DIM
    return x, x @ w_true


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--resume", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    total = cfg.train.steps if cfg.train.steps is not None else sum(s.steps for s in cfg.train.stages)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    stop = {"flag": False}

    def on_signal(signum, _frame):
        print(f"rank {rank}: got {signal.Signals(signum).name}", flush=True)
        stop["flag"] = True

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    ckpt = run_dir / "payload_ckpt.json"
    w, start = torch.zeros(DIM, dtype=torch.float64), 0
    if args.resume and not ckpt.is_file():
        print(f"--resume: nothing to resume in run.dir={run_dir} (no {ckpt.name})", file=sys.stderr)
        return 2
    if ckpt.is_file():
        state = json.loads(ckpt.read_text())
        w, start = torch.tensor(state["w"], dtype=torch.float64), state["step"]
        print(f"rank {rank}: resumed at step {start}", flush=True)
    print(f"rank {rank}/{world}: training steps {start}..{total}", flush=True)
    sleep = float(os.environ.get("TW_PAYLOAD_STEP_SLEEP", "0"))
    step = start
    crash_at = int(os.environ.get("TW_PAYLOAD_CRASH_AT", "-1"))
    while step < total:
        if step == crash_at and rank == world - 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            print(f"rank {rank}: simulated crash at step {step}", flush=True)
            os._exit(13)
        x, y = batch(step, rank)
        err = x @ w - y
        grad = 2 * x.T @ err / len(y)
        loss = (err**2).mean().reshape(1)
        flag = torch.tensor([1.0 if stop["flag"] else 0.0])
        if world > 1:
            dist.all_reduce(grad)
            dist.all_reduce(loss)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            grad, loss = grad / world, loss / world
        w = w - 0.05 * grad
        step += 1
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": float(loss)}) + "\n")
        preempt = bool(flag.item())
        if rank == 0 and (preempt or step == total or step % cfg.train.ckpt_every == 0):
            tmp = ckpt.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "w": w.tolist()}))
            os.replace(tmp, ckpt)
        if world > 1:
            dist.barrier()
        if preempt and step < total:
            print(f"rank {rank}: checkpointed at step {step}, exiting {EXIT_PREEMPTED}", flush=True)
            if world > 1:
                dist.destroy_process_group()
            return EXIT_PREEMPTED
        time.sleep(sleep)
    print(f"rank {rank}: done at step {step}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return 0


def reference_losses(total: int, world: int) -> list[float]:
    """The losses an uninterrupted `world`-rank run logs (same arithmetic, in one process)."""
    w, out = torch.zeros(DIM, dtype=torch.float64), []
    for step in range(total):
        grads, losses = [], []
        for rank in range(world):
            x, y = batch(step, rank)
            err = x @ w - y
            grads.append(2 * x.T @ err / len(y))
            losses.append((err**2).mean().reshape(1))
        grad, loss = sum(grads[1:], grads[0]) / world, sum(losses[1:], losses[0]) / world
        w = w - 0.05 * grad
        out.append(float(loss))
    return out


if __name__ == "__main__":
    sys.exit(main())
