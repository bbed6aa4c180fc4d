"""`titan-world data synth --nproc 2`: two ranks write the same dataset as one process, atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from launch.cli import main
from titan_world.config import load_config
from titan_world.data._streaming import StreamingDataset, leaked_shm_files, release_prefix, streaming_shm_files
from titan_world.data.loader import build_train_loader
from titan_world.data.parallel_write import RankGroup, WriteError, rank_items, write_parallel

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(name="data_streaming")]

SYNTH = ["--episodes", "5", "--seconds", "1", "--height", "16", "--width", "16", "--seed", "3"]


def _samples(path: Path) -> dict[str, dict]:
    """Every sample of the dataset at `path`, by episode id (the merged order differs by design)."""
    ds = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
    try:
        rows = [ds[i] for i in range(len(ds))]
    finally:
        release_prefix(ds._shm_prefix_int)
        del ds
    by_id = {r["episode_id"]: r for r in rows}
    assert len(by_id) == len(rows), "an episode was written twice"
    return by_id


def test_two_ranks_equal_one_process(tmp_path, capsys):
    before = streaming_shm_files()
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["data", "synth", "--out", str(one), *SYNTH]) == 0
    assert main(["data", "synth", "--out", str(two), "--nproc", "2", *SYNTH]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no temp folder left
    assert sorted(p.name for p in two.iterdir()) == ["index.json", "rank-000", "rank-001", "titan_dataset.json"]
    meta = json.loads((two / "titan_dataset.json").read_text())
    assert meta["episodes"] == 5 and meta["ranks"] == 2

    a, b = _samples(one), _samples(two)
    assert sorted(b) == sorted(a) == [f"synth-{3 + i:08d}" for i in range(5)]
    for eid, ra in a.items():
        rb = b[eid]
        for col in ("latents", "text_emb", "actions", "c2w", "intrinsics"):
            assert np.array_equal(ra[col], rb[col]), (eid, col)
        assert ra["captions"] == rb["captions"] and ra["meta"] == rb["meta"] and ra["num_frames"] == rb["num_frames"]

    cfg = load_config(None, [f"data.path={two}", "data.height=16", "data.width=16"])
    loader = build_train_loader(cfg, 17, 0, 1, seed=0, batch_size=5)
    try:
        ids = [eid for batch in loader for eid in batch["episode_ids"]]
    finally:
        loader.close()
    assert sorted(ids) == sorted(a)  # the merged dataset trains: each episode once per epoch
    assert leaked_shm_files(before) == []  # other jobs' live prefixes may come and go meanwhile


def test_refuses_existing_out(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "x").write_text("mine")
    assert main(["data", "synth", "--out", str(tmp_path / "ds"), "--nproc", "2", *SYNTH]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "ds" / "x").read_text() == "mine"


def test_failed_write_leaves_nothing(tmp_path):
    def boom(folder: Path) -> None:
        (folder / "half-written").write_text("")
        raise OSError("disk full")

    with pytest.raises(WriteError, match="rank 0: OSError: disk full"):
        write_parallel(tmp_path / "ds", RankGroup(), boom)
    assert list(tmp_path.iterdir()) == []


def test_rank_items_partition():
    parts = [rank_items(7, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert rank_items(1, 1, 2) == []
