"""Jobs never lose user data and never continue silently wrong (issue 17 D1/D3/D4/W3/W5/W6/W8/T4/U4,
issue 22 item 4): data.path only generates synthetic data on request and never deletes, run dirs
are claimed atomically, --resume refuses when there is nothing to resume, post-training stops on
non-finite losses, Ctrl-C checkpoints, bad values are config errors before any work.

Tiny: 32x32 frames, 2-layer model, a few steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import main
from titan_world.config import ConfigError, load_config

pytestmark = pytest.mark.xdist_group("data_streaming")

BASE = [
    "data.height=32", "data.width=32", "data.synth_episodes=4", "data.synth_seconds=1.0",
    "run.wandb=disabled", "run.progress=false", "train.global_batch=2", "train.lr=1e-3", "train.warmup_steps=1",
    "train.stages.0.steps=3", "train.stages.1.steps=0", "train.ckpt_every=2", "model.num_layers=2",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from titan_world.data.loader import prepare_dataset

    path = tmp_path_factory.mktemp("reliability") / "data"
    prepare_dataset(load_config(None, [*BASE, f"data.path=synthetic:{path}"]), progress=False)
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- D1 + issue 22.4: data.path ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["train"], ["post-train", "causal"], ["distill-decoder"]])
@pytest.mark.parametrize("prefix", ["", "synthetic:"])
def test_a_folder_that_is_not_a_dataset_is_refused_and_untouched(tmp_path, capsys, command, prefix):
    videos = tmp_path / "v"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"my only copy")
    rc = main([*command, *BASE, f"data.path={prefix}{videos}", f"run.dir={tmp_path / 'run'}", "train.steps=1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"data.path={prefix}{videos}" in err and "synthetic" in err
    assert _tree(videos) == {"a.mp4": b"my only copy"}
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("value", [".", ""])
def test_data_path_dot_or_empty_never_touches_the_working_directory(tmp_path, capsys, monkeypatch, value):
    (tmp_path / "project.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    rc = main(["train", *BASE, f"data.path={value}", "run.dir=run", "train.steps=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.path" in err and "data.path=synthetic" in err, err
    assert _tree(tmp_path) == {"project.txt": b"keep me"}


def test_synthetic_dir_is_generated_into_a_new_or_empty_folder_and_reused(tmp_path):
    from titan_world.data.loader import SYNTHETIC_MARKER, prepare_dataset

    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (tmp_path / "new" / "ds", empty):
        cfg = load_config(None, [*BASE, "data.synth_episodes=2", f"data.path=synthetic:{target}"])
        assert prepare_dataset(cfg, progress=False) == str(target)
        assert (target / "index.json").is_file()
        assert json.loads((target / SYNTHETIC_MARKER).read_text())["episodes"] == 2
        before = _tree(target)
        assert prepare_dataset(cfg, progress=False) == str(target)  # a dataset now: used as is
        assert _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no temporary or lock files left


def test_synthetic_is_cached_under_data_cache_by_its_parameters(tmp_path, monkeypatch):
    from titan_world.data.loader import dataset_path, prepare_dataset

    monkeypatch.chdir(tmp_path)
    a = load_config(None, [*BASE, "data.synth_episodes=2"])
    assert a.data.path == "synthetic"  # the default asks for synthetic data explicitly
    path = prepare_dataset(a, progress=False)
    assert Path(path).parent == Path("data_cache") and (tmp_path / path / "index.json").is_file()
    b = load_config(None, [*BASE, "data.synth_episodes=3"])
    c = load_config(None, [*BASE, "data.synth_episodes=2", "data.synth_seed=1"])
    assert len({dataset_path(a), dataset_path(b), dataset_path(c)}) == 3
    assert dataset_path(load_config(None, [*BASE, "data.synth_episodes=2"])) == path


def test_an_existing_dataset_is_used_and_a_missing_one_is_an_error(data_dir, tmp_path):
    from titan_world.data.loader import check_data_path

    assert check_data_path(load_config(None, [*BASE, f"data.path={data_dir}"])).path == str(data_dir)
    with pytest.raises(ConfigError, match=r"data.path=.*nowhere.*no such folder.*data.path=synthetic"):
        check_data_path(load_config(None, [*BASE, f"data.path={tmp_path / 'nowhere'}"]))
    assert not (tmp_path / "nowhere").exists()


def test_fewer_samples_than_the_global_batch_is_an_error_before_step_0(data_dir):
    from titan_world.data.loader import build_train_loader

    cfg = load_config(None, [*BASE, f"data.path={data_dir}", "train.global_batch=8"])  # 4 episodes
    with pytest.raises(ConfigError, match=r"4 samples.*train.global_batch: 8"):
        build_train_loader(cfg, 9, 0, 1)


def test_data_size_other_than_the_dataset_is_an_error_naming_both(data_dir):
    from titan_world.data.loader import build_train_loader

    cfg = load_config(None, [*BASE, f"data.path={data_dir}", "data.height=64", "data.width=64"])
    with pytest.raises(ConfigError, match=r"data.height/width=64x64.*32x32"):
        build_train_loader(cfg, 9, 0, 1)


# -- D4: run dirs are claimed atomically -----------------------------------------------------------------
def _claim(barrier, root: str, out) -> None:
    from titan_world.config import resolve_run_dir

    cfg = load_config(None, ["run.dir=null"])
    barrier.wait()
    out.put(str(resolve_run_dir(cfg)))


def test_jobs_started_in_the_same_second_get_their_own_run_dirs(tmp_path, monkeypatch):
    import multiprocessing as mp

    import titan_world.config as config_mod

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config_mod, "_timestamp", lambda: "20261203-120000")  # the same second for all (fork keeps it)
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(barrier, str(tmp_path), out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    dirs = sorted(out.get(timeout=5) for _ in procs)
    assert len(set(dirs)) == 4, dirs
    assert dirs[0] == "runs/20261203-120000" and all(Path(d).is_dir() for d in dirs)
