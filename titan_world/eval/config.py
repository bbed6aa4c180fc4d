"""Evaluation section: which metrics, and where their models live (never downloaded).

Each model dimension needs a local path; `<name>_factory` ("pkg.mod:fn", fn(path) -> callable)
plugs the original network code when the file is a raw state dict (docs/eval.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_DIMENSIONS = (
    "temporal_flickering",
    "dynamic_degree",
    "motion_smoothness",
    "imaging_quality",
    "aesthetic_quality",
    "overall_consistency",
)


@dataclass
class EvalConfig:
    dimensions: list[str] = field(default_factory=lambda: list(ALL_DIMENSIONS))
    window_seconds: float = 5.0  # per-window metrics over time; 0 disables
    protocol: str = "vbench"  # vbench: whole video | vbench-long: mean over re-encoded clips (docs/eval.md)
    long_clip_seconds: int = 2  # VBench-Long custom mode: int(fps) * 2 frames per clip, every dimension
    device: str = "cpu"
    batch_size: int = 4
    imaging_quality_mode: str = "longer"  # VBench default preprocessing for MUSIQ
    aesthetic_dtype: str = "float32"  # float16: CLIP as VBench runs it on a GPU (fp16 weights, fp32 LayerNorm)
    prompts: str | None = None  # JSON {file name: prompt}; else <stem>.txt, else prompts.json in DIR
    raft_path: str | None = None
    raft_factory: str | None = None
    amt_path: str | None = None
    amt_factory: str | None = None
    musiq_path: str | None = None
    musiq_factory: str | None = None
    clip_path: str | None = None
    aesthetic_head_path: str | None = None
    viclip_path: str | None = None
    viclip_factory: str | None = None
