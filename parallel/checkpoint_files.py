"""What a checkpoint folder on disk is: its `step_XXXXXXXX` name, the COMPLETE marker (sizes and
xxh3-128 checksums of every file), validation, and the diagnosis of a write that failed because the
disk is full. `parallel.checkpoint.Checkpointer` writes and reads checkpoints through these."""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.api import CheckpointException

from titan_world.model.io import CheckpointError

STEP_RE = re.compile(r"^step_(\d{8,})$")
MARKER = "COMPLETE"
CHECKSUM = "xxh3_128"


# ------------------------------------------------------------------------------------------------
# Validation and discovery
# ------------------------------------------------------------------------------------------------
def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Finished-looking checkpoint dirs (not `.tmp`), newest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def file_checksum(path: str | Path) -> str:
    """xxh3-128 of a file's bytes (hex), read in 8 MiB chunks into one reused buffer."""
    h = xxhash.xxh3_128()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def read_marker(path: Path) -> tuple[dict | None, str | None]:
    """(marker, None) or (None, why it cannot be used)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        return None, f"no {MARKER} marker (the save did not finish)"
    except (OSError, ValueError) as e:
        return None, f"unreadable {MARKER} marker: {e}"
    if not isinstance(marker, dict) or not isinstance(marker.get("sizes", {}), dict):
        return None, f"{MARKER} marker is not a checkpoint marker: {str(marker)[:80]}"
    return marker, None


def is_ours(path: Path) -> bool:
    """A folder this module wrote: step_XXXXXXXX naming and a COMPLETE marker holding its step."""
    m = STEP_RE.match(path.name)
    marker, _ = read_marker(path)
    return bool(m and marker is not None and marker.get("step") == int(m.group(1)))


def check_structure(path: Path) -> tuple[str | None, dict | None]:
    """(None, marker) if `path` is complete as far as names and sizes go, else (reason, None)."""
    marker, reason = read_marker(path)
    if marker is None:
        return reason, None
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # truncated/garbage pickle, missing file
        return f"unreadable DCP metadata (.metadata): {type(e).__name__}: {e}", None
    files = {getattr(v, "relative_path", None) for v in (meta.storage_data or {}).values()} - {None}
    for name in sorted(files) + ["state.pt"]:
        if not (path / name).is_file():
            return f"missing file {name}", None
    for name, size in marker.get("sizes", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return f"file {name} is missing or has the wrong size (expected {size} bytes)", None
    return None, marker


def checksum_failure(path: Path, checksums: dict[str, str]) -> str | None:
    """None if every file named in `checksums` still hashes to its stored value."""
    for name, want in sorted(checksums.items()):
        try:
            got = file_checksum(path / name)
        except OSError as e:
            return f"file {name} unreadable: {e}"
        if got != want:
            return f"file {name} is corrupt: its {CHECKSUM} checksum is {got}, the marker says {want}"
    return None


def validate_checkpoint(path: str | Path, verify_checksums: bool = True) -> str | None:
    """None if `path` is a complete checkpoint, else the reason it is not. Checks the marker, the
    DCP metadata, every file's size and (unless verify_checksums=False) its checksum; checkpoints
    written before checksums were stored are checked by size only."""
    path = Path(path)
    reason, marker = check_structure(path)
    if reason is None and verify_checksums:
        reason = checksum_failure(path, marker.get("checksums", {}))
    return reason


def no_valid_checkpoint(ckpt_dir: Path, failures: list[tuple[str, str]]) -> CheckpointError:
    lines = "\n".join(f"  {p}: {why}" for p, why in failures)
    return CheckpointError(
        f"{ckpt_dir}: none of the {len(failures)} checkpoints can be loaded:\n{lines}\n"
        "Nothing was deleted. Move the broken ones aside (or restore them) and resume again."
    )


# ------------------------------------------------------------------------------------------------
# Disk full
# ------------------------------------------------------------------------------------------------
class DiskFullError(OSError):
    """A checkpoint did not fit on its filesystem; the partial save was removed."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# torch.save reports a full disk as a RuntimeError from its zip writer, without the errno
_TORCH_WRITE_FAILURE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def _causes(exc: BaseException) -> Iterable[BaseException]:
    """`exc`, its causes/contexts and, for DCP's CheckpointException, every rank's exception."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [pair[0] for pair in e.failures.values()]


def looks_like_disk_full(exc: BaseException, free_bytes: int) -> bool:
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "No space left on device" in text:
            return True
        if any(s in text for s in _TORCH_WRITE_FAILURE) and free_bytes < 16 << 20:
            return True
    return False


def filesystem_of(path: Path) -> str:
    """'DEVICE (FSTYPE at MOUNTPOINT)' of the filesystem holding `path` (from /proc/mounts)."""
    real = os.path.realpath(path)
    best = None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and (best is None or len(mnt) > len(best[1])):
                best = (dev, mnt, fstype)
    except OSError:
        pass
    return f"{best[0]} ({best[2]} at {best[1]})" if best else str(path)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
