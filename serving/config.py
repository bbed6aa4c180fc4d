"""Serving section: the streaming engine and the WebSocket server."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


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
    # The student's training geometry (docs/serving.md "Geometry"): None takes the value post-training
    # wrote to posttrain.json next to the weights (a model without one: chunk 1, 4 steps, sink 1,
    # window 8, clean refresh). A value the student was not trained with is refused unless
    # `force_geometry` (then it runs with a warning naming each difference).
    chunk_frames: int | None = None  # latent frames per step (1 latent = 4 video frames)
    denoise_steps: int | None = None
    sigmas: list[float] = field(default_factory=list)  # empty: the student's timesteps (else uniform 1.0 .. 1/steps)
    sampler: str = "renoise"  # renoise (x0 estimate, fresh noise at the next sigma) | euler
    # clean: one extra t=0 pass writes the K/V (as trained) | last_step: the last denoising step writes
    # them, one pass per chunk cheaper but the cache holds noisy-step K/V the student never saw (quality)
    kv_refresh: str | None = None
    sink_frames: int | None = None
    window_frames: int | None = None
    # Latent frames the student was trained on (posttrain.json; else sink + window + chunk): past it
    # the sink keeps the trained distance and action poses are re-anchored (docs/serving.md "Long sessions").
    horizon_frames: int | None = None
    force_geometry: bool = False
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

    def validate(self) -> None:
        """The geometry keys that are set (the student's values are checked when it is loaded)."""
        check_geometry(self)


# What a model without posttrain.json is streamed with (post-training's own defaults).
FALLBACK_GEOMETRY = {"chunk_frames": 1, "denoise_steps": 4, "kv_refresh": "clean", "sink_frames": 1, "window_frames": 8}


def with_fallback_geometry(sc: ServingConfig) -> ServingConfig:
    """Unset (None) geometry keys filled with `FALLBACK_GEOMETRY`; the horizon with the span of
    one full cache plus a chunk (sink + window + chunk)."""
    sc = replace(sc, **{k: v for k, v in FALLBACK_GEOMETRY.items() if getattr(sc, k) is None})
    if sc.horizon_frames is None:
        sc = replace(sc, horizon_frames=sc.sink_frames + sc.window_frames + sc.chunk_frames)
    return sc


def check_geometry(sc: ServingConfig) -> None:
    """Ranges of the geometry keys that are set (at config load: the user's; at engine build: the
    resolved ones). A window smaller than a chunk cannot hold one chunk's frames in the cache's
    ring: two frames would share a slot (a nondeterministic `index_copy_` on CUDA)."""
    for key, low in (
        ("chunk_frames", 1),
        ("denoise_steps", 1),
        ("window_frames", 1),
        ("sink_frames", 0),
        ("horizon_frames", 1),
    ):
        value = getattr(sc, key)
        if value is not None and value < low:
            raise ValueError(f"serving.{key}={value}: expected >= {low}")
    if sc.window_frames is not None and sc.chunk_frames is not None and sc.window_frames < sc.chunk_frames:
        raise ValueError(
            f"serving.window_frames={sc.window_frames} < serving.chunk_frames={sc.chunk_frames}: the "
            "local window must hold at least one chunk (window_frames >= chunk_frames)"
        )
    if sc.kv_refresh not in (None, "clean", "last_step"):
        raise ValueError(f"serving.kv_refresh={sc.kv_refresh!r}: expected clean or last_step")
