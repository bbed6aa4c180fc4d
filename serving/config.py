"""Serving section: the streaming engine and the WebSocket server."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServingConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    checkpoint: str | None = None
    gpus: int = 1
    chunk_frames: int = 1  # latent frames per step (1 latent = 4 video frames)
    denoise_steps: int = 4
    sink_frames: int = 1
    window_frames: int = 8
    jpeg_quality: int = 85
    max_message_bytes: int = 4_000_000
    queue_size: int = 0  # clients waiting while the GPU set is busy; 0: refuse at once
    compile: bool = False
