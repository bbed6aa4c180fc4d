"""`titan-world inspect`: what a model config or checkpoint is, in numbers.

Parameters per module, shapes, dtype, tokens for a clip length / resolution, FLOPs per step, and
(`--plan`) the per-GPU memory plan for a mesh. `--json` prints the same for machines.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from parallel.planner import format_plan, format_recommendations, max_ac_skip, plan, recommend
from titan_world.config import CONFIG_ROOT, ConfigError, load_config
from titan_world.model.codec import check_frame_count, default_vae_stride
from titan_world.model.config import ActionConfig, ModelConfig
from titan_world.model.dit import WanDiT
from titan_world.model.flops import sample_flops
from titan_world.model.io import CheckpointError, read_config, resolve_checkpoint_dir
from titan_world.model.moe import EXPERT_DIRS
from titan_world.posttrain.config import PostTrainConfig
from titan_world.posttrain.plan import format_posttrain_plan, posttrain_plan, smallest_mesh


def resolve_target(target: str) -> tuple[ModelConfig, str, str]:
    """(model config, where from, dtype) for a checkpoint folder, a model YAML or a full config."""
    p = Path(target)
    if p.is_dir():
        folder = resolve_checkpoint_dir(p)
        expert = folder / EXPERT_DIRS["high"]
        cfg, _ = read_config(expert if expert.is_dir() else folder)
        if expert.is_dir():
            cfg.num_experts = 2
        return cfg, f"checkpoint {folder}", _checkpoint_dtype(expert if expert.is_dir() else folder)
    for cand in (p, CONFIG_ROOT / "model" / p, CONFIG_ROOT / "model" / f"{target}.yaml"):
        if cand.is_file():
            raw = yaml.safe_load(cand.read_text()) or {}
            if "dim" in raw:  # a model section file
                action = ActionConfig(**raw.pop("action", {}))
                return ModelConfig(**raw, action=action), f"model config {cand}", "bfloat16 (training default on GPU)"
    cfg = load_config(target)
    return cfg.model, f"config {target}", "bfloat16 (training default on GPU)"


def _checkpoint_dtype(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return "unknown"
    with safe_open(str(files[0]), "pt") as fh:
        key = next(iter(fh.keys()))
        return str(fh.get_slice(key).get_dtype()).lower()


def describe(cfg: ModelConfig, frames: int, height: int, width: int, vae_stride: int) -> dict:
    with torch.device("meta"):
        model = WanDiT(cfg)
    per_module: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        per_module[top] += p.numel()
    block = sum(p.numel() for p in model.blocks[0].parameters())
    total = sum(per_module.values())
    n_lat = 1 + check_frame_count(frames, "--frames")
    if height % (vae_stride * 2) or width % (vae_stride * 2):
        raise ValueError(
            f"--height/--width {height}x{width}: expected multiples of {vae_stride * 2} (VAE stride {vae_stride} x "
            "patch 2)"
        )
    lh, lw = height // vae_stride, width // vae_stride
    fl = sample_flops(cfg, n_lat, lh, lw)
    shapes = {
        k: list(v.shape)
        for k, v in model.state_dict().items()
        if not k.startswith("blocks.") or k.startswith("blocks.0.")
    }
    return {
        "name": cfg.name,
        "experts": cfg.num_experts,
        "params_per_expert": total,
        "params_total": total * cfg.num_experts,
        "params_per_module": dict(per_module),
        "params_per_block": block,
        "num_layers": cfg.num_layers,
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "num_heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "clip": {
            "frames": frames,
            "height": height,
            "width": width,
            "latent": [cfg.out_dim, n_lat, lh, lw],
            "tokens": fl.tokens,
        },
        "flops": {
            "forward_per_sample": fl.forward,
            "train_step_per_sample": fl.train_step,
            "forward_per_token": fl.per_token_forward,
        },
        "shapes": shapes,
    }


def format_report(info: dict, source: str, dtype: str) -> str:
    c, f = info["clip"], info["flops"]
    lines = [
        f"{info['name']}  ({source}, dtype {dtype})",
        f"  parameters: {info['params_per_expert'] / 1e9:.3f}B per expert x {info['experts']} = "
        f"{info['params_total'] / 1e9:.3f}B",
        f"  dim {info['dim']}, ffn {info['ffn_dim']}, {info['num_heads']} heads x {info['head_dim']}, "
        f"{info['num_layers']} layers "
        f"({info['params_per_block'] / 1e6:.1f}M per block)",
        "  per module:",
    ]
    for k, v in info["params_per_module"].items():
        lines.append(f"    {k:<18} {v / 1e6:>12.3f}M")
    lines += [
        f"  clip {c['frames']} frames at {c['width']}x{c['height']} -> latents {c['latent']} -> {c['tokens']:,} tokens",
        f"  FLOPs: forward {f['forward_per_sample'] / 1e12:.2f} TFLOP/sample ({f['forward_per_token'] / 1e9:.2f} "
        "GFLOP/token), "
        f"train step {f['train_step_per_sample'] / 1e12:.2f} TFLOP/sample",
    ]
    return "\n".join(lines)


CURRICULUM = [("5s", 81), ("10s", 161), ("20s", 321), ("30s", 481), ("60s", 961)]


def memory_plan(cfg: ModelConfig, args: argparse.Namespace, stride: int) -> tuple[str, dict]:
    """--cp given: the plan of that mesh over --gpus; else the smallest mesh per curriculum stage."""
    vae = (4, stride, stride)
    if args.cp:
        if args.gpus % args.cp:
            raise ValueError(f"--gpus {args.gpus} must be divisible by --cp {args.cp}")
        mesh = dict(
            dp_replicate=1,
            dp_shard=args.gpus // args.cp,
            cp=args.cp,
            ac=args.ac,
            gpu_mem_gb=args.gpu_mem,
            vae_stride=vae,
        )
        p = plan(cfg, args.frames, args.height, args.width, **mesh)
        text, info = format_plan(p), dataclasses.asdict(p)
        skip = max_ac_skip(cfg, args.frames, args.height, args.width, **mesh) if args.ac != "none" else None
        if skip:
            text += (
                f"\nspare memory: parallel.ac_skip_last={skip} leaves the last {skip} of {cfg.num_layers} blocks "
                f"un-checkpointed and still fits (less recompute)"
            )
            info["max_ac_skip_last"] = skip
        return text, info
    recs = recommend(cfg, CURRICULUM, args.height, args.width, args.ac, args.gpu_mem, vae_stride=vae)
    text = (
        f"memory plan per curriculum stage (AC {args.ac}, {args.gpu_mem:.0f} GB GPUs, 8 per node):\n"
        + format_recommendations(recs)
    )
    return text, {name: (dataclasses.asdict(p) if p else None) for name, p in recs}


def posttrain_memory_plan(
    target: str, source: str, cfg: ModelConfig, args: argparse.Namespace, stride: int
) -> tuple[str, dict]:
    """--posttrain: stage 2 (DMD) per GPU for the config's `posttrain` section (defaults for a model
    file or checkpoint): the student is one expert of `cfg`, the teacher and fake score all of it."""
    full = load_config(target) if source.startswith("config ") else None  # (see resolve_target)
    pcfg = full.posttrain if full is not None else PostTrainConfig()
    ac = full.parallel.activation_checkpoint if full is not None else "full"
    student = copy.deepcopy(cfg)
    student.num_experts = 1
    kw = dict(
        teacher_experts=cfg.num_experts,
        teacher_bytes=4 if pcfg.teacher_dtype == "float32" else 2,
        ac=ac,
        gpu_mem_gb=args.gpu_mem,
        vae_stride=stride,
    )
    if args.cp:
        plan = posttrain_plan(student, pcfg, args.height, args.width, gpus=args.gpus, cp=args.cp, **kw)
        head = ""
    else:
        plan = smallest_mesh(student, pcfg, args.height, args.width, **kw)
        if plan is None:
            return f"post-training stage 2: no mesh of up to 1024 {args.gpu_mem:.0f} GB GPUs fits", {"fits": False}
        head = (
            f"smallest mesh that fits {args.gpu_mem:.0f} GB GPUs "
            "(fewest GPUs, then smallest cp; set --gpus/--cp to see another):\n"
        )
    info = dataclasses.asdict(plan) | {
        "student_step_gb": plan.student_step_gb,
        "critic_step_gb": plan.critic_step_gb,
        "fits": plan.fits,
    }
    return head + format_posttrain_plan(plan), info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        nargs="?",
        default="tiny.yaml",
        help="checkpoint folder / run dir, model config (e.g. wan2.2-i2v-a14b) or full config",
    )
    parser.add_argument("--frames", type=int, default=81, help="video frames (1 + 4k); default 81 (5 s at 16 fps)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument(
        "--vae-stride",
        type=int,
        default=None,
        help="codec spatial stride (default: 8 for 16-ch, 16 for 48-ch, 4 for tiny)",
    )
    parser.add_argument("--shapes", action="store_true", help="print parameter shapes (block 0 stands for all blocks)")
    parser.add_argument(
        "--plan", action="store_true", help="per-GPU memory plan (params, grads, optimizer, activations) for a mesh"
    )
    parser.add_argument("--gpus", type=int, default=8, help="--plan/--posttrain: GPUs in all")
    parser.add_argument(
        "--cp",
        type=int,
        default=None,
        help="--plan/--posttrain: context-parallel degree (default: the smallest mesh that fits)",
    )
    parser.add_argument(
        "--ac",
        default="full",
        choices=["none", "full", "selective", "attention"],
        help="--plan: activation checkpointing",
    )
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="--plan/--posttrain: GPU memory in GB")
    parser.add_argument(
        "--posttrain",
        action="store_true",
        help="per-GPU memory of post-training stage 2 (DMD) for the config's posttrain section; "
        "with --gpus/--cp for that mesh, else the smallest mesh that fits",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    try:
        cfg, source, dtype = resolve_target(args.target)
        stride = args.vae_stride or default_vae_stride(cfg)
        info = describe(cfg, args.frames, args.height, args.width, stride)
    except (CheckpointError, ConfigError, ValueError, TypeError) as e:
        print(f"titan-world inspect: {e}", file=sys.stderr)
        return 2
    info.update(source=source, dtype=dtype)
    plan_text = None
    if args.plan:
        try:
            plan_text, info["plan"] = memory_plan(cfg, args, stride)
        except ValueError as e:
            print(f"titan-world inspect --plan: {e}", file=sys.stderr)
            return 2
    if args.posttrain:
        try:
            text, info["posttrain_plan"] = posttrain_memory_plan(args.target, source, cfg, args, stride)
            plan_text = f"{plan_text}\n{text}" if plan_text else text
        except (ConfigError, ValueError) as e:
            print(f"titan-world inspect --posttrain: {e}", file=sys.stderr)
            return 2
    if args.json:
        if not args.shapes:
            info.pop("shapes")
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(format_report(info, source, dtype))
    if args.shapes:
        for k, v in info["shapes"].items():
            print(f"    {k:<40} {v}")
    if plan_text:
        print(plan_text)
    return 0
