"""`titan-world generate`: an mp4 (or a lossless .npy) from an image (+ prompt, + actions) with a model.

A downloaded Wan model (a diffusers pipeline folder or the official repository's folder,
titan_world.model.pipeline) generates as the reference pipelines do: its conditioning per model
type, Flow-UniPC with integer timesteps, a guidance pair per expert against the negative prompt's
embedding, and its official defaults (titan_world.model.presets, docs/model.md). A bidirectional
titan-world model (train output) samples the whole clip with a flow-matching sampler (CFG
optional). A block-causal student (post-train output, `causal_chunk_frames > 0`) is streamed
chunk by chunk through the serving engine's KV cache, exactly as `titan-world serve` would.

Without `--image` the first frame comes from the synthetic world (episode `--episode-seed`), and
without `--actions` that episode's own actions drive the camera, so the result can be compared
with the simulator (`--with-reference` writes the ground truth beside it).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import ftfy
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from tqdm import tqdm

from launch.cli_common import add_config_arguments, config_from_args
from serving.engine import EngineError
from serving.loading import resolved_serving, student_settings
from serving.streaming import StreamingEngine
from titan_world.conditioning import (
    conditioned_denoiser,
    fill_given,
    reference_denoiser,
    reference_first_latent,
    reference_i2v_condition,
    with_first_latent,
)
from titan_world.config import TitanConfig, load_config
from titan_world.data.actions import ACTION_DIM, ACTION_NAMES, Level, integrate_actions
from titan_world.data.geometry import default_intrinsics
from titan_world.data.synth import make_episode
from titan_world.diffusion.samplers import SAMPLERS, sample, with_guidance
from titan_world.diffusion.unipc import flow_schedule
from titan_world.eval.video_io import write_video
from titan_world.model.action import ActionInputs
from titan_world.model.codec import (
    check_frame_count,
    codec_from_config,
    frames_to_video,
    latent_frames,
    video_to_frames,
)
from titan_world.model.io import (
    CheckpointError,
    build_model,
    checkpoint_networks,
    load_pretrained,
    read_config,
    resolve_checkpoint_dir,
)
from titan_world.model.pipeline import WanBundle, load_wan_bundle
from titan_world.model.presets import OFFICIAL_NEGATIVE_PROMPT, preset_for
from titan_world.model.text_encoder import build_text_encoder

log = logging.getLogger("titan_world.generate")
DEMO_MODEL = Path("runs/demo/train/model")
OUTPUT_SUFFIXES = (".mp4", ".npy")


@dataclass
class GenerationInputs:
    first_frame: np.ndarray  # uint8 [H, W, 3]
    prompt: str
    actions: np.ndarray  # float32 [T, 8] per video frame (T = 1 + 4k)
    c2w: np.ndarray  # [T, 4, 4]
    intrinsics: np.ndarray  # [T, 4]
    reference: np.ndarray | None = None  # simulator frames [T, H, W, 3] when known
    level: Level | None = None  # the synthetic level the camera moves in (kept clear of its blocks), when known


def load_actions(path: str | Path) -> np.ndarray:
    """Actions per video frame from .npy [T, 8] or JSON: a list of 8-vectors, or of
    {"keys": ["w", ...], "mouse": [dx, dy]} objects (the serving protocol's action messages)."""
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
                        raise ValueError(
                            f"--actions {path}: item {i}: unknown key {k!r}; expected one of {ACTION_NAMES[:6]}"
                        )
                    row[ACTION_NAMES.index(k)] = 1.0
                row[6:8] = item.get("mouse", [0.0, 0.0])
                rows.append(row)
            else:
                rows.append(np.asarray(item, np.float32))
        arr = np.stack(rows) if rows else np.zeros((0, ACTION_DIM), np.float32)
    if arr.ndim != 2 or arr.shape[1] != ACTION_DIM:
        raise ValueError(f"--actions {path}: shape {arr.shape}; expected [T, {ACTION_DIM}] ({', '.join(ACTION_NAMES)})")
    arr = arr.astype(np.float32)
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        raise ValueError(
            f"--actions {path}: {len(bad)} values are NaN or infinite (first at frame {bad[0][0]}, "
            f"{ACTION_NAMES[bad[0][1]]}); expected finite numbers"
        )
    return arr


def build_inputs(
    cfg: TitanConfig, *, image: str | None, prompt: str | None, actions: str | None, frames: int, episode_seed: int
) -> GenerationInputs:
    check_frame_count(frames, "--frames")
    h, w = cfg.data.height, cfg.data.width
    episode = make_episode(
        episode_seed, h, w, seconds=(frames - 1) / cfg.data.fps + 0.01, fps=cfg.data.fps, level=cfg.data.synth_level
    )
    if episode.num_frames < frames:
        raise ValueError(f"--frames {frames}: the synthetic episode has only {episode.num_frames}")
    acts = episode.actions[:frames] if actions is None else load_actions(actions)
    if len(acts) < frames:
        raise ValueError(f"--actions has {len(acts)} frames; --frames asks for {frames}")
    acts = acts[:frames]
    if image is None:  # the episode's start: its camera, in its level
        first, c2w0, level = episode.frames[0], episode.c2w[0], episode.world
        reference = episode.frames[:frames] if actions is None else None
    else:  # a picture of an unknown place: the camera starts at the origin, nothing to collide with
        first = np.asarray(Image.open(image).convert("RGB").resize((w, h), Image.BICUBIC))
        c2w0, reference, level = np.eye(4, dtype=np.float32), None, None
        if cfg.model.action.pose_frame == "world":
            log.warning(
                "--image with a model of world-frame poses (model.action.pose_frame=world): the camera starts "
                "at the world's origin, which need not be where the picture was taken"
            )
    c2w = integrate_actions(acts, c2w0, cfg.data.fps, level=level).astype(np.float32)
    k = np.repeat(default_intrinsics(h, w)[None].astype(np.float32), frames, 0)
    return GenerationInputs(
        first, prompt if prompt is not None else episode.captions["narrative"], acts, c2w, k, reference, level
    )


def load_generation_model(cfg: TitanConfig, checkpoint: str | None, device, dtype):
    path = Path(checkpoint) if checkpoint else (DEMO_MODEL if DEMO_MODEL.exists() else None)
    if path is None:
        log.warning("no --checkpoint and no %s: generating with RANDOM weights (the video is noise)", DEMO_MODEL)
        torch.manual_seed(0)
        return build_model(cfg.model, device).to(dtype).eval(), "random"
    return load_pretrained(path, dtype=dtype, device=device).eval(), str(path)


@torch.no_grad()
def generate_bidirectional(
    model,
    codec,
    text_encoder,
    inputs: GenerationInputs,
    *,
    steps: int,
    shift: float,
    sampler: str = "dpmpp2m",
    guidance: float = 1.0,
    seed: int = 0,
    device="cpu",
    progress=None,
    negative_prompt: str = "",
) -> np.ndarray:
    """Sample the clip conditioned on its first frame; returns uint8 [T, H, W, 3]."""
    t = len(inputs.actions)

    first = frames_to_video(inputs.first_frame[None, None]).to(device)
    first_latent = codec.encode(first)  # [1, C, 1, h, w]
    c, _, h, w = first_latent.shape[1:]
    f = latent_frames(t, "actions")
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
        negative = text_encoder.encode([negative_prompt]).to(
            device, dtype
        )  # the unconditional branch: never a zero tensor
        denoise = with_guidance(
            denoise, conditioned_denoiser(model, negative, latents, cond_mask, actions, i2v), guidance
        )
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g, device=device)
    out = sample(
        lambda x, tt: denoise(x.to(dtype), tt).float(),
        fill_given(noise, latents, cond_mask),
        steps,
        shift,
        sampler,
        progress=progress,
    )
    return video_to_frames(codec.decode(out))[0, :t]


def clean_prompt(text: str) -> str:
    """As the reference pipelines clean prompts before tokenising: ftfy's text fixes, HTML entities
    unescaped (twice), whitespace runs collapsed to one space, ends stripped."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class ReferenceSettings:
    """Everything a reference sampling run needs besides the networks (all resolved, validated)."""

    prompt: str
    negative_prompt: str
    frames: int
    height: int
    width: int
    steps: int
    shift: float
    sampler: str
    guidance: tuple[float, float]  # (high-noise expert, low-noise expert)
    schedule_start: str = "diffusers"
    seed: int = 0


def load_image(path: str | Path, height: int | None = None, width: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3]; resized (Lanczos, as diffusers' video processor) only when a size is given and differs."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--image {p}: no such file")
    img = Image.open(p).convert("RGB")
    if height is not None and (img.height, img.width) != (height, width):
        img = img.resize((width, height), Image.LANCZOS)
    return np.asarray(img)


def size_for_image(image_hw: tuple[int, int], area: int, multiple: int) -> tuple[int, int]:
    """The official I2V rule: the image's aspect ratio within `area` pixels, each side a multiple of
    `multiple` (VAE stride x patch), rounded down."""
    aspect = image_hw[0] / image_hw[1]
    h = int(np.sqrt(area * aspect) // multiple * multiple)
    w = int(np.sqrt(area / aspect) // multiple * multiple)
    return max(h, multiple), max(w, multiple)


def load_noise(path: str | Path, shape: tuple[int, ...]) -> torch.Tensor:
    """--noise: safetensors with key `latents` [C, F', H/s, W/s] (or with a batch of 1), float."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--noise {p}: no such file")
    with safe_open(str(p), "pt") as fh:
        if "latents" not in fh.keys():
            raise ValueError(f"--noise {p}: no tensor 'latents' (has {sorted(fh.keys())})")
        noise = fh.get_tensor("latents")
    if noise.ndim == len(shape) - 1:
        noise = noise[None]
    if tuple(noise.shape) != tuple(shape) or not noise.is_floating_point():
        got = tuple(noise.shape[1:]) if noise.ndim == len(shape) else tuple(noise.shape)
        raise ValueError(
            f"--noise {p}: latents {noise.dtype} {got}; "
            f"expected float [C, F', H/s, W/s] = {tuple(shape[1:])} for these frames and size"
        )
    if not torch.isfinite(noise).all():
        raise ValueError(f"--noise {p}: latents hold NaN or infinite values")
    return noise.float()


@torch.no_grad()
def generate_reference(
    model,
    codec,
    text_encoder,
    settings: ReferenceSettings,
    *,
    image: np.ndarray | None = None,
    noise: torch.Tensor | str | Path | None = None,
    device="cpu",
    progress=None,
) -> np.ndarray:
    """A downloaded Wan model's clip as the reference pipelines make it (module docstring); uint8 [F, H, W, 3].

    image: uint8 [H, W, 3] at the settings' size (I2V: required; TI2V: optional; T2V: unused).
    noise: the initial latents (diffusers' `latents=`), a tensor or a --noise file; default randn(seed)."""
    st = settings
    model_type = model.cfg.model_type
    if model_type == "i2v" and image is None:
        raise ValueError("this is an image-to-video model: give --image")
    s = codec.stride[1]
    shape = (1, codec.latent_channels, latent_frames(st.frames, "--frames"), st.height // s, st.width // s)
    if isinstance(noise, (str, Path)):
        noise = load_noise(noise, shape)
    if noise is None:
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(st.seed))
    noise = noise.to(device, torch.float32)
    context = text_encoder.encode([clean_prompt(st.prompt)]).to(device)
    negative = text_encoder.encode([clean_prompt(st.negative_prompt)]).to(device)
    cond = first = None
    if image is not None and model_type in ("i2v", "ti2v"):
        pixels = frames_to_video(image[None, None])[:, :, 0].to(device)  # [1, 3, H, W] in [-1, 1]
        if model_type == "i2v":
            cond = reference_i2v_condition(codec, pixels, st.frames)
        else:
            first = reference_first_latent(codec, pixels)
    denoise = reference_denoiser(model, context, negative, st.guidance, cond=cond, first_latent=first)
    schedule = flow_schedule(st.steps, st.shift, st.schedule_start)
    latents = sample(denoise, noise, st.steps, st.shift, st.sampler, progress=progress, schedule=schedule)
    if first is not None:
        latents = with_first_latent(latents, first)
    return video_to_frames(codec.decode(latents))[0]


def generate_causal(
    cfg: TitanConfig, model, codec, text_encoder, inputs: GenerationInputs, *, seed: int = 0, source: str = ""
) -> np.ndarray:
    """Stream a block-causal student through the serving engine (KV cache, few steps per chunk),
    with the chunk size and timesteps it was trained with."""
    sc = student_settings(resolved_serving(cfg), model.cfg, str(resolve_checkpoint_dir(source)) if source else "")
    engine = StreamingEngine(model, codec, text_encoder, sc)
    engine.place(inputs.c2w[0], inputs.level)
    session = engine.start(inputs.first_frame, inputs.prompt, seed)
    frames = [session.first_frames()]
    acts = torch.from_numpy(inputs.actions)
    n = engine.frames_per_chunk
    for start in range(1, len(acts) - n + 1, n):
        frames.append(session.step(acts[start : start + n]))
    session.close()
    return np.concatenate(frames)[: len(acts)]


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available, else cpu; an explicit cuda on a machine without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build / machine has no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    return dev


def generate(
    cfg: TitanConfig,
    checkpoint: str | None,
    inputs: GenerationInputs,
    *,
    steps: int | None = None,
    shift: float = 5.0,
    sampler: str = "dpmpp2m",
    guidance: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    progress=None,
    negative_prompt: str = "",
) -> tuple[np.ndarray, str]:
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, source = load_generation_model(cfg, checkpoint, dev, dtype)
    mc = model.cfg
    codec = codec_from_config(cfg.data.codec, device=dev)
    text = build_text_encoder(
        cfg.data.text_encoder.kind, mc.text_dim, mc.text_len, cfg.data.text_encoder.path, device=dev
    )
    if getattr(mc, "causal_chunk_frames", 0):
        return generate_causal(cfg, model, codec, text, inputs, seed=seed, source=source), source
    video = generate_bidirectional(
        model,
        codec,
        text,
        inputs,
        steps=steps or 20,
        shift=shift,
        sampler=sampler,
        guidance=guidance,
        seed=seed,
        device=dev,
        progress=progress,
        negative_prompt=negative_prompt,
    )
    return video, source


def generate_to_dir(
    checkpoint: str | None,
    prompts: dict[str, str] | list[str] | str | None,
    out_dir: str | Path,
    *,
    count: int = 4,
    frames: int = 33,
    cfg: TitanConfig | None = None,
    seed: int = 0,
) -> list[Path]:
    """One mp4 per prompt (synthetic first frame i, its actions) — used by `titan-world eval --generate`.

    prompts: a list, a file (JSON {file name: prompt}, the table `eval vbench --prompts` reads, or
    text with one prompt per line: sample_000.mp4, ...), or None for `count` clips captioned by
    the synthetic world itself. Writes OUT_DIR/prompts.json ({file name: prompt used}), where
    scoring looks for the prompts of a folder."""
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
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist")
    text = p.read_text()
    if not text.lstrip().startswith("{"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        table = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f'prompts file {p}: not valid JSON ({e}); expected {{"name.mp4": "prompt"}} or one prompt per line'
        ) from None
    bad = [k for k, v in table.items() if not (isinstance(v, str) and k.endswith(".mp4"))]
    if bad:
        raise ValueError(f'prompts file {p}: entries {bad[:3]} are not "name.mp4": "prompt" pairs')
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        help="a diffusers Wan pipeline folder (model_index.json), an official Wan "
        "folder, a Wan model folder or a run dir (uses RUN_DIR/model); default: the demo's model, "
        "else random weights",
    )
    parser.add_argument(
        "--image", help="first frame (png/jpg); default: a synthetic-world frame (tiny models); none for text-to-video"
    )
    parser.add_argument("--prompt", help="text prompt; default: the synthetic episode's caption")
    parser.add_argument(
        "--negative-prompt",
        help="the unconditional branch's prompt (default: the official Wan "
        "negative prompt for Wan models, empty for tiny ones)",
    )
    parser.add_argument("--actions", help="actions per video frame: .npy [T,8] or JSON list of {keys, mouse}")
    parser.add_argument("--frames", type=int, help="video frames, 1 + 4k (default: the model's, 33 for tiny models)")
    parser.add_argument("--height", type=int, help="video height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="video width in pixels (default: the model's)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's, 20 for tiny models)")
    parser.add_argument(
        "--shift", type=float, help="flow shift of the sampling schedule (default: the model's scheduler, 5.0)"
    )
    parser.add_argument(
        "--sampler", choices=list(SAMPLERS), help="default: unipc for Wan models, dpmpp2m for tiny ones"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale: the high-noise expert's, or both (default: the model's; 1 = off)",
    )
    parser.add_argument(
        "--guidance-low", type=float, help="guidance of the low-noise expert (default: the model's, else --guidance)"
    )
    parser.add_argument(
        "--noise", help="initial noise: safetensors with key 'latents' [C, F', H/s, W/s] (as diffusers' latents=)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--episode-seed", type=int, default=123456, help="synthetic episode for the default image/actions"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument(
        "--with-reference", action="store_true", help="also write the simulator's frames (OUT.reference.mp4) when known"
    )
    parser.add_argument(
        "--out", default="generated.mp4", help="output: .mp4, or .npy (uint8 frames [F, H, W, 3], lossless)"
    )


def check_arguments(args: argparse.Namespace) -> torch.device:
    """Everything that can be checked before loading or sampling anything."""
    if Path(args.out).suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {args.out}: unknown extension; expected one of {', '.join(OUTPUT_SUFFIXES)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: expected at least 1")
    if args.frames is not None:
        check_frame_count(args.frames, "--frames")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} {value}: expected a positive number of pixels")
    if args.shift is not None and args.shift <= 0:
        raise ValueError(f"--shift {args.shift}: expected a positive flow shift")
    for name in ("guidance", "guidance_low"):
        value = getattr(args, name)
        if value is not None and not np.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected a finite scale")
    if args.noise is not None and not Path(args.noise).is_file():
        raise FileNotFoundError(f"--noise {args.noise}: no such file")
    return resolve_device(args.device)


def reference_settings(args: argparse.Namespace, bundle, image_hw: tuple[int, int] | None) -> ReferenceSettings:
    """The CLI's choices over the model's defaults (the folder's scheduler and boundary, its preset)."""
    p = bundle.preset
    multiple = bundle.codec.stride[1] * bundle.model.cfg.patch_size[1]
    if args.height is None and args.width is None and image_hw is not None and bundle.model.cfg.model_type == "i2v":
        height, width = size_for_image(image_hw, p.height * p.width, multiple)
    else:
        height, width = args.height or p.height, args.width or p.width
    if height % multiple or width % multiple:
        raise ValueError(
            f"--height {height} --width {width}: each must be a multiple of {multiple} (VAE stride x patch)"
        )
    high = args.guidance if args.guidance is not None else p.guidance_high
    low = args.guidance_low if args.guidance_low is not None else high if args.guidance is not None else p.guidance_low
    return ReferenceSettings(
        prompt=args.prompt or "",
        negative_prompt=args.negative_prompt if args.negative_prompt is not None else OFFICIAL_NEGATIVE_PROMPT,
        frames=args.frames or p.frames,
        height=height,
        width=width,
        steps=args.steps or p.steps,
        shift=args.shift if args.shift is not None else bundle.flow_shift,
        sampler=args.sampler or p.sampler,
        guidance=(high, low),
        schedule_start=bundle.schedule_start,
        seed=args.seed,
    )


def write_output(path: str | Path, video: np.ndarray, fps: float) -> Path:
    path = Path(path)
    if path.suffix.lower() == ".npy":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, video)
        return path
    return write_video(path, video, fps, lossless=False)


def reference_checkpoint(cfg: TitanConfig, checkpoint: str, dev: torch.device):
    """A titan-world checkpoint of a reference-conditioned Wan model (e.g. finetuned from official
    weights, `model.conditioning: reference`) as a WanBundle with the configured codec and text
    encoder (data.codec, data.text_encoder) and its model type's official defaults; None otherwise."""
    folders, _ = checkpoint_networks(checkpoint)
    if read_config(folders[0])[0].conditioning != "reference":
        return None
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = load_pretrained(checkpoint, dtype=dtype, device=dev).eval()
    mc, experts = model.cfg, 2 if hasattr(model, "high") else 1
    try:
        preset = preset_for(mc.model_type, experts)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint}: {e}") from None
    codec = codec_from_config(cfg.data.codec, device=dev)
    if codec.latent_channels != mc.out_dim:
        raise CheckpointError(
            f"{checkpoint}: the model reads {mc.out_dim}-channel latents but data.codec "
            f"({cfg.data.codec.kind}) gives {codec.latent_channels}; set data.codec.kind=wan_vae "
            "and data.codec.path to its VAE"
        )
    te = cfg.data.text_encoder
    text = build_text_encoder(te.kind, mc.text_dim, mc.text_len, te.path, device=dev, dtype=dtype)
    return WanBundle(
        model, text, codec, preset, model.boundary if experts == 2 else None, preset.shift, "official", checkpoint
    )


def run_reference(args: argparse.Namespace, bundle, progress) -> int:
    if args.actions:
        raise ValueError(f"--actions {args.actions}: {bundle.source} is a Wan model without an action adapter")
    if bundle.model.cfg.model_type == "t2v" and args.image:
        raise ValueError(f"--image {args.image}: {bundle.source} is a text-to-video model (it takes no image)")
    image_hw = None
    if args.image:
        if not Path(args.image).is_file():
            raise FileNotFoundError(f"--image {args.image}: no such file")
        with Image.open(args.image) as im:
            image_hw = (im.height, im.width)
    settings = reference_settings(args, bundle, image_hw)
    image = load_image(args.image, settings.height, settings.width) if args.image else None
    video = generate_reference(
        bundle.model,
        bundle.codec,
        bundle.text_encoder,
        settings,
        image=image,
        noise=args.noise,
        device=next(bundle.model.parameters()).device,
        progress=progress,
    )
    out = write_output(args.out, video, bundle.preset.fps)
    g = settings.guidance
    print(
        f"wrote {out} ({len(video)} frames, {video.shape[2]}x{video.shape[1]}, model: {bundle.source} "
        f"[{bundle.preset.name}], {settings.sampler} {settings.steps} steps, shift {settings.shift:g}, "
        f"guidance {g[0]:g}/{g[1]:g})"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bar = lambda it: tqdm(it, desc="sampling", unit="step")  # noqa: E731
    try:
        dev = check_arguments(args)
        bundle = None
        if args.checkpoint:
            bundle = load_wan_bundle(
                args.checkpoint, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32
            )
        if bundle is not None:
            return run_reference(args, bundle, bar)
    except (ValueError, FileNotFoundError, OSError, CheckpointError) as e:
        print(f"titan-world generate: {e}", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    try:
        bundle = reference_checkpoint(cfg, args.checkpoint, dev) if args.checkpoint else None
        if bundle is not None:
            return run_reference(args, bundle, bar)
        inputs = build_inputs(
            cfg,
            image=args.image,
            prompt=args.prompt,
            actions=args.actions,
            frames=args.frames or 33,
            episode_seed=args.episode_seed,
        )
        if args.guidance_low is not None and args.guidance_low != (args.guidance if args.guidance is not None else 1.0):
            raise ValueError("--guidance-low: a single-network model has one guidance scale (--guidance)")
        for name, value, key in (("height", args.height, "data.height"), ("width", args.width, "data.width")):
            if value is not None and value != getattr(cfg.data, name):
                raise ValueError(
                    f"--{name} {value}: a titan-world model generates at its config's size; set {key}={value}"
                )
        if args.noise is not None:
            raise ValueError(
                f"--noise {args.noise}: initial noise is taken by Wan models (pipeline or official folders) only"
            )
        video, source = generate(
            cfg,
            args.checkpoint,
            inputs,
            steps=args.steps,
            shift=args.shift if args.shift is not None else 5.0,
            sampler=args.sampler or "dpmpp2m",
            guidance=args.guidance if args.guidance is not None else 1.0,
            seed=args.seed,
            device=args.device,
            progress=bar,
            negative_prompt=args.negative_prompt or "",
        )
    except (ValueError, FileNotFoundError, OSError, CheckpointError, EngineError) as e:
        print(f"titan-world generate: {e}", file=sys.stderr)
        return 2
    out = write_output(args.out, video, cfg.data.fps)
    print(f"wrote {out} ({len(video)} frames, {video.shape[2]}x{video.shape[1]}, model: {source})")
    if args.with_reference and inputs.reference is not None:
        ref = write_video(Path(args.out).with_suffix(".reference.mp4"), inputs.reference, cfg.data.fps, lossless=False)
        print(f"wrote {ref} (simulator ground truth)")
    return 0
