"""Checkpoint glue: what the trainer saves (via parallel.Checkpointer) and the final export.

The checkpoint holds the model (+ EMA) and optimizer as DCP shards, the trainer position
(global step, stage, counters) replicated, and each rank's dataloader position and RNG.
The LR schedule is a function of the step, so there is no scheduler state to save.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from parallel.checkpoint import Checkpointer, list_checkpoints
from titan_world.config import ConfigError
from titan_world.model import WanMoE
from titan_world.model.io import CheckpointError, config_json, save_state_dict
from titan_world.model.moe import EXPERT_DIRS


def peek_trainer_state(path: Path) -> dict:
    """The replicated trainer position of checkpoint `path` (read before the loader is built)."""
    try:
        saved = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # a checkpoint from before checksums, corrupted: name the file
        raise CheckpointError(
            f"{path / 'state.pt'}: unreadable ({type(e).__name__}: {e}); move {path} aside "
            "to resume from the previous checkpoint"
        ) from None
    return dict(saved.get("trainer", {}))


def resume_point(ckpt: Checkpointer, resume: bool) -> Path | None:
    """The checkpoint a job continues from, decided before any work (every rank calls it).

    resume: the newest valid checkpoint; none at all is an error (a fresh random run that exits 0
    would pass for a resumed one), and checkpoints none of which is valid raise the checkpointer's
    `CheckpointError` naming each. Not resume: None, and a run dir that already holds checkpoints
    is an error (the new run's first save would prune them and its export overwrite model/).
    """
    run_dir = ckpt.dir.parent
    if not resume:
        found = list_checkpoints(ckpt.dir)
        if found:
            raise ConfigError(
                f"run.dir={run_dir} already holds checkpoints (newest {found[0][1].name}): "
                "continue that run with --resume, or start a new one in another run.dir"
            )
        return None
    path = ckpt.latest()
    if path is None and list_checkpoints(ckpt.dir):
        raise CheckpointError(
            f"--resume: none of the checkpoints in {ckpt.dir} is valid (see the warnings above); "
            "nothing was changed. Move the broken ones aside (or restore them) and resume again"
        )
    if path is None:
        raise CheckpointError(
            f"--resume: nothing to resume in run.dir={run_dir} ({ckpt.dir} holds no checkpoint); "
            "drop --resume to start a new run there"
        )
    return path


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict on rank 0 (all ranks must call; others get {})."""
    sharded = any(hasattr(p, "full_tensor") for p in module.parameters())
    if not sharded:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_model(model: nn.Module, folder: Path, rank: int, overrides: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` as a Wan folder (MoE: high_noise_model/ + low_noise_model/ + moe.json).

    `overrides` replaces tensors by name (e.g. the EMA weights). Collective under FSDP.
    """
    experts = (
        [(sub, model.expert(name), f"{name}.") for name, sub in EXPERT_DIRS.items()]
        if isinstance(model, WanMoE)
        else [(None, model, "")]
    )
    for sub, net, prefix in experts:
        state = full_state_dict(net)
        if rank == 0:
            for k, v in (overrides or {}).items():
                if k.startswith(prefix) and k[len(prefix) :] in state:
                    state[k[len(prefix) :]] = v.to(state[k[len(prefix) :]].dtype)
            save_state_dict(state, folder / sub if sub else folder, config_json(net.cfg))
    if rank == 0 and isinstance(model, WanMoE):
        (folder / "moe.json").write_text(json.dumps({"boundary": model.boundary}))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
