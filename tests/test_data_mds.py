"""MDS round trip, curriculum windows, rank partition, exact resume, no leaked shared memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from slurm_cluster import free_port

from titan_world.config import load_config
from titan_world.data._streaming import StreamingDataset, leaked_shm_files, streaming_shm_files
from titan_world.data.curriculum import Curriculum, window_latents
from titan_world.data.loader import build_train_loader
from titan_world.data.synth import make_episode
from titan_world.data.writer import synthesize
from titan_world.model.codec import TinyCodec, frames_to_video

pytestmark = pytest.mark.xdist_group("data_streaming")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    cfg = load_config(None, [f"data.path={out}", "data.height=32", "data.width=32"])
    synthesize(cfg, out, 12, 2.0, keep_raw=True, progress=False)
    # two short episodes (9 frames) appended as a second stream would complicate things; instead
    # the drop rule is tested with a clip longer than some episodes in test_drop_rule
    return cfg, out


def test_round_trip(dataset):
    cfg, out = dataset
    before = streaming_shm_files()
    ds = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    try:
        assert len(ds) == 12
        for i in (0, 7):
            row, ep = ds[i], make_episode(i, 32, 32, 2.0)
            assert row["episode_id"] == ep.episode_id and row["num_frames"] == 33 and row["fps"] == 16
            assert np.array_equal(row["frames"], ep.frames)
            assert np.array_equal(row["actions"], ep.actions) and np.array_equal(row["c2w"], ep.c2w)
            assert np.array_equal(row["intrinsics"], ep.intrinsics) and row["captions"] == ep.captions
            assert row["latents"].dtype == np.float16 and row["latents"].shape == (192, 9, 8, 8)
            dec = TinyCodec(4).decode(torch.from_numpy(np.array(row["latents"], np.float32))[None])[0]
            frames = ((dec.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            assert np.array_equal(frames, ep.frames)  # fp16 latents keep uint8 frames exactly
            assert row["text_emb"].shape == (32, 64) and row["meta"]["codec"]["kind"] == "tiny"
    finally:
        from titan_world.data._streaming import release_prefix

        release_prefix(ds._shm_prefix_int)
        del ds
    assert leaked_shm_files(before) == []  # ours only: other jobs on the machine come and go


def test_window_latents_exact():
    ep = make_episode(2, 16, 16, 2.0)
    codec = TinyCodec(4)
    lat = codec.encode(frames_to_video(ep.frames[None]))[0].numpy()
    for j in (0, 1, 3):
        win = window_latents(lat, j, 5, codec)
        ref = codec.encode(frames_to_video(ep.frames[None, 4 * j : 4 * j + 17]))[0].numpy()
        assert np.array_equal(win, ref)


def test_curriculum_windows_and_collate(dataset):
    cfg, out = dataset
    before = streaming_shm_files()
    for frames in (5, 17, 33):
        loader = build_train_loader(cfg, frames, 0, 1, seed=1, batch_size=3)
        batch = next(iter(loader))
        f = 1 + (frames - 1) // 4
        assert (
            batch["latents"].shape == (3, cfg.data.codec.channels, f, 8, 8) and batch["latents"].dtype == torch.float32
        )
        assert batch["cond_mask"].shape == (3, f) and batch["cond_mask"].dtype == torch.bool
        assert batch["cond_mask"][:, 0].all()
        assert batch["actions"].shape == (3, frames, 8) and batch["latent_actions"].shape == (3, f, 8)
        assert batch["c2w"].shape == (3, frames, 4, 4) and batch["intrinsics"].shape == (3, frames, 4)
        assert batch["text"].shape == (3, 32, 64) and len(batch["captions"]) == 3
        for i in range(3):  # latents match the raw frames of the window
            s = int(batch["start_frames"][i])
            assert s % 4 == 0 and s + frames <= 33
            exact = TinyCodec(4).encode(frames_to_video(batch["frames"][i : i + 1].numpy())).half()  # as stored
            ref = TinyCodec(4, cfg.data.codec.channels).compress(exact.float())[0]
            assert torch.allclose(batch["latents"][i], ref.half().float())
            n_cond = int(batch["cond_mask"][i].sum())
            assert batch["cond_mask"][i, :n_cond].all() and (
                n_cond == 1 if batch["tasks"][i] == "i2v" else 1 <= n_cond <= 2
            )
        loader.close()
    assert leaked_shm_files(before) == []  # ours only: other jobs on the machine come and go


def test_i2v_ratio():
    cur = Curriculum(17, i2v_ratio=0.25, v2v_max_cond_frames=3, seed=0)
    tasks = [cur.choose(cur.rng(0, i), 65, True) for i in range(400)]
    share = np.mean([t[1] == "i2v" for t in tasks])
    assert 0.17 < share < 0.33
    assert {t[2] for t in tasks if t[1] == "v2v"} == {1, 2, 3}
    assert all(0 <= t[0] <= 12 for t in tasks)


def test_drop_rule(dataset):
    cfg, out = dataset
    loader = build_train_loader(cfg, 37, 0, 1, seed=0, batch_size=2)  # all episodes have 33 frames
    with pytest.raises(ValueError, match="no episode"):
        next(iter(loader))
    loader.close()


def test_plain_process_environment_is_left_alone(dataset, monkeypatch):
    """streaming needs RANK/WORLD_SIZE while a dataset is built; a plain process must not keep
    them afterwards (a later `--nproc` launch would think it already runs under torchrun)."""
    cfg, out = dataset
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    loader = build_train_loader(cfg, 17, 0, 1, seed=0, batch_size=2)
    try:
        assert next(iter(loader))["latents"].shape[0] == 2
        assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"} & set(os.environ)
    finally:
        loader.close()


def _ids(batches) -> list[tuple[str, int]]:
    return [(e, int(s)) for b in batches for e, s in zip(b["episode_ids"], b["start_frames"])]


def test_resume_mid_epoch_exact(dataset):
    cfg, out = dataset
    before = streaming_shm_files()
    a = build_train_loader(cfg, 17, 0, 1, seed=5, batch_size=2)
    full = list(a)
    full2 = list(a)  # epoch 2: a different order/windows
    a.close()
    assert len(full) == 6 and _ids(full) != _ids(full2)
    b = build_train_loader(cfg, 17, 0, 1, seed=5, batch_size=2)
    it = iter(b)
    head = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(b.state_dict()))  # must survive a checkpoint (JSON-able)
    b.close()
    c = build_train_loader(cfg, 17, 0, 1, seed=5, batch_size=2)
    c.load_state_dict(state)
    tail = list(c)
    assert _ids(head + tail) == _ids(full)
    assert all(
        torch.equal(x["latents"], y["latents"]) and torch.equal(x["cond_mask"], y["cond_mask"])
        for x, y in zip(head + tail, full)
    )
    assert _ids(list(c)) == _ids(full2)  # and the next epoch continues like the uninterrupted run
    c.close()
    assert leaked_shm_files(before) == []  # ours only: other jobs on the machine come and go


_RANK_SCRIPT = r"""
import json, sys
from titan_world.config import load_config
from titan_world.data.loader import build_train_loader
cfg = load_config(None, [f"data.path={sys.argv[1]}", "data.height=32", "data.width=32"])
loader = build_train_loader(cfg, 9, int(sys.argv[2]), 2, seed=3, batch_size=2)
ids = [e for b in loader for e in b["episode_ids"]]
loader.close()
print("IDS" + json.dumps(ids))
"""


@pytest.mark.slow
def test_two_ranks_disjoint_and_cover(dataset):
    cfg, out = dataset
    before = streaming_shm_files()
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _RANK_SCRIPT, str(out), str(rank)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).parents[1],
            )
        )
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(next(l for l in stdout.splitlines() if l.startswith("IDS"))[3:]))
    assert len(results[0]) == len(results[1]) == 6
    assert not set(results[0]) & set(results[1])
    assert set(results[0]) | set(results[1]) == {f"synth-{i:08d}" for i in range(12)}
    assert leaked_shm_files(before) == []  # ours only: other jobs on the machine come and go


def _open_while_another_job_registers(out: str) -> int:
    """Rank 1 scans for a free prefix; then "another job" registers that prefix (rank 1 makes the
    file, as that job's leader would just before this job's leader takes the lock) and the leader
    (rank 0) scans: left alone the two ranks pick different prefixes."""
    from multiprocessing.shared_memory import SharedMemory

    import torch.distributed as dist
    from streaming.base.constant import SHM_TO_CLEAN
    from streaming.base.shared import prefix

    from parallel.distributed import init_distributed

    rank, _, _ = init_distributed()
    real_scan, other_job = prefix._check_and_find, []

    def scan(local, remote, shm_name):
        if not other_job and rank == 1:
            found = real_scan(local, remote, shm_name)
            other_job.append(SharedMemory(f"{found:06}_{SHM_TO_CLEAN[0]}", create=True, size=8))
            dist.barrier()
            return found
        if not other_job:  # the leader: scan once the other job has registered
            other_job.append(None)
            dist.barrier()
        return real_scan(local, remote, shm_name)

    prefix._check_and_find = scan
    try:
        cfg = load_config(None, [f"data.path={out}", "data.height=32", "data.width=32"])
        loader = build_train_loader(cfg, 9, rank, 2, seed=3, batch_size=2)
        picked = loader.dataset._shm_prefix_int
        next(iter(loader))
        loader.close()
    finally:
        prefix._check_and_find = real_scan
        if other_job and other_job[-1] is not None:
            other_job[-1].close()
            other_job[-1].unlink()
    return picked


@pytest.mark.slow
def test_ranks_agree_on_the_shared_memory_prefix_when_another_job_starts(dataset):
    from dist_utils import run_distributed

    _, out = dataset
    picks = run_distributed(_open_while_another_job_registers, 2, str(out), timeout=120)
    assert picks[0] == picks[1]
