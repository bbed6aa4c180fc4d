"""`titan-world convert`: move checkpoints between formats without loss.

  --from diffusers SRC DST   diffusers WanTransformer3DModel folder -> Wan-native folder
  --to diffusers SRC DST     Wan-native folder (or run dir) -> diffusers folder
  --to safetensors SRC DST   DCP training checkpoint (a step folder, or a run dir: the newest
                             complete one) -> Wan-native safetensors folder (config from run dir)

Tensors are copied bit for bit (renamed only), one at a time: host memory peaks at one output
shard (5 GB), not the checkpoint. MoE roots convert both experts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from titan_world.model.diffusers_names import native_config_to_diffusers, native_to_diffusers
from titan_world.model.io import CheckpointError, LazyState, WeightFolder, config_json, read_config, resolve_checkpoint_dir, save_state_dict
from titan_world.model.moe import EXPERT_DIRS


def _expert_pairs(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    if all((src / sub).is_dir() for sub in EXPERT_DIRS.values()):
        return [(src / sub, dst / sub) for sub in EXPERT_DIRS.values()]
    return [(src, dst)]


def diffusers_to_wan(src: Path, dst: Path) -> None:
    for s, d in _expert_pairs(src, dst):
        cfg, is_diffusers = read_config(s)
        if not is_diffusers:
            raise CheckpointError(f"{s}: config.json is not a diffusers WanTransformer3DModel config")
        source = WeightFolder(s)  # reads diffusers keys under native names
        save_state_dict(LazyState(source, {name: name for name in source.sources}), d, config_json(cfg))


def wan_to_diffusers(src: Path, dst: Path) -> None:
    for s, d in _expert_pairs(resolve_checkpoint_dir(src), dst):
        cfg, is_diffusers = read_config(s)
        if is_diffusers:
            raise CheckpointError(f"{s}: already in diffusers format")
        source = WeightFolder(s)
        save_state_dict(LazyState(source, native_to_diffusers({name: name for name in source.sources})), d, native_config_to_diffusers(cfg))


def dcp_to_safetensors(src: Path, dst: Path, config_path: str | None = None) -> None:
    from parallel.checkpoint import export_safetensors, list_checkpoints, validate_checkpoint

    step_dir = src
    if not (src / ".metadata").is_file():
        candidates = [p for _, p in reversed(list_checkpoints(src / "checkpoints" if (src / "checkpoints").is_dir() else src)) if validate_checkpoint(p) is None]
        if not candidates:
            raise CheckpointError(f"{src}: no complete DCP checkpoint (a step folder with .metadata, or a run dir holding them)")
        step_dir = candidates[0]
    run_dir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
    from titan_world.config import load_config

    cfg_file = Path(config_path) if config_path else run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{step_dir}: no config to describe the model (looked for {cfg_file}; pass --model-config)")
    model_cfg = load_config(cfg_file).model
    export_safetensors(step_dir, dst, config=config_json(model_cfg))
    print(f"exported {step_dir} -> {dst}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--from", dest="src_format", choices=["diffusers"], help="source format (to Wan native)")
    group.add_argument("--to", dest="dst_format", choices=["diffusers", "safetensors"], help="target format")
    parser.add_argument("src", help="source folder (checkpoint, MoE root, DCP step or run dir)")
    parser.add_argument("dst", help="destination folder (written atomically)")
    parser.add_argument("--model-config", help="--to safetensors: config YAML of the run (default RUN_DIR/config.yaml)")


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        print(f"titan-world convert: {src}: no such file or folder", file=sys.stderr)
        return 2
    try:
        if args.src_format == "diffusers":
            diffusers_to_wan(src, dst)
        elif args.dst_format == "diffusers":
            wan_to_diffusers(src, dst)
        else:
            dcp_to_safetensors(src, dst, args.model_config)
    except (CheckpointError, KeyError, ValueError, json.JSONDecodeError) as e:
        print(f"titan-world convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0
