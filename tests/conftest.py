"""Shared test fixtures: tiny configs, temporary run dirs, clean shared memory."""

from __future__ import annotations

import glob
import os

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
