"""Building the engine a `titan-world serve` process uses: checkpoint, codec, text encoder.

Without `--checkpoint` the tiny default is served so the pipeline runs on any CPU: the demo's
student when `runs/demo` holds one, else random weights (with a loud warning: the stream will be
noise, but every stage of the pipeline runs for real).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from parallel.config import ParallelConfig
from parallel.parallelize import parallelize
from serving.config import ServingConfig, with_fallback_geometry
from serving.engine import EngineError
from serving.streaming import StreamingEngine, default_sigmas
from titan_world.config import TitanConfig
from titan_world.model.codec import codec_from_config
from titan_world.model.io import (
    CheckpointError,
    build_model,
    checkpoint_networks,
    load_pretrained,
    read_config,
    resolve_checkpoint_dir,
)
from titan_world.model.light_decoder import LightDecodedCodec, load_light_decoder
from titan_world.model.text_encoder import build_text_encoder

log = logging.getLogger("titan_world.serving")
DEMO_ROOT = Path("runs/demo")


def find_demo_student(root: Path = DEMO_ROOT) -> Path | None:
    """The newest Wan-format folder under runs/demo holding a block-causal student
    (config.json with `titan_world.causal_chunk_frames > 0`, as post-training exports it)."""

    if not root.is_dir():
        return None
    found = []
    for p in root.rglob("config.json"):
        try:
            causal = json.loads(p.read_text()).get("titan_world", {}).get("causal_chunk_frames", 0)
        except (OSError, ValueError):
            continue
        if causal and any(p.parent.glob("*.safetensors")):
            found.append(p.parent)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_device(cfg: ServingConfig, local_rank: int = 0) -> tuple[torch.device, torch.dtype]:
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise EngineError("serving.device=cuda: no CUDA device is visible")
    device = torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif cfg.dtype in names:
        dtype = names[cfg.dtype]
    else:
        raise EngineError(f"serving.dtype={cfg.dtype!r}: expected auto, float32, bfloat16 or float16")
    return device, dtype


def check_causal(path: Path, *, required: bool) -> None:
    """Serving streams a block-causal few-step student (config.json `titan_world.causal_chunk_frames
    > 0`, as post-training exports it). A bidirectional model (a `train` export, an official Wan
    checkpoint) runs through the same engine, but it was trained on whole clips and many-step
    sampling, not on causal context and 4 steps: its stream is only a baseline. Read from
    config.json, before any weight is loaded. Raises CheckpointError when `required`, else warns."""
    folder = checkpoint_networks(path)[0][0]
    if read_config(folder)[0].causal_chunk_frames > 0:
        return
    what = (
        f"{resolve_checkpoint_dir(path)} is a bidirectional model ({folder / 'config.json'} has no "
        "titan_world.causal_chunk_frames > 0)"
    )
    if required:
        raise CheckpointError(
            f"{what}; `serve` streams a block-causal few-step student, as `titan-world post-train` exports it "
            f"(e.g. runs/demo/dmd/model). Post-train it first, or pass --allow-bidirectional to stream it "
            "anyway as a baseline (it was trained on whole clips with many steps: expect blurry, drifting frames)"
        )
    log.warning("%s: streaming it block-causally with few steps, which it was not trained for (a baseline only)", what)


def load_model(
    cfg: TitanConfig, device: torch.device, dtype: torch.dtype, *, require_causal: bool = False
) -> tuple[torch.nn.Module, str]:
    """-> (model, where it came from). Raises EngineError with the path when a checkpoint is bad,
    or is bidirectional and `require_causal` (`titan-world serve` without --allow-bidirectional)."""
    sc = cfg.serving
    path = Path(sc.checkpoint) if sc.checkpoint else find_demo_student()
    if path is not None:
        try:
            check_causal(path, required=require_causal)
            model = load_pretrained(path, dtype=dtype, device=device)
        except (CheckpointError, OSError, ValueError, KeyError) as e:
            raise EngineError(f"--checkpoint {path}: {e}") from None
        return model, str(path)
    log.warning(
        "no --checkpoint and no demo student under %s: serving RANDOM weights (the stream is noise; "
        "the pipeline is real). Train one with `make demo` or pass --checkpoint.",
        DEMO_ROOT,
    )
    torch.manual_seed(0)
    return build_model(cfg.model, device).to(dtype), "random"


def resolved_serving(cfg: TitanConfig) -> ServingConfig:
    """The serving section with 0-valued geometry filled from the data section."""
    sc, d = cfg.serving, cfg.data
    return replace(sc, height=sc.height or d.height, width=sc.width or d.width, fps=sc.fps or float(d.fps))


def trained_geometry(model_cfg, folder: Path | None) -> dict:
    """What a causal student was trained with: chunk size (config.json), timesteps, sink and window
    (`posttrain.json`, written by post-training next to the weights) and a clean t = 0 K/V refresh
    (the only mode post-training trains). {} for a bidirectional model (it was trained on none of it).
    `folder` None: a model without a checkpoint folder (config.json's chunk only)."""
    meta_path = folder / "posttrain.json" if folder is not None else None
    try:
        meta = json.loads(meta_path.read_text()) if meta_path is not None and meta_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise EngineError(f"{meta_path}: unreadable ({e})") from None
    chunk = model_cfg.causal_chunk_frames or meta.get("chunk_frames")
    if not chunk:
        return {}
    trained: dict = {"chunk_frames": int(chunk), "kv_refresh": meta.get("kv_refresh", "clean")}
    for key in ("sink_frames", "window_frames", "horizon_frames"):
        if key in meta:
            trained[key] = int(meta[key])
    if meta.get("denoise_steps"):
        trained["sigmas"] = [t / 1000.0 for t in meta["denoise_steps"]]
    return trained


def _asked_sigmas(sc: ServingConfig) -> list[float] | None:
    if sc.sigmas:
        return [float(x) for x in sc.sigmas]
    return default_sigmas(sc.denoise_steps) if sc.denoise_steps is not None else None


def student_settings(sc: ServingConfig, model_cfg, source: str) -> ServingConfig:
    """Stream a student the way it was trained (`trained_geometry`): unset serving keys take the
    student's values; a set one that differs is an EngineError naming each key, unless
    `serving.force_geometry` (then it runs, with a warning naming each difference)."""
    folder = Path(source) if source else None
    trained = trained_geometry(model_cfg, folder)
    changes: dict = {}
    differences: list[str] = []
    for key, value in trained.items():
        if key == "sigmas":
            asked = _asked_sigmas(sc)
            if asked is None:
                changes.update(sigmas=value, denoise_steps=len(value))
            elif asked != value:
                differences.append(
                    f"serving.sigmas={asked} (serving.denoise_steps={sc.denoise_steps}) vs the "
                    f"student's timesteps {value}"
                )
        elif getattr(sc, key) is None:
            changes[key] = value
        elif getattr(sc, key) != value:
            what = f"serving.{key}={getattr(sc, key)!r} vs the student's {value!r}"
            if key == "kv_refresh":
                what += (
                    " (last_step: one pass per chunk cheaper, but the cache holds noisy-step K/V the student "
                    "never saw: a speed/quality trade-off, docs/serving.md)"
                )
            differences.append(what)
    if differences:
        where = f"{folder} (config.json, posttrain.json)" if folder is not None else "the model"
        if not sc.force_geometry:
            raise EngineError(
                f"{where}: the student was not trained for "
                + "; ".join(differences)
                + ". Unset these keys to serve it as trained, or set serving.force_geometry=true"
            )
        log.warning(
            "serving.force_geometry: streaming %s with settings it was not trained for: %s",
            where,
            "; ".join(differences),
        )
    if changes:
        log.info("serving the student with its trained settings: %s", changes)
    return replace(sc, **changes)


def build_engine(cfg: TitanConfig, *, local_rank: int = 0, cp=None, require_causal: bool = False) -> StreamingEngine:
    """`require_causal`: refuse a bidirectional checkpoint (`titan-world serve` does, unless
    --allow-bidirectional); tests and benchmarks stream any model (with a warning)."""
    sc = resolved_serving(cfg)
    device, dtype = resolve_device(sc, local_rank)
    model, source = load_model(cfg, device, dtype, require_causal=require_causal)
    if source != "random":
        sc = student_settings(sc, model.cfg, str(resolve_checkpoint_dir(source)))
    sc = with_fallback_geometry(sc)
    mc = model.cfg
    speed = ParallelConfig(float8=sc.float8, compile=sc.compile)
    ready = parallelize(model, None, speed, "serve", device=device, cp=cp, attn_backend=cfg.model.attn_backend)
    if ready.float8_layers:
        log.warning("serving.float8=%s: %d linear layers run FP8 GEMMs", sc.float8, ready.float8_layers)
    dc, tc = cfg.data.codec, cfg.data.text_encoder
    codec = codec_from_config(dc, device=device, dtype=dtype)  # the Wan VAE decodes in the serving dtype (bf16 on GPU)
    if sc.light_decoder:
        try:
            codec = LightDecodedCodec(codec, load_light_decoder(sc.light_decoder, device, dtype))
        except (OSError, ValueError) as e:
            raise EngineError(f"serving.light_decoder={sc.light_decoder}: {e}") from None
    text = build_text_encoder(tc.kind, mc.text_dim, mc.text_len, tc.path, device=device)
    engine = StreamingEngine(model, codec, text, sc, cp=cp)
    engine.source = source  # type: ignore[attr-defined]
    log.warning(
        "engine: %s model (%s), %s %s, %dx%d @ %.0f fps, %d frames/chunk, %d steps",
        source,
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params",
        device,
        dtype,
        sc.width,
        sc.height,
        sc.fps,
        engine.frames_per_chunk,
        len(engine.sigmas),
    )
    return engine
