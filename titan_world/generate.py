"""`titan-world generate`: an mp4 from an image (+ prompt, + actions) with a trained model.

A bidirectional model (train output) samples the whole clip with a flow-matching sampler (CFG
optional). A block-causal student (post-train output, `causal_chunk_frames > 0`) is streamed
chunk by chunk through the serving engine's KV cache, exactly as `titan-world serve` would.

Without `--image` the first frame comes from the synthetic world (episode `--episode-seed`), and
without `--actions` that episode's own actions drive the camera, so the result can be compared
with the simulator (`--with-reference` writes the ground truth beside it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from launch.cli_common import add_config_arguments, config_from_args
from titan_world.config import TitanConfig
from titan_world.conditioning import conditioned_denoiser, fill_given
from titan_world.diffusion.samplers import sample, with_guidance
from titan_world.model.action import ActionInputs
from titan_world.model.codec import TEMPORAL_STRIDE, check_frame_count, codec_from_config, frames_to_video, video_to_frames
from titan_world.model.io import build_model, load_pretrained
from titan_world.model.text_encoder import build_text_encoder

log = logging.getLogger("titan_world.generate")
DEMO_MODEL = Path("runs/demo/train/model")


@dataclass
class GenerationInputs:
    first_frame: np.ndarray  # uint8 [H, W, 3]
    prompt: str
    actions: np.ndarray  # float32 [T, 8] per video frame (T = 1 + 4k)
    c2w: np.ndarray  # [T, 4, 4]
    intrinsics: np.ndarray  # [T, 4]
    reference: np.ndarray | None = None  # simulator frames [T, H, W, 3] when known


def load_actions(path: str | Path) -> np.ndarray:
    """Actions per video frame from .npy [T, 8] or JSON: a list of 8-vectors, or of
    {"keys": ["w", ...], "mouse": [dx, dy]} objects (the serving protocol's action messages)."""
    from titan_world.data.actions import ACTION_DIM, ACTION_NAMES

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--actions {path}: no such file")
    if path.suffix == ".npy":
        arr = np.load(path)
    else:
        raw = json.loads(path.read_text())
        raw = raw.get("actions", raw) if isinstance(raw, dict) else raw
        rows = []
        for i, item in enumerate(raw):
            if isinstance(item, dict):
                row = np.zeros(ACTION_DIM, np.float32)
                for k in item.get("keys", []):
                    if k not in ACTION_NAMES[:6]:
                        raise ValueError(f"--actions {path}: item {i}: unknown key {k!r}; expected one of {ACTION_NAMES[:6]}")
                    row[ACTION_NAMES.index(k)] = 1.0
                row[6:8] = item.get("mouse", [0.0, 0.0])
                rows.append(row)
            else:
                rows.append(np.asarray(item, np.float32))
        arr = np.stack(rows) if rows else np.zeros((0, ACTION_DIM), np.float32)
    if arr.ndim != 2 or arr.shape[1] != ACTION_DIM:
        raise ValueError(f"--actions {path}: shape {arr.shape}; expected [T, {ACTION_DIM}] ({', '.join(ACTION_NAMES)})")
    return arr.astype(np.float32)


def build_inputs(cfg: TitanConfig, *, image: str | None, prompt: str | None, actions: str | None, frames: int, episode_seed: int) -> GenerationInputs:
    from titan_world.data.actions import integrate_actions
    from titan_world.data.geometry import default_intrinsics
    from titan_world.data.synth import make_episode

    check_frame_count(frames, "--frames")
    h, w = cfg.data.height, cfg.data.width
    episode = make_episode(episode_seed, h, w, seconds=(frames - 1) / cfg.data.fps + 0.01, fps=cfg.data.fps)
    if episode.num_frames < frames:
        raise ValueError(f"--frames {frames}: the synthetic episode has only {episode.num_frames}")
    acts = episode.actions[:frames] if actions is None else load_actions(actions)
    if len(acts) < frames:
        raise ValueError(f"--actions has {len(acts)} frames; --frames asks for {frames}")
    acts = acts[:frames]
    if image is None:
        first, c2w0, reference = episode.frames[0], episode.c2w[0], (episode.frames[:frames] if actions is None else None)
    else:
        from PIL import Image

        first = np.asarray(Image.open(image).convert("RGB").resize((w, h), Image.BICUBIC))
        c2w0, reference = np.eye(4, dtype=np.float32), None
    c2w = integrate_actions(acts, c2w0, cfg.data.fps).astype(np.float32)
    k = np.repeat(default_intrinsics(h, w)[None].astype(np.float32), frames, 0)
    return GenerationInputs(first, prompt if prompt is not None else episode.captions["narrative"], acts, c2w, k, reference)


def load_generation_model(cfg: TitanConfig, checkpoint: str | None, device, dtype):
    path = Path(checkpoint) if checkpoint else (DEMO_MODEL if DEMO_MODEL.exists() else None)
    if path is None:
        log.warning("no --checkpoint and no %s: generating with RANDOM weights (the video is noise)", DEMO_MODEL)
        torch.manual_seed(0)
        return build_model(cfg.model, device).to(dtype).eval(), "random"
    return load_pretrained(path, dtype=dtype, device=device).eval(), str(path)


@torch.no_grad()
def generate_bidirectional(model, codec, text_encoder, inputs: GenerationInputs, *, steps: int, shift: float, sampler: str = "dpmpp2m",
                           guidance: float = 1.0, seed: int = 0, device="cpu", progress=None) -> np.ndarray:
    """Sample the clip conditioned on its first frame; returns uint8 [T, H, W, 3]."""
    t = len(inputs.actions)

    first = frames_to_video(inputs.first_frame[None, None]).to(device)
    first_latent = codec.encode(first)  # [1, C, 1, h, w]
    c, _, h, w = first_latent.shape[1:]
    f = 1 + (t - 1) // TEMPORAL_STRIDE
    latents = torch.zeros(1, c, f, h, w, device=device)
    latents[:, :, :1] = first_latent
    cond_mask = torch.zeros(1, f, dtype=torch.bool, device=device)
    cond_mask[:, 0] = True
    dtype = next(model.parameters()).dtype
    context = text_encoder.encode([inputs.prompt]).to(device, dtype)
    actions = None
    if getattr(model.cfg.action, "enabled", False):
        as_t = lambda a: torch.as_tensor(a, device=device)[None]  # noqa: E731
        actions = ActionInputs.from_video_frames(as_t(inputs.actions), as_t(inputs.c2w), as_t(inputs.intrinsics))
    i2v = model.cfg.cond_channels > 0
    denoise = conditioned_denoiser(model, context, latents, cond_mask, actions, i2v)
    if guidance != 1.0:
        denoise = with_guidance(denoise, conditioned_denoiser(model, torch.zeros_like(context), latents, cond_mask, actions, i2v), guidance)
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g, device=device)
    out = sample(lambda x, tt: denoise(x.to(dtype), tt).float(), fill_given(noise, latents, cond_mask), steps, shift, sampler, progress=progress)
    return video_to_frames(codec.decode(out))[0, :t]


def generate_causal(cfg: TitanConfig, model, codec, text_encoder, inputs: GenerationInputs, *, seed: int = 0, source: str = "") -> np.ndarray:
    """Stream a block-causal student through the serving engine (KV cache, few steps per chunk),
    with the chunk size and timesteps it was trained with."""
    from serving.loading import resolved_serving, student_settings
    from serving.streaming import StreamingEngine
    from titan_world.model.io import resolve_checkpoint_dir

    sc = student_settings(resolved_serving(cfg), model.cfg, str(resolve_checkpoint_dir(source)) if source else "")
    engine = StreamingEngine(model, codec, text_encoder, sc)
    session = engine.start(inputs.first_frame, inputs.prompt, seed)
    frames = [session.first_frames()]
    acts = torch.from_numpy(inputs.actions)
    n = engine.frames_per_chunk
    for start in range(1, len(acts) - n + 1, n):
        frames.append(session.step(acts[start : start + n]))
    session.close()
    return np.concatenate(frames)[: len(acts)]


def generate(cfg: TitanConfig, checkpoint: str | None, inputs: GenerationInputs, *, steps: int | None = None, shift: float = 5.0,
             sampler: str = "dpmpp2m", guidance: float = 1.0, seed: int = 0, device: str = "auto", progress=None) -> tuple[np.ndarray, str]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, source = load_generation_model(cfg, checkpoint, dev, dtype)
    mc = model.cfg
    codec = codec_from_config(cfg.data.codec, device=dev)
    text = build_text_encoder(cfg.data.text_encoder.kind, mc.text_dim, mc.text_len, cfg.data.text_encoder.path, device=dev)
    if getattr(mc, "causal_chunk_frames", 0):
        return generate_causal(cfg, model, codec, text, inputs, seed=seed, source=source), source
    video = generate_bidirectional(model, codec, text, inputs, steps=steps or 20, shift=shift, sampler=sampler, guidance=guidance, seed=seed, device=dev, progress=progress)
    return video, source


def generate_to_dir(checkpoint: str | None, prompts: dict[str, str] | list[str] | str | None, out_dir: str | Path, *, count: int = 4, frames: int = 33,
                    cfg: TitanConfig | None = None, seed: int = 0) -> list[Path]:
    """One mp4 per prompt (synthetic first frame i, its actions) — used by `titan-world eval --generate`.

    prompts: a list, a file (JSON {file name: prompt}, the table `eval vbench --prompts` reads, or
    text with one prompt per line: sample_000.mp4, ...), or None for `count` clips captioned by
    the synthetic world itself. Writes OUT_DIR/prompts.json ({file name: prompt used}), where
    scoring looks for the prompts of a folder."""
    import json

    from titan_world.config import load_config
    from titan_world.eval.video_io import write_video

    cfg = cfg or load_config()
    if isinstance(prompts, str):
        prompts = read_prompt_file(prompts)
    if prompts is None:
        prompts = [None] * count
    named = prompts if isinstance(prompts, dict) else {f"sample_{i:03d}.mp4": p for i, p in enumerate(prompts)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, used = [], {}
    for i, (name, prompt) in enumerate(named.items()):
        inputs = build_inputs(cfg, image=None, prompt=prompt, actions=None, frames=frames, episode_seed=10_000 + i)
        video, _ = generate(cfg, checkpoint, inputs, seed=seed + i)
        paths.append(write_video(out_dir / name, video, cfg.data.fps, lossless=False))
        used[name] = inputs.prompt
    (out_dir / "prompts.json").write_text(json.dumps(used, indent=2))
    return paths


def read_prompt_file(path: str | Path) -> dict[str, str] | list[str]:
    """A prompts file: JSON {file name: prompt} (names ending in .mp4), or one prompt per line."""
    import json

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist")
    text = p.read_text()
    if not text.lstrip().startswith("{"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        table = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"prompts file {p}: not valid JSON ({e}); expected {{\"name.mp4\": \"prompt\"}} or one prompt per line") from None
    bad = [k for k, v in table.items() if not (isinstance(v, str) and k.endswith(".mp4"))]
    if bad:
        raise ValueError(f"prompts file {p}: entries {bad[:3]} are not \"name.mp4\": \"prompt\" pairs")
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", help="Wan model folder or run dir (uses RUN_DIR/model); default: the demo's model, else random weights")
    parser.add_argument("--image", help="first frame (png/jpg); default: a synthetic-world frame")
    parser.add_argument("--prompt", help="text prompt; default: the synthetic episode's caption")
    parser.add_argument("--actions", help="actions per video frame: .npy [T,8] or JSON list of {keys, mouse}")
    parser.add_argument("--frames", type=int, default=33, help="video frames, 1 + 4k (default 33)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps for a bidirectional model")
    parser.add_argument("--shift", type=float, default=5.0, help="flow shift of the sampling schedule")
    parser.add_argument("--sampler", choices=["euler", "dpmpp2m"], default="dpmpp2m")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episode-seed", type=int, default=123456, help="synthetic episode for the default image/actions")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--with-reference", action="store_true", help="also write the simulator's frames (OUT.reference.mp4) when known")
    parser.add_argument("--out", default="generated.mp4", help="output mp4 (default generated.mp4)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from titan_world.eval.video_io import write_video

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_args(args)
    try:
        inputs = build_inputs(cfg, image=args.image, prompt=args.prompt, actions=args.actions, frames=args.frames, episode_seed=args.episode_seed)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"titan-world generate: {e}", file=sys.stderr)
        return 2
    bar = lambda it: tqdm(it, desc="sampling", unit="step")  # noqa: E731
    from titan_world.model.io import CheckpointError

    try:
        video, source = generate(cfg, args.checkpoint, inputs, steps=args.steps, shift=args.shift, sampler=args.sampler,
                                 guidance=args.guidance, seed=args.seed, device=args.device, progress=bar)
    except CheckpointError as e:
        print(f"titan-world generate: {e}", file=sys.stderr)
        return 2
    out = write_video(args.out, video, cfg.data.fps, lossless=False)
    print(f"wrote {out} ({len(video)} frames, {video.shape[2]}x{video.shape[1]}, model: {source})")
    if args.with_reference and inputs.reference is not None:
        ref = write_video(Path(args.out).with_suffix(".reference.mp4"), inputs.reference, cfg.data.fps, lossless=False)
        print(f"wrote {ref} (simulator ground truth)")
    return 0
