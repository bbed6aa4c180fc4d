"""`titan-world convert`: move checkpoints between formats without loss.

  --from diffusers SRC DST   diffusers WanTransformer3DModel folder -> Wan-native folder
  --to diffusers SRC DST     Wan-native folder (or run dir) -> diffusers folder
  --to safetensors SRC DST   DCP training checkpoint (a step folder, or a run dir: the newest
                             valid one) -> Wan-native safetensors folder (config from run dir)

Tensors are copied bit for bit (renamed only), one at a time: host memory peaks at one output
shard (5 GB), not the checkpoint. MoE roots convert both experts.

DST is never silently replaced: the output is written into a temp folder beside DST and renamed
into place when complete. An existing non-empty DST is refused unless --overwrite; with it, a
folder this command wrote (it holds `.titan-world-convert.json`) is replaced, and anything else
is replaced only after saying what it holds. DST may never be SRC, hold SRC, or hold the
current directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from parallel.checkpoint import Checkpointer, export_safetensors, validate_checkpoint
from titan_world.config import load_config
from titan_world.model.diffusers_names import native_config_to_diffusers, native_to_diffusers
from titan_world.model.io import (
    CheckpointError,
    LazyState,
    WeightFolder,
    config_json,
    read_config,
    resolve_checkpoint_dir,
    save_state_dict,
    write_atomically,
)
from titan_world.model.moe import EXPERT_DIRS

OUTPUT_MARKER = ".titan-world-convert.json"


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
        save_state_dict(
            LazyState(source, native_to_diffusers({name: name for name in source.sources})),
            d,
            native_config_to_diffusers(cfg),
        )


def newest_dcp_checkpoint(src: Path) -> Path:
    """`src` itself when it is a DCP step folder, else the newest valid checkpoint of the run dir
    (or checkpoints dir) `src`: CheckpointError naming each checkpoint and why when none is valid."""
    if (src / ".metadata").is_file():
        reason = validate_checkpoint(src)
        if reason is not None:
            raise CheckpointError(f"{src}: {reason}")
        return src
    run_dir = (src / "checkpoints").is_dir()
    ckpt = Checkpointer(src, subdir="checkpoints") if run_dir else Checkpointer(src.parent, subdir=src.name)
    step_dir = ckpt.latest()
    if step_dir is None:
        raise CheckpointError(f"{src}: no DCP checkpoint (a step folder with .metadata, or a run dir holding them)")
    return step_dir


def dcp_to_safetensors(src: Path, dst: Path, config_path: str | None = None) -> Path:
    """Export the newest valid checkpoint of `src` to `dst`; returns the step folder exported."""
    step_dir = newest_dcp_checkpoint(src)
    run_dir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
    cfg_file = Path(config_path) if config_path else run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{step_dir}: no config to describe the model (looked for {cfg_file}; pass --model-config)"
        )
    model_cfg = load_config(cfg_file).model
    export_safetensors(step_dir, dst, config_json(model_cfg))
    return step_dir


# ------------------------------------------------------------------------------------------------
# Writing DST: temp beside it, renamed into place; never over data without --overwrite
# ------------------------------------------------------------------------------------------------
def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _describe(path: Path) -> str:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return f"{len(files)} file(s), {sum(p.stat().st_size for p in files) / 1e6:.1f} MB"


def check_destination(dst: Path, src: Path, overwrite: bool) -> str | None:
    """CheckpointError when writing `dst` could lose data; else None, or (with --overwrite) a line
    saying what will be replaced."""
    real_dst, real_src = dst.resolve(), src.resolve()
    if _inside(real_src, real_dst) or _inside(Path.cwd().resolve(), real_dst):
        what = "the source" if _inside(real_src, real_dst) else "the current directory"
        raise CheckpointError(f"{dst}: refusing to write there: it is or holds {what}; choose a new folder")
    if not dst.exists() and not dst.is_symlink():
        return None
    if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
        return None  # an empty folder: nothing to lose
    ours = dst.is_dir() and (dst / OUTPUT_MARKER).is_file()
    if not overwrite:
        raise CheckpointError(
            f"{dst}: exists and is not empty ({_describe(dst)}{', an earlier convert output' if ours else ''}); "
            "choose a new destination or pass --overwrite to replace it"
        )
    if ours:
        return f"replacing {dst} (an earlier convert output)"
    return f"replacing {dst}: {_describe(dst)}, not written by titan-world convert (--overwrite)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--from", dest="src_format", choices=["diffusers"], help="source format (to Wan native)")
    group.add_argument("--to", dest="dst_format", choices=["diffusers", "safetensors"], help="target format")
    parser.add_argument("src", help="source folder (checkpoint, MoE root, DCP step or run dir)")
    parser.add_argument("dst", help="destination (written into a temp folder beside it, then renamed)")
    parser.add_argument("--model-config", help="--to safetensors: config YAML of the run (default RUN_DIR/config.yaml)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        print(f"titan-world convert: {src}: no such file or folder", file=sys.stderr)
        return 2
    exported: list[Path] = []

    def convert(out: Path) -> None:
        if args.src_format == "diffusers":
            diffusers_to_wan(src, out)
        elif args.dst_format == "diffusers":
            wan_to_diffusers(src, out)
        else:
            exported.append(dcp_to_safetensors(src, out, args.model_config))
        (out / OUTPUT_MARKER).write_text(json.dumps({**record, "time": time.time()}, indent=1))

    try:
        note = check_destination(dst, src, args.overwrite)
        if note:
            print(f"titan-world convert: {note}", file=sys.stderr)
        record = {"from": args.src_format or "native", "to": args.dst_format or "native", "src": str(src.resolve())}
        write_atomically(dst, convert)
    except (CheckpointError, KeyError, ValueError, json.JSONDecodeError) as e:
        print(f"titan-world convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst}" + (f" from {exported[0]}" if exported else ""))
    return 0
