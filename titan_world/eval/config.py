"""Evaluation section: which metrics, and where their models live (never downloaded)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    dimensions: list[str] = field(
        default_factory=lambda: [
            "temporal_flickering", "dynamic_degree", "motion_smoothness",
            "imaging_quality", "aesthetic_quality", "overall_consistency",
        ]
    )
    window_seconds: float = 5.0
    raft_path: str | None = None
    amt_path: str | None = None
    musiq_path: str | None = None
    clip_path: str | None = None
    aesthetic_head_path: str | None = None
    viclip_path: str | None = None
