"""Timing and reporting shared by the benchmarks: CUDA-event timing, peaks, one table format."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call (CUDA events on GPU, perf_counter on CPU), after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@dataclass
class Row:
    name: str
    phase: str
    seconds: float
    flops: float
    tokens: int
    peak_gb: float | None
    peak_tflops: float | None

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12

    def format(self, baseline: Row | None) -> str:
        mfu = f"{100 * self.tflops / self.peak_tflops:5.1f}%" if self.peak_tflops else "    -"
        mem = f"{self.peak_gb:6.1f}" if self.peak_gb is not None else "     -"
        ratio = f"{baseline.seconds / self.seconds:5.2f}x" if baseline else "    -"
        return (
            f"{self.name:<34} {self.phase:<6} {self.seconds * 1e3:9.1f} ms {self.tflops:8.1f} {mfu} "
            f"{self.tokens / self.seconds:11,.0f} {mem} {ratio}"
        )


HEADER = (
    f"{'implementation':<34} {'phase':<6} {'time':>12} {'TFLOP/s':>8} {'MFU':>6} {'tokens/s':>11} {'peakGB':>6} "
    f"{'vs base':>6}"
)


def parse_serving_args(p, argv: list[str] | None):
    """The options the serving benchmarks share (--config, --threads, --json, key=value
    overrides) added to parser `p`, parsed; sets the thread count, quiets logging and returns
    (args, TitanConfig)."""
    import logging

    from launch.cli_common import config_from_args

    p.add_argument("--config", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    return args, config_from_args(args)


def write_json(path: str | None, obj: object) -> None:
    """`--json FILE`: also write a benchmark's results there (nothing when no file was asked for)."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)


def model_config(name: str):
    """A model config by name (configs/model/NAME.yaml), or the model section of a full config file."""
    from omegaconf import OmegaConf

    from titan_world.config import resolve_config_path
    from titan_world.model.config import ModelConfig

    path = resolve_config_path(name if "/" in name or name.endswith(".yaml") else f"model/{name}")
    node = OmegaConf.load(path)
    if "model" in node:  # a full config (e.g. tiny.yaml)
        from titan_world.config import load_config

        return load_config(path, []).model
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))
