"""Shared test fixtures: tiny configs, temporary run dirs, clean shared memory."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _clean_shm():
    """mosaicml-streaming leaves shared-memory files behind; remove the ones our tests made."""
    before = set(glob.glob("/dev/shm/*"))
    yield
    for path in set(glob.glob("/dev/shm/*")) - before:
        try:
            os.remove(path)
        except OSError:
            pass


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 2 MB filesystem (tmpfs); skipped where this process may not mount one."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
