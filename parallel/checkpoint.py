"""Distributed checkpoints (torch.distributed.checkpoint): atomic, validated, resharding, pruned.

Layout of one checkpoint `<run_dir>/checkpoints/step_00000100/`:
  .metadata, __*_*.distcp   DCP: every nn.Module (key "<name>.<fqn>") and optimizer ("<name>.<fqn>...")
  state.pt                  rank 0: replicated small state (scheduler, plain dicts such as the
                            curriculum position, other Stateful objects), world size, step
  rank_00003.pt             per rank: RNG states (python, numpy, torch cpu/cuda) + per-rank keys
                            (the dataloader by default)
  COMPLETE                  JSON written last; a directory without it is never loaded
All of it is written into `step_XXXXXXXX.tmp/` and renamed when every rank has finished, so a
crash mid-save leaves only a `.tmp` directory (ignored, removed by the next save).

Why not torchtitan's `CheckpointManager`: it is bound to torchtitan's trainer config/ft objects
and its own folder naming, and it has no COMPLETE-marker fallback; DCP underneath is the same.

Resharding: model/optimizer tensors are DTensors (FSDP2) or plain tensors, saved with their global
shapes by DCP, so a checkpoint written by N ranks loads on any M ranks and on 1 process.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

__all__ = ["Checkpointer", "CheckpointWarning", "export_safetensors", "list_checkpoints", "validate_checkpoint"]

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d{8,})$")
MARKER = "COMPLETE"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (partial/corrupt) or state could not be restored exactly."""


# ------------------------------------------------------------------------------------------------
# Stateful adapters for DCP
# ------------------------------------------------------------------------------------------------
class _ModelState(Stateful):
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_model_state_dict(self.model, sd, options=StateDictOptions(strict=True))


class _OptimState(Stateful):
    def __init__(self, model: nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        _fill_missing_optimizer_state(self.optim)
        return get_optimizer_state_dict(self.model, self.optim)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optim, sd)


def _fill_missing_optimizer_state(optim: torch.optim.Optimizer) -> None:
    """Give trainable parameters that never had a gradient the state a zero step creates.

    DCP's loader initialises optimizer state for *every* trainable parameter (a zero-gradient,
    zero-lr step), so a checkpoint saved while some parameters had no state yet (an adapter that
    saw no actions, a head not used so far) could not be loaded. The other states are untouched.
    """
    missing = [p for g in optim.param_groups for p in g["params"] if p.requires_grad and p not in optim.state]
    if not missing or not optim.state:
        return  # nothing missing, or nothing at all (DCP initialises every state itself)
    accepted = inspect.signature(type(optim).__init__).parameters
    defaults = {k: v for k, v in optim.defaults.items() if k in accepted and k != "lr"}
    scratch = type(optim)(missing, lr=0.0, **defaults)
    saved_grads = [p.grad for p in missing]
    for p in missing:
        p.grad = torch.zeros_like(p)
    scratch.step()
    for p, g in zip(missing, saved_grads):
        optim.state[p] = scratch.state[p]
        p.grad = g


def _owner_module(optim: torch.optim.Optimizer, modules: dict[str, nn.Module]) -> nn.Module:
    ids = {id(p) for g in optim.param_groups for p in g["params"]}
    for module in modules.values():
        if ids <= {id(p) for p in module.parameters()}:
            return module
    raise ValueError(
        "Checkpointer: an optimizer's parameters are not all inside one nn.Module of the state; "
        "put a module holding them in the state dict (e.g. state['model'] = model)"
    )


# ------------------------------------------------------------------------------------------------
# RNG
# ------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _reseed(step: int, rank: int) -> None:
    seed = (step * 1_000_003 + rank * 7919) % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Validation and discovery
# ------------------------------------------------------------------------------------------------
def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Finished-looking checkpoint dirs (not `.tmp`), newest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def validate_checkpoint(path: str | Path) -> str | None:
    """None if `path` is a complete checkpoint, else the reason it is not."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        return f"no {MARKER} marker (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable {MARKER} marker: {e}"
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # truncated/garbage pickle, missing file
        return f"unreadable DCP metadata: {type(e).__name__}: {e}"
    files = {getattr(v, "relative_path", None) for v in (meta.storage_data or {}).values()} - {None}
    for name in sorted(files) + ["state.pt"]:
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
    for name, size in marker.get("sizes", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return f"file {name} is missing or has the wrong size (expected {size} bytes)"
    return None


# ------------------------------------------------------------------------------------------------
# The checkpointer
# ------------------------------------------------------------------------------------------------
class Checkpointer:
    """Save/restore training state with DCP.

    `state` maps names to: nn.Module (sharded via DCP), torch.optim.Optimizer (bound to the module
    in `state` that holds its parameters), objects with state_dict/load_state_dict (scheduler,
    dataloader, ...) and plain dicts (curriculum position, counters; restored in place).
    Keys in `per_rank` (default: "dataloader") are saved per rank; all other non-tensor state is
    taken from rank 0. RNG states are always saved per rank.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 3, per_rank: Iterable[str] = ("dataloader",), subdir: str = "checkpoints") -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: expected >= 1")
        self.dir = Path(run_dir) / subdir
        self.keep_last = keep_last
        self.per_rank = set(per_rank)

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _dist() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @staticmethod
    def _barrier() -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def _broadcast(self, obj: Any) -> Any:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return obj

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    def _split(self, state: dict[str, Any]) -> tuple[dict[str, Stateful], dict[str, Any], dict[str, Any]]:
        modules = {k: v for k, v in state.items() if isinstance(v, nn.Module)}
        sharded: dict[str, Stateful] = {k: _ModelState(m) for k, m in modules.items()}
        replicated: dict[str, Any] = {}
        local: dict[str, Any] = {}
        for k, v in state.items():
            if k in modules:
                continue
            if isinstance(v, torch.optim.Optimizer):
                sharded[k] = _OptimState(_owner_module(v, modules), v)
            elif k in self.per_rank:
                local[k] = v
            else:
                replicated[k] = v
        return sharded, replicated, local

    @staticmethod
    def _plain(v: Any) -> Any:
        return v.state_dict() if hasattr(v, "state_dict") else v

    @staticmethod
    def _restore(target: Any, saved: Any, key: str) -> None:
        if hasattr(target, "load_state_dict"):
            target.load_state_dict(saved)
        elif isinstance(target, dict):
            target.clear()
            target.update(saved)
        else:
            raise TypeError(f"Checkpointer: cannot restore state[{key!r}] of type {type(target).__name__} in place (use a dict or an object with load_state_dict)")

    # -- save --------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint `step` atomically (collective: every rank calls it). Returns its path."""
        rank, world = self._dist()
        final, tmp = self.path_for(step), self.dir / f"step_{step:08d}.tmp"
        sharded, replicated, local = self._split(state)
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self._barrier()
        t0 = time.time()
        dcp.save(sharded, checkpoint_id=str(tmp), no_dist=world == 1 and not dist.is_initialized())
        per_rank = {"rng": rng_state(), **{k: self._plain(v) for k, v in local.items()}}
        torch.save(per_rank, tmp / f"rank_{rank:05d}.pt")
        if rank == 0:
            torch.save({"step": step, "world_size": world, **{k: self._plain(v) for k, v in replicated.items()}}, tmp / "state.pt")
        self._barrier()
        if rank == 0:
            sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
            marker = {"step": step, "world_size": world, "time": time.time(), "save_seconds": round(time.time() - t0, 3), "sizes": sizes}
            _write_synced(tmp / MARKER, json.dumps(marker, indent=1))
            if final.exists():  # re-saving a step (e.g. after a requeue): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            self._prune()
        self._barrier()
        return final

    def _prune(self) -> None:
        """Drop stale `.tmp` dirs, checkpoints that can never load (partial/corrupt), and valid
        ones beyond the newest `keep_last` (finished dirs are immutable, so this is race-free)."""
        for p in self.dir.glob("step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        kept = 0
        for _, p in list_checkpoints(self.dir):
            if validate_checkpoint(p) is None and kept < self.keep_last:
                kept += 1
            else:
                shutil.rmtree(p, ignore_errors=True)

    # -- load --------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """Newest complete checkpoint (rank 0 decides, broadcast to all); warns for skipped ones."""
        rank, _ = self._dist()
        choice: str | None = None
        if rank == 0:
            for step, path in list_checkpoints(self.dir):
                reason = validate_checkpoint(path)
                if reason is None:
                    choice = str(path)
                    break
                warnings.warn(f"checkpoint {path} skipped: {reason}; trying an older one", CheckpointWarning, stacklevel=2)
        choice = self._broadcast(choice)
        return Path(choice) if choice else None

    def load_latest(self, state: dict[str, Any]) -> int | None:
        """Restore `state` in place from the newest complete checkpoint; its step, or None."""
        path = self.latest()
        return None if path is None else self.load(path, state)

    def load(self, path: str | Path, state: dict[str, Any]) -> int:
        """Restore `state` in place from checkpoint `path` (any world size); returns its step."""
        path = Path(path)
        rank, world = self._dist()
        sharded, replicated, local = self._split(state)
        dcp.load(sharded, checkpoint_id=str(path), no_dist=world == 1 and not dist.is_initialized())
        saved = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        step, old_world = int(saved["step"]), int(saved["world_size"])
        for k, target in replicated.items():
            if k in saved:
                self._restore(target, saved[k], k)
            else:
                warnings.warn(f"checkpoint {path}: no state for {k!r}; left as is", CheckpointWarning, stacklevel=2)
        own = path / f"rank_{rank:05d}.pt"
        same_world = old_world == world and own.is_file()
        per_rank = torch.load(own if same_world else path / "rank_00000.pt", map_location="cpu", weights_only=False)
        if same_world:
            set_rng_state(per_rank["rng"])
        else:
            # RNG streams cannot be resharded; give every rank a distinct deterministic stream.
            _reseed(step, rank)
            if rank == 0:
                warnings.warn(
                    f"checkpoint {path} was written by {old_world} ranks, loading on {world}: RNG reseeded per rank, "
                    f"per-rank state {sorted(local)} taken from rank 0",
                    CheckpointWarning,
                    stacklevel=2,
                )
        for k, target in local.items():
            if k in per_rank:
                self._restore(target, per_rank[k], k)
        self._barrier()
        return step


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
def export_safetensors(
    checkpoint_dir: str | Path,
    out_path: str | Path,
    *,
    prefix: str = "model",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 10 * 2**30,
    index_name: str = "diffusion_pytorch_model.safetensors.index.json",
    shard_stem: str = "diffusion_pytorch_model",
    config: dict | None = None,
) -> list[Path]:
    """Consolidate the weights of module `prefix` from a DCP checkpoint into safetensors.

    `out_path` ending in `.safetensors`: one file. Otherwise a directory in the Wan/diffusers layout:
    `<stem>-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` + the index json (+
    `config.json` when `config` is given). Runs in one process, loading one shard's tensors at a
    time (the optimizer state is never read), so a 14B expert exports in ~ shard-size memory.
    Key names are the module's own parameter names (Wan names for our DiT).
    """
    from safetensors.torch import save_file

    checkpoint_dir = Path(checkpoint_dir)
    meta = dcp.FileSystemReader(str(checkpoint_dir)).read_metadata()
    head = f"{prefix}."
    tensors = {
        k[len(head) :]: v
        for k, v in meta.state_dict_metadata.items()
        if k.startswith(head) and hasattr(v, "size") and hasattr(v, "properties")
    }
    if not tensors:
        raise ValueError(f"{checkpoint_dir}: no tensors under {prefix!r} (keys: {sorted(meta.state_dict_metadata)[:5]} ...)")
    out_path = Path(out_path)

    def nbytes(m) -> int:
        return int(torch.Size(m.size).numel()) * torch.empty((), dtype=dtype or m.properties.dtype).element_size()

    def load(names: list[str]) -> dict[str, torch.Tensor]:
        sd = {head + n: torch.empty(tensors[n].size, dtype=tensors[n].properties.dtype) for n in names}
        dcp.load(sd, checkpoint_id=str(checkpoint_dir), no_dist=True)
        return {n: (sd[head + n].to(dtype) if dtype else sd[head + n]).contiguous() for n in names}

    names = sorted(tensors)
    if out_path.suffix == ".safetensors":
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(load(names), str(out_path), metadata={"format": "pt"})
        return [out_path]
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = nbytes(tensors[n])
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    out_path.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    written: list[Path] = []
    for i, group in enumerate(shards):
        fname = f"{shard_stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else f"{shard_stem}.safetensors"
        save_file(load(group), str(out_path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
        written.append(out_path / fname)
    total = sum(nbytes(tensors[n]) for n in names)
    (out_path / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    written.append(out_path / index_name)
    if config is not None:
        (out_path / "config.json").write_text(json.dumps(config, indent=2))
        written.append(out_path / "config.json")
    return written
