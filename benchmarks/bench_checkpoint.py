"""Does saving a checkpoint slow the training steps after it? One process, a 1-rank gloo group.

    python -m benchmarks.bench_checkpoint [--saves 4] [--steps 30]

Times tiny-model train steps (forward, backward, AdamW) before and after `--saves` checkpoint saves of
model + optimizer, in one run for each way of calling DCP on one rank:
- `Checkpointer` (ours: one rank saves with `no_dist`, no collectives);
- DCP over the process group (the baseline: what `Checkpointer` did before, with a group initialised).
With torch 2.13 on CPU the second left every later op of the process 1.2-3x slower, and more after
each save, which made the demo teacher's steps 50% slower from its first checkpoint on (docs/train.md).
Prints seconds per step before/after and the ratio; a ratio near 1.0 means saves leave steps alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from benchmarks.common import time_fn
from parallel.checkpoint import Checkpointer, _ModelState, _OptimState
from titan_world.conditioning import noise_batch
from titan_world.config import load_config
from titan_world.model import ActionInputs, build_model


def _step_fn(batch: int = 4, frames: int = 5):
    """A train step of the embedded default's model on a fixed random batch, and its optimizer."""
    torch.manual_seed(0)
    cfg = load_config()
    mc, d = cfg.model, cfg.data
    model = build_model(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    h, w = d.height // d.codec.spatial_stride, d.width // d.codec.spatial_stride
    clean = torch.randn(batch, mc.out_dim, frames, h, w)
    given = torch.zeros(batch, frames, dtype=torch.bool)
    given[:, 0] = True
    nb = noise_batch(clean, given, torch.rand(batch), torch.randn_like(clean), with_i2v_channels=True)
    eye = torch.eye(4).expand(batch, frames, 4, 4).clone()
    centre = torch.tensor([d.width / 2, d.height / 2, d.width / 2, d.height / 2])  # fx, fy, cx, cy: 90 deg fov
    actions = ActionInputs(torch.zeros(batch, frames, mc.action.num_keys), eye, centre.expand(batch, frames, 4))
    text = torch.randn(batch, mc.text_len, mc.text_dim)

    def step() -> None:
        out = model(nb.x_t, nb.t, text, cond=nb.cond, actions=actions)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    return model, opt, step


def _measure(save, saves: int, steps: int) -> tuple[float, float]:
    model, opt, step = _step_fn()
    cpu = torch.device("cpu")
    before = time_fn(lambda: [step() for _ in range(steps)], cpu, warmup=1, iters=3) / steps
    with tempfile.TemporaryDirectory() as d:
        for i in range(saves):
            save(model, opt, d, i)
    after = time_fn(lambda: [step() for _ in range(steps)], cpu, warmup=1, iters=3) / steps
    return before, after


def _ours(model, opt, d: str, i: int) -> None:
    Checkpointer(d, keep_last=1).save(i + 1, {"model": model, "optimizer": opt, "trainer": {"step": i}})


def _process_group_path(model, opt, d: str, i: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = {"model": _ModelState(model), "optimizer": _OptimState(model, opt)}
        dcp.save(state, checkpoint_id=os.path.join(d, f"step_{i}"), no_dist=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saves", type=int, default=4, help="checkpoint saves between the two timings")
    p.add_argument("--steps", type=int, default=30, help="train steps per timed round (median of 3 rounds)")
    args = p.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29577")
    dist.init_process_group("gloo", rank=0, world_size=1)  # as a 1-rank training job has one
    try:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tiny model, batch 4 x 5 latent frames")
        print(f"{'save path':<34} {'s/step before':>14} {'after':>8} {'after/before':>13}")
        for name, save in (
            ("Checkpointer (no_dist on 1 rank)", _ours),
            ("DCP over the process group", _process_group_path),
        ):
            before, after = _measure(save, args.saves, args.steps)
            print(f"{name:<34} {before:14.4f} {after:8.4f} {after / before:13.2f}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
