"""Serving section: the streaming engine and the WebSocket server."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServingConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    checkpoint: str | None = None  # Wan-format student; None: runs/demo student if present, else random
    gpus: int = 1  # Ulysses degree over attention heads inside one node
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    # Stream geometry (0: take data.height / data.width / data.fps, what the model was trained on).
    # The codec and text encoder are the data section's (data.codec, data.text_encoder).
    height: int = 0
    width: int = 0
    fps: float = 0.0  # model frame rate: frames are paced to this rate on the wire
    chunk_frames: int = 1  # latent frames per step (1 latent = 4 video frames)
    denoise_steps: int = 4
    sigmas: list[float] = field(default_factory=list)  # empty: uniform 1.0 .. 1/steps (Self-Forcing style)
    sampler: str = "renoise"  # renoise (x0 estimate, fresh noise at the next sigma) | euler
    kv_refresh: str = "clean"  # clean: one extra t=0 pass writes the K/V | last_step: the last step writes
    sink_frames: int = 1
    window_frames: int = 8
    default_prompt: str = "a sunny meadow with trees and a red house"
    # Transport and admission.
    jpeg_quality: int = 85
    max_message_bytes: int = 4_000_000
    max_image_pixels: int = 16_000_000  # refuse decompression bombs before decoding
    queue_size: int = 0  # clients waiting while the GPU set is busy; 0: refuse at once
    send_buffer_chunks: int = 2  # encoded chunks waiting for the wire (bounded: backpressure)
    compile: bool = False
    float8: str = "none"  # none | tensorwise | rowwise: FP8 GEMMs in the blocks (parallel/float8.py)
    # Replay full-cache passes from CUDA graphs (serving/graphs.py); no effect on CPU apart from
    # running the same fixed-buffer path. Opt-in until measured on a GPU (benchmarks/RESULTS.md).
    cuda_graphs: bool = False
    # A light decoder distilled from the codec's (`titan-world distill-decoder`; a run dir or its
    # decoder/ folder): frames are decoded with it instead of the codec's own decoder (the Wan
    # VAE's costs ~26 ms of the GPU per 480p frame). Encoding the start image stays the codec's.
    light_decoder: str | None = None
