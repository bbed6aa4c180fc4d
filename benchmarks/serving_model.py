"""A model of streaming fps on GPUs we could not measure, calibrated on the ones we did.

    python -m benchmarks.serving_model [--gpus 1 4 8] [--json FILE]

Not a measurement: #9 asks for the 14B student on 4 GPUs, and the machine lent to this project
has one. What is measured (benchmarks/RESULTS.md, one H100, torch 2.11, bf16, 480x832, chunks
of 3 latent frames, sink 1 + window 6, compiled, last-step KV refresh): a denoising pass costs
94.75 ms for the 1.3B student (30 layers) and 118.75 ms for 10 layers of the 14B expert.

Per layer and pass the model charges
  - kernels: GEMM FLOPs at 700 TFLOP/s and attention FLOPs at 595 TFLOP/s (RESULTS.md reference numbers: the
    measured DiT-shaped GEMM and cuDNN SDPA rates), split over the GPUs (Ulysses splits tokens
    for the GEMMs, heads for attention);
  - `host` seconds that do not shrink with GPUs (Python, kernel launches: what CUDA graphs remove);
  - `per_elem` seconds per token x width (memory-bound work: norms, modulation, RoPE, casts),
    split over the GPUs;
  - with P > 1 GPUs, 4 all-to-alls (q, k, v in, output back), each moving (P-1)/P of a
    [tokens/P, d] bf16 shard over NVLink (450 GB/s per GPU) plus 20 us of latency.
`host` and `per_elem` are solved from the two measured passes (two equations, two unknowns), so
the model reproduces both measurements exactly; everything else is an assumption written above.
Per chunk, the measured pipelined runs spent ~65 ms beyond the denoising passes (446 vs 379 ms
for the 1.3B student, 538 vs 475 ms for the 10-layer 14B: JPEG encoding on the CPU competing with
kernel launches, the embedding, sampling arithmetic); the model adds that constant. Levers: CUDA
graphs set `host` to 0; FP8 GEMMs run at 1.6x the bf16 rate (torchao's H100 figure for large
GEMMs; not measured here). Decode runs on rank 0's GPU, on its own stream: `fps` counts it as
free (hidden in the GPU's idle time, as it was behind the launch-bound eager passes measured);
`fps_wan_vae_shared` charges the Wan VAE's ~39 frames/s at 480p (RESULTS.md reference numbers: ~26 ms of the GPU
per frame) on top of the chunk, which is what it costs once CUDA graphs keep the GPU busy — the
case for a light decoder (`titan-world distill-decoder`, benchmarks/bench_decoder.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from benchmarks.common import write_json

GEMM_TFLOPS, ATTN_TFLOPS, NVLINK_GBS, A2A_LATENCY_S = 700.0, 595.0, 450.0, 20e-6
FP8_GEMM_SPEEDUP = 1.6
VAE_DECODE_FPS = 39.0
CHUNK_OVERHEAD_S = 0.065  # measured: pipelined chunk time minus its denoising passes (see above)
TEXT_TOKENS = 512
# Measured (benchmarks/RESULTS.md, serving table): seconds per denoising pass, and its layers.
MEASURED = {"1.3B": (0.09475, 30), "14B": (0.11875, 10)}
SHAPES = {"1.3B": (1536, 8960, 12, 30), "14B": (5120, 13824, 40, 40)}  # dim, ffn, heads, layers


@dataclass
class Geometry:
    tokens_per_frame: int = 1560  # 480x832: 60x104 latents, 2x2 patches
    chunk_frames: int = 3
    sink_frames: int = 1
    window_frames: int = 6
    steps: int = 4
    clean_refresh: bool = False  # kv_refresh=clean adds a pass per chunk

    @property
    def query_tokens(self) -> int:
        return self.chunk_frames * self.tokens_per_frame

    @property
    def key_tokens(self) -> int:
        return (self.chunk_frames + self.sink_frames + self.window_frames) * self.tokens_per_frame

    @property
    def passes(self) -> int:
        return self.steps + int(self.clean_refresh)


def layer_kernel_s(dim: int, ffn: int, g: Geometry, gpus: int = 1, fp8: bool = False) -> float:
    q, k = g.query_tokens, g.key_tokens
    gemm = 2 * q * (6 * dim * dim + 2 * dim * ffn)  # self q,k,v,o + cross q,o (cross K/V cached per prompt) + FFN
    attn = 4 * q * k * dim + 4 * q * TEXT_TOKENS * dim
    rate = GEMM_TFLOPS * (FP8_GEMM_SPEEDUP if fp8 else 1.0)
    return (gemm / (rate * 1e12) + attn / (ATTN_TFLOPS * 1e12)) / gpus


def a2a_s(dim: int, g: Geometry, gpus: int) -> float:
    if gpus == 1:
        return 0.0
    shard = g.query_tokens / gpus * dim * 2
    return 4 * (shard * (gpus - 1) / gpus / (NVLINK_GBS * 1e9) + A2A_LATENCY_S)


def calibrate(g: Geometry) -> tuple[float, float]:
    """(host seconds per layer-pass, seconds per token x width) from the two measured passes."""
    rows = []
    for name, (seconds, layers) in MEASURED.items():
        dim, ffn, _, _ = SHAPES[name]
        rows.append((seconds / layers - layer_kernel_s(dim, ffn, g), g.query_tokens * dim))
    (r1, x1), (r2, x2) = rows
    per_elem = (r2 - r1) / (x2 - x1)
    return r1 - per_elem * x1, per_elem


def chunk_seconds(name: str, g: Geometry, gpus: int, *, graphs: bool = False, fp8: bool = False) -> float:
    dim, ffn, heads, layers = SHAPES[name]
    if heads % gpus:
        raise ValueError(f"{name}: {heads} heads do not split over {gpus} GPUs")
    host, per_elem = calibrate(g)
    layer = (
        layer_kernel_s(dim, ffn, g, gpus, fp8)
        + (0.0 if graphs else host)
        + per_elem * g.query_tokens * dim / gpus
        + a2a_s(dim, g, gpus)
    )
    return layer * layers * g.passes


def table(gpus: list[int]) -> list[dict]:
    g = Geometry()
    frames = 4 * g.chunk_frames
    rows = []
    for name in SHAPES:
        for p in gpus:
            for label, kw in (
                ("compiled, last-step refresh", {}),
                ("+ CUDA graphs", {"graphs": True}),
                ("+ CUDA graphs + FP8 GEMMs", {"graphs": True, "fp8": True}),
            ):
                try:
                    s = chunk_seconds(name, g, p, **kw)
                except ValueError:
                    continue
                fps = frames / (s + CHUNK_OVERHEAD_S)
                shared = frames / (s + CHUNK_OVERHEAD_S + frames / VAE_DECODE_FPS)
                rows.append(
                    {
                        "student": name,
                        "gpus": p,
                        "levers": label,
                        "denoise_ms": 1e3 * s,
                        "fps": fps,
                        "fps_wan_vae_shared": shared,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    host, per_elem = calibrate(Geometry())
    print(
        f"calibrated on the measured passes: host {1e3 * host:.2f} ms per layer-pass, "
        f"{per_elem * 1e12:.0f} ps per token x width (memory-bound work)"
    )
    print(
        f"{'student':<8} {'GPUs':>4}  {'levers':<28} {'denoise ms/chunk':>16} {'fps':>6} "
        f"{'fps (+ Wan VAE on the GPU)':>26}"
    )
    rows = table(args.gpus)
    for r in rows:
        print(
            f"{r['student']:<8} {r['gpus']:>4}  {r['levers']:<28} {r['denoise_ms']:16.1f} {r['fps']:6.1f} "
            f"{r['fps_wan_vae_shared']:26.1f}"
        )
    print("a model, not a measurement (see the module docstring); measured rows are in benchmarks/RESULTS.md")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
