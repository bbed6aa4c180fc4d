"""Distributed checkpoints (torch.distributed.checkpoint): atomic, validated, resharding, pruned.

Layout of one checkpoint `<run_dir>/checkpoints/step_00000100/`:
  .metadata, __*_*.distcp   DCP: every nn.Module (key "<name>.<fqn>") and optimizer ("<name>.<fqn>...")
  state.pt                  rank 0: replicated small state (scheduler, plain dicts such as the
                            curriculum position, other Stateful objects), world size, step
  rank_00003.pt             per rank: RNG states (python, numpy, torch cpu/cuda) + per-rank keys
                            (the dataloader by default)
  COMPLETE                  JSON written last, when every rank has finished: step, world size and
                            the size and xxh3-128 checksum of every file above (each rank hashes
                            the files it wrote). A directory without it is never loaded.
All of it is written into `step_XXXXXXXX.tmp/` and renamed when every rank has finished, so a
crash mid-save leaves only a `.tmp` directory (ignored, removed by the next save). A full disk
removes that `.tmp` and raises `DiskFullError`; the previous checkpoints are untouched.

Loading picks the newest checkpoint whose files match their marker (sizes and checksums, verified
by all ranks in parallel); if loading it still fails, the next older valid one is loaded and the
failure (file, reason) is reported. A checkpoint whose keys or shapes differ from the model is a
`CheckpointError` (the config changed), never a reason to fall back. Pruning deletes only folders
with a COMPLETE marker this code wrote, older than the newest `keep_last` valid ones at or below
the step being saved (see docs/parallel.md, "Checkpoints").

Why xxh3-128 and not sha256: it hashes at memory speed (~10x sha256), so checking a 100 GB
checkpoint costs its read time; it guards against corruption, not against an attacker.

Why not torchtitan's `CheckpointManager`: it is bound to torchtitan's trainer config/ft objects
and its own folder naming, and it has no COMPLETE-marker fallback; DCP underneath is the same.

Resharding: model/optimizer tensors are DTensors (FSDP2) or plain tensors, saved with their global
shapes by DCP, so a checkpoint written by N ranks loads on any M ranks and on 1 process.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from parallel.checkpoint_files import (
    CHECKSUM,
    MARKER,
    STEP_RE,
    DiskFullError,
    check_structure,
    checksum_failure,
    file_checksum,
    filesystem_of,
    human_bytes,
    is_ours,
    list_checkpoints,
    looks_like_disk_full,
    no_valid_checkpoint,
    validate_checkpoint,
)
from titan_world.model.io import CheckpointError, check_shapes, save_state_dict

log = logging.getLogger(__name__)


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (partial/corrupt) or state could not be restored exactly."""


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it "assumes the intent" of one process whenever no_dist is set: here it is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


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
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
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


def _state_bytes(sharded: dict[str, Stateful]) -> int:
    """Bytes of every tensor DCP writes (global sizes: a DTensor counts its full shape)."""
    total = 0
    todo: list[Any] = [s.state_dict() for s in sharded.values()]
    while todo:
        v = todo.pop()
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            todo += list(v.values())
        elif isinstance(v, (list, tuple)):
            todo += list(v)
    return total


# ------------------------------------------------------------------------------------------------
# The checkpointer
# ------------------------------------------------------------------------------------------------
class _ConfigMismatch(CheckpointError):
    """The checkpoint's keys/shapes differ from the model: a config change, not corruption."""


class Checkpointer:
    """Save/restore training state with DCP.

    `state` maps names to: nn.Module (sharded via DCP), torch.optim.Optimizer (bound to the module
    in `state` that holds its parameters), objects with state_dict/load_state_dict (scheduler,
    dataloader, ...) and plain dicts (curriculum position, counters; restored in place).
    Keys in `per_rank` (default: "dataloader") are saved per rank; all other non-tensor state is
    taken from rank 0. RNG states are always saved per rank.
    """

    def __init__(
        self,
        run_dir: str | Path,
        keep_last: int = 3,
        per_rank: Iterable[str] = ("dataloader",),
        subdir: str = "checkpoints",
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: expected >= 1")
        self.dir = Path(run_dir) / subdir
        self.keep_last = keep_last
        self.per_rank = set(per_rank)
        self.loaded_from: Path | None = None  # the checkpoint `load` restored (after any fallback)
        self._verified: set[str] = set()  # checkpoints whose checksums this process checked or wrote

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

    def _all_gather(self, obj: Any) -> list[Any]:
        _, world = self._dist()
        if world == 1:
            return [obj]
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out

    def _agree(self, error: str | None) -> str | None:
        """Every rank's local error, joined (None when all succeeded): a collective, so all ranks
        take the same branch after a step that may fail on one rank only."""
        errors = self._all_gather(error)
        named = [e if len(errors) == 1 else f"rank {r}: {e}" for r, e in enumerate(errors) if e]
        return "; ".join(named) or None

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
            raise TypeError(
                f"Checkpointer: cannot restore state[{key!r}] of type {type(target).__name__} in place (use a dict "
                "or an object with load_state_dict)"
            )

    # -- save --------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint `step` atomically (collective: every rank calls it). Returns its path.

        Raises DiskFullError (the partial save removed, older checkpoints intact) when the
        filesystem fills up; any other failure also removes the partial save and is re-raised."""
        rank, world = self._dist()
        final, tmp = self.path_for(step), self.dir / f"step_{step:08d}.tmp"
        sharded, replicated, local = self._split(state)
        t0 = time.time()
        error: BaseException | None = None
        sums: dict[str, str] = {}
        if rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as e:
                error = e
        if self._broadcast(error is not None):  # (also the barrier before the ranks write)
            raise self._save_failed(error, f"creating {tmp} failed on rank 0: {error}", tmp, sharded)
        try:
            # one rank: no collectives. DCP's process-group path on a 1-rank gloo group left every later CPU
            # op of the process 1.2-3x slower after each save of optimizer state (torch 2.13; benchmarks/
            # bench_checkpoint.py): the demo teacher's steps were 50% slower after its first checkpoint
            with _quiet_single_process():
                dcp.save(sharded, checkpoint_id=str(tmp), no_dist=world == 1)
            per_rank = {"rng": rng_state(), **{k: self._plain(v) for k, v in local.items()}}
            torch.save(per_rank, tmp / f"rank_{rank:05d}.pt")
            if rank == 0:
                shared = {"step": step, "world_size": world, **{k: self._plain(v) for k, v in replicated.items()}}
                torch.save(shared, tmp / "state.pt")
            # each rank hashes what it wrote (still in its page cache); rank 0 the shared files
            own = [p for p in tmp.iterdir() if p.name.startswith(f"__{rank}_") or p.name == f"rank_{rank:05d}.pt"]
            sums = {p.name: file_checksum(p) for p in own}
        except (Exception, CheckpointException) as e:
            error = e
        gathered = self._all_gather((f"{type(error).__name__}: {error}" if error else None, sums))
        failed = "; ".join(e for e, _ in gathered if e)
        if not failed and rank == 0:
            try:
                self._finish(step, world, tmp, final, {k: v for _, s in gathered for k, v in s.items()}, t0)
            except (Exception, CheckpointException) as e:
                error = e
        failed = failed or self._broadcast(f"{type(error).__name__}: {error}" if error else None)
        if failed:
            raise self._save_failed(error, failed, tmp, sharded)
        self._verified.add(str(final))
        self._barrier()
        return final

    def _finish(self, step: int, world: int, tmp: Path, final: Path, sums: dict[str, str], t0: float) -> None:
        """Rank 0, after every rank wrote and hashed its files: marker, rename into place, prune."""
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        sizes = {p.name: p.stat().st_size for p in files}
        checksums = {p.name: sums[p.name] if p.name in sums else file_checksum(p) for p in files}
        marker = {
            "step": step,
            "world_size": world,
            "time": time.time(),
            "save_seconds": round(time.time() - t0, 3),
            "sizes": sizes,
            "checksum": CHECKSUM,
            "checksums": checksums,
        }
        _write_synced(tmp / MARKER, json.dumps(marker, indent=1))
        if final.exists():  # re-saving a step (e.g. after a requeue): replace it, but only if we wrote it
            old = final.with_name(f"{final.name}.replaced-{os.getpid()}")
            if not is_ours(final):
                old = final.with_name(f"{final.name}.not-a-checkpoint-{int(time.time())}")
                warnings.warn(
                    f"{final} has no {MARKER} marker of ours; moved aside to {old.name} (not deleted)",
                    CheckpointWarning,
                    stacklevel=3,
                )
            os.replace(final, old)
            os.replace(tmp, final)
            if old.name.startswith(f"{final.name}.replaced-"):
                shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.dir)
        self._prune(step)

    def _save_failed(
        self, error: BaseException | None, failed: str, tmp: Path, sharded: dict[str, Stateful]
    ) -> BaseException:
        """Remove the partial save; a clear DiskFullError when the filesystem is full, else the
        original error (or, on ranks where nothing failed, a RuntimeError naming the rank that did)."""
        rank, _ = self._dist()
        free_at_failure = shutil.disk_usage(self.dir).free if self.dir.is_dir() else 1 << 62
        full = self._agree("full" if error is not None and looks_like_disk_full(error, free_at_failure) else None)
        self._barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        if full:
            need = _state_bytes(sharded)
            free = shutil.disk_usage(self.dir).free
            return DiskFullError(
                f"no space left on {filesystem_of(self.dir)} writing {tmp} (checkpoint needs ~{human_bytes(need)}, "
                f"{human_bytes(free)} free). The partial checkpoint was removed; the previous checkpoints are intact. "
                "Free space or set run.dir on a larger filesystem, then --resume."
            )
        if error is not None:
            return error
        return RuntimeError(f"checkpoint save to {tmp} failed on another rank: {failed}")

    def _prune(self, step: int) -> None:
        """Drop stale `.tmp` dirs and checkpoints older than the newest `keep_last` valid ones at or
        below `step`. Never touches checkpoints above `step` (newer than what this run resumed
        from), never deletes anything before `keep_last` valid ones are counted (a broken
        checkpoint may be all that is left), and deletes only folders with our COMPLETE marker."""
        for p in self.dir.glob("step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        kept = 0
        for s, p in list_checkpoints(self.dir):
            if s > step:
                continue
            if kept >= self.keep_last:
                if is_ours(p):
                    shutil.rmtree(p, ignore_errors=True)
            elif validate_checkpoint(p, verify_checksums=False) is None:
                kept += 1

    # -- load --------------------------------------------------------------------------------
    def _verify(self, path: Path, checksums: dict[str, str]) -> str | None:
        """Checksums of `path`, the files split over the ranks (collective); cached per process."""
        if str(path) in self._verified:
            return None
        rank, world = self._dist()
        names = sorted(checksums)
        error = checksum_failure(path, {n: checksums[n] for n in names[rank::world]})
        error = self._agree(error)
        if error is None:
            self._verified.add(str(path))
        return error

    def _candidates(self, below: int | None = None) -> list[tuple[str, str | None, dict[str, str] | None]]:
        """(path, structural problem or None, checksums or None) newest first (rank 0, broadcast)."""
        rank, _ = self._dist()
        listing = None
        if rank == 0:
            listing = []
            for step, path in list_checkpoints(self.dir):
                if below is not None and step >= below:
                    continue
                reason, marker = check_structure(path)
                if marker is not None and "checksums" not in marker:
                    warnings.warn(
                        f"checkpoint {path} has no checksums (written before they were stored): sizes checked only",
                        CheckpointWarning,
                        stacklevel=3,
                    )
                listing.append((str(path), reason, None if marker is None else marker.get("checksums", {})))
        return self._broadcast(listing)

    def _newest_valid(self, listing, failures: list[tuple[str, str]]) -> Path | None:
        rank, _ = self._dist()
        for path, reason, sums in listing:
            if reason is None:
                reason = self._verify(Path(path), sums)
            if reason is None:
                return Path(path)
            failures.append((path, reason))
            if rank == 0:
                log.warning("checkpoint %s skipped: %s", path, reason)
                warnings.warn(
                    f"checkpoint {path} skipped: {reason}; trying an older one", CheckpointWarning, stacklevel=3
                )
        return None

    def latest(self) -> Path | None:
        """Newest valid checkpoint (marker, metadata, sizes, checksums); None only when there is no
        checkpoint at all. CheckpointError naming each one and why when none is valid. Collective."""
        listing = self._candidates()
        if not listing:
            return None
        failures: list[tuple[str, str]] = []
        choice = self._newest_valid(listing, failures)
        if choice is None:
            raise no_valid_checkpoint(self.dir, failures)
        return choice

    def load_latest(self, state: dict[str, Any]) -> int | None:
        """Restore `state` in place from the newest valid checkpoint; its step, or None when there is
        no checkpoint. Falls back to older ones like `load`."""
        path = self.latest()
        return None if path is None else self.load(path, state)

    def load(self, path: str | Path, state: dict[str, Any]) -> int:
        """Restore `state` in place from checkpoint `path` (any world size); returns its step.

        If loading fails (an unreadable file, a DCP error), the failure is reported with the file
        and the next older valid checkpoint is loaded instead (`self.loaded_from` says which).
        Keys or shapes that differ from the model raise CheckpointError at once: a config change,
        which an older checkpoint of the same run would not fix."""
        path = Path(path)
        failures: list[tuple[str, str]] = []
        while True:
            step, reason = self._load_one(path, state)
            if reason is None:
                break
            failures.append((str(path), reason))
            if self._dist()[0] == 0:
                log.warning("loading checkpoint %s failed: %s", path, reason)
                warnings.warn(
                    f"loading checkpoint {path} failed: {reason}; falling back to an older one",
                    CheckpointWarning,
                    stacklevel=2,
                )
            m = STEP_RE.match(path.name)
            older = self._newest_valid(self._candidates(below=int(m.group(1)) if m else -1), failures)
            if older is None:
                raise no_valid_checkpoint(self.dir if m else path, failures)
            path = older
        self.loaded_from = path
        self._barrier()
        return step

    def _load_one(self, path: Path, state: dict[str, Any]) -> tuple[int, str | None]:
        """Load `path` into `state`: (its step, None), or (-1, why not), the same on every rank."""
        rank, world = self._dist()
        sharded, replicated, local = self._split(state)
        self._check_keys(path, sharded)
        # the small files first (into memory), so a bad one is found before any state changes
        saved = per_rank = None
        own = path / f"rank_{rank:05d}.pt"
        error = None
        try:
            saved = _torch_load(path / "state.pt")
            old_world = int(saved["world_size"])
            same_world = old_world == world and own.is_file()
            per_rank = _torch_load(own if same_world else path / "rank_00000.pt")
        except CheckpointError as e:
            error = str(e)
        error = self._agree(error)
        if error:
            return -1, error
        try:
            with _quiet_single_process():
                dcp.load(sharded, checkpoint_id=str(path), no_dist=world == 1)  # (as in save)
        except (Exception, CheckpointException) as e:
            return -1, f"reading the DCP shards ({_dcp_files(path)}) failed: {_describe_failure(e)}"
        step = int(saved["step"])
        for k, target in replicated.items():
            if k in saved:
                self._restore(target, saved[k], k)
            else:
                warnings.warn(f"checkpoint {path}: no state for {k!r}; left as is", CheckpointWarning, stacklevel=3)
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
                    stacklevel=3,
                )
        for k, target in local.items():
            if k in per_rank:
                self._restore(target, per_rank[k], k)
        return step, None

    def _check_keys(self, path: Path, sharded: dict[str, Stateful]) -> None:
        """_ConfigMismatch naming the missing / unexpected / mis-shaped keys of each module."""
        try:
            meta = dcp.FileSystemReader(str(path)).read_metadata()
        except Exception:
            return  # unreadable metadata: reported (and fallen back from) by the load itself
        for name, st in sharded.items():
            if not isinstance(st, _ModelState):
                continue
            head = f"{name}."
            found = {
                k[len(head) :]: tuple(v.size)
                for k, v in meta.state_dict_metadata.items()
                if k.startswith(head) and isinstance(v, TensorStorageMetadata)
            }
            expected = {k: tuple(v.shape) for k, v in st.state_dict().items() if isinstance(v, torch.Tensor)}
            try:
                check_shapes(expected, found, f"{path} state[{name!r}]")
            except CheckpointError as e:
                raise _ConfigMismatch(
                    f"{e}. The model config differs from the run's that wrote this checkpoint (see the run's "
                    "config.yaml); resume with that config, or start a new run dir. Not falling back to an older "
                    "checkpoint: it has the same layout."
                ) from None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"file {path.name} unreadable: {type(e).__name__}: {_first_line(e)}") from e


def _dcp_files(path: Path) -> str:
    """The shard files DCP reads for `path` (from its metadata): what a failed DCP load names."""
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception:
        return ".metadata"
    files = sorted({getattr(v, "relative_path", "?") for v in (meta.storage_data or {}).values()})
    return ", ".join(files[:8]) + (f", ... ({len(files)} files)" if len(files) > 8 else "")


def _describe_failure(e: BaseException) -> str:
    """One line per failing rank of a DCP CheckpointException (its str is a whole traceback)."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {type(x).__name__}: {_first_line(x)}" for r, (x, _) in sorted(e.failures.items()))
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


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
class DcpTensors(Mapping[str, torch.Tensor]):
    """The tensors of module `prefix` in a DCP checkpoint, by their own (Wan) names, read in one process in
    groups of about `group_bytes` (one `dcp.load` each) as they are asked for, optionally cast to `dtype`.
    Only the group being read is held, and the optimizer state is never read."""

    def __init__(self, checkpoint_dir: str | Path, prefix: str, dtype: torch.dtype | None, group_bytes: int) -> None:
        self.dir, self.head, self.dtype, self.group_bytes = str(checkpoint_dir), f"{prefix}.", dtype, group_bytes
        meta = dcp.FileSystemReader(self.dir).read_metadata().state_dict_metadata
        self.meta = {
            k[len(self.head) :]: v
            for k, v in sorted(meta.items())
            if k.startswith(self.head) and isinstance(v, TensorStorageMetadata)
        }
        if not self.meta:
            raise ValueError(f"{checkpoint_dir}: no tensors under {prefix!r} (keys: {sorted(meta)[:5]} ...)")
        self.loaded: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.meta)

    def __iter__(self):
        return iter(self.meta)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.loaded:
            names = list(self.meta)
            group, size = [], 0
            for n in names[names.index(name) :]:
                size += self.meta[n].size.numel() * self.meta[n].properties.dtype.itemsize
                if group and size > self.group_bytes:
                    break
                group.append(n)
            sd = {self.head + n: torch.empty(self.meta[n].size, dtype=self.meta[n].properties.dtype) for n in group}
            dcp.load(sd, checkpoint_id=self.dir, no_dist=True)
            self.loaded = {n: sd[self.head + n].to(self.dtype or sd[self.head + n].dtype) for n in group}
        return self.loaded[name]


def export_safetensors(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    config: dict,
    *,
    prefix: str = "model",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Consolidate the weights of module `prefix` from a DCP checkpoint into `out_dir` in the Wan/diffusers
    layout (`model.io.save_state_dict`: config.json + safetensors shards + index), in about two shards of memory,
    so a 14B expert exports on one host."""
    save_state_dict(DcpTensors(checkpoint_dir, prefix, dtype, max_shard_bytes), Path(out_dir), config, max_shard_bytes)
