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
    "data.height=32",
    "data.width=32",
    "data.synth_episodes=4",
    "data.synth_seconds=1.0",
    "run.wandb=disabled",
    "run.progress=false",
    "train.global_batch=2",
    "train.lr=1e-3",
    "train.warmup_steps=1",
    "train.stages.0.steps=3",
    "train.stages.1.steps=0",
    "train.ckpt_every=2",
    "model.num_layers=2",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """4 episodes of 1 s at 32x32 (written as `titan-world data synth` does)."""
    from titan_world.data.writer import synthesize

    path = tmp_path_factory.mktemp("reliability") / "data"
    synthesize(load_config(None, BASE), path, 4, 1.0, progress=False)
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


# -- W6 / D3: --resume with nothing to resume; metrics.jsonl is never truncated ---------------------------
def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """3 steps, checkpoints at steps 2 and 3."""
    from titan_world.train.loop import train

    run_dir = tmp_path_factory.mktemp("finished")
    assert train(load_config(None, [*BASE, f"data.path={data_dir}", f"run.dir={run_dir}", "train.export=false"])) == 0
    return run_dir


def test_resume_with_nothing_to_resume_is_refused(data_dir, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "run"
    empty.mkdir()
    rc = main(["train", "--resume", *BASE, f"data.path={data_dir}", f"run.dir={empty}"])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and str(empty) in err, err
    assert list(empty.iterdir()) == []  # no config.yaml, no metrics, no checkpoint of a fresh random run
    monkeypatch.chdir(tmp_path)  # no runs/ here: --resume without run.dir has nothing to pick
    rc = main(["train", "--resume", *BASE, f"data.path={data_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume without run.dir" in err, err
    assert not (tmp_path / "runs").exists()


def test_api_resume_without_checkpoints_and_fresh_run_over_checkpoints_are_errors(data_dir, finished_run, tmp_path):
    from titan_world.model.io import CheckpointError
    from titan_world.train.loop import train

    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(load_config(None, [*BASE, f"data.path={data_dir}", f"run.dir={tmp_path}"]), resume=True)
    before = _tree(finished_run)
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*--resume"):
        train(load_config(None, [*BASE, f"data.path={data_dir}", f"run.dir={finished_run}", "train.steps=5"]))
    assert _tree(finished_run) == before  # no checkpoint pruned, no config.yaml or metrics rewritten


def test_resume_when_every_checkpoint_is_invalid_changes_nothing(data_dir, finished_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    for marker in (run_dir / "checkpoints").glob("step_*/COMPLETE"):
        marker.unlink()
    before = _tree(run_dir)
    rc = main(["train", "--resume", *BASE, f"data.path={data_dir}", f"run.dir={run_dir}", "train.steps=5"])
    err = capsys.readouterr().err
    assert rc == 2 and str(run_dir / "checkpoints") in err, err
    assert _tree(run_dir) == before  # metrics.jsonl (3 records), checkpoints, config.yaml untouched


def test_a_fresh_run_sets_earlier_records_aside_instead_of_truncating(data_dir, tmp_path):
    from titan_world.train.loop import train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    earlier = '{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n'
    (run_dir / "metrics.jsonl").write_text(earlier)  # a run killed before its first checkpoint
    assert (
        train(
            load_config(
                None, [*BASE, f"data.path={data_dir}", f"run.dir={run_dir}", "train.steps=1", "train.export=false"]
            )
        )
        == 0
    )
    assert (run_dir / "metrics.prev-1.jsonl").read_text() == earlier
    assert [r["step"] for r in _metrics(run_dir)] == [0]


def test_resume_drops_only_records_past_the_checkpoint(data_dir, finished_run, tmp_path):
    import shutil

    from titan_world.train.loop import train

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000003")  # resumes from step 2: step 2's record is redone
    assert (
        train(
            load_config(None, [*BASE, f"data.path={data_dir}", f"run.dir={run_dir}", "train.export=false"]), resume=True
        )
        == 0
    )
    recs = _metrics(run_dir)
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[:2] == _metrics(finished_run)[:2]


# -- W3: post-training stops on non-finite losses like pretraining ----------------------------------------
POST = [
    *BASE,
    "posttrain.batch_size=1",
    "posttrain.clip_frames=9",
    "posttrain.denoise_steps=[1000,500]",
    "posttrain.rollout_chunks=2",
    "posttrain.grad_chunks=2",
    "posttrain.fake_updates=1",
    "train.ckpt_every=1",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from tests.posttrain_runs import save_teacher

    path = tmp_path_factory.mktemp("teacher") / "model"
    save_teacher(path, "model.num_layers=2")
    return path


def _finite_export(run_dir: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    files = list((run_dir / "model").glob("*.safetensors"))
    return bool(files) and all(torch.isfinite(t).all() for f in files for t in load_file(f).values())


@pytest.mark.parametrize("stage", ["causal", "dmd"])
def test_posttrain_skips_non_finite_steps_and_stops_on_a_streak(stage, data_dir, teacher, tmp_path, capsys):
    from titan_world.exit_codes import EXIT_DIVERGED
    from titan_world.posttrain.loop import run_stage

    def cfg(run: str, *extra: str):
        return load_config(
            None,
            [
                *POST,
                f"data.path={data_dir}",
                f"run.dir={tmp_path / run}",
                f"posttrain.teacher={teacher}",
                f"posttrain.student={teacher}",
                *extra,
            ],
        )

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    assert run_stage(stage, cfg("one", "train.steps=3", "train.inject_nan_steps=[1]")) == 0
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # the job restored them
    recs = _metrics(tmp_path / "one")
    assert [r["skipped"] for r in recs] == [False, True, False]
    assert _finite_export(tmp_path / "one")
    assert "step 1: non-finite loss/grad" in capsys.readouterr().err

    run_dir = tmp_path / "streak"
    rc = run_stage(stage, cfg("streak", "train.steps=6", "train.inject_nan_steps=[1,2,3,4,5]", "train.max_bad_steps=2"))
    assert rc == EXIT_DIVERGED
    assert "3 consecutive non-finite losses" in capsys.readouterr().err
    assert not (run_dir / "model").exists()  # no NaN student exported
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000001"]  # the last good one only


# -- U4: Ctrl-C checkpoints ---------------------------------------------------------------------------------
def test_ctrl_c_checkpoints_then_resume_continues(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *BASE,
        f"data.path={data_dir}",
        f"run.dir={run_dir}",
        "train.stages.0.steps=400",
        "train.ckpt_every=0",
        "train.export=false",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "launch.cli", "train"]
    proc = subprocess.Popen(
        [*cmd, *args, "train.steps=400"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        while proc.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted (Ctrl-C): checkpoint" in out and "written" in out, out
    (ckpt,) = (run_dir / "checkpoints").glob("step_*")
    stopped_at = int(ckpt.name.split("_")[1])
    assert [r["step"] for r in _metrics(run_dir)] == list(range(stopped_at))
    done = subprocess.run(
        [*cmd, "--resume", *args, f"train.steps={stopped_at + 2}"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert f"resumed from {ckpt}" in done.stderr
    assert [r["step"] for r in _metrics(run_dir)] == list(range(stopped_at + 2))


def test_a_second_ctrl_c_exits_at_once():
    from titan_world.train.faults import EXIT_INTERRUPTED, StopFlag, stop_exit_code

    flag = StopFlag("train")
    flag.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, checkpoint, exit 130
        assert flag.requested and stop_exit_code(flag.code) == EXIT_INTERRUPTED
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- T4 / W8: bad values are config errors at load, naming key, value and expectation ------------------------
@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=-1", r"train.lr=-1.*positive"),
        ("train.betas=[0.9]", r"train.betas=\[0.9\].*two Adam betas in \[0, 1\)"),
        ("train.betas=[0.9,1.5]", r"train.betas=\[0.9, 1.5\]"),
        ("train.keep_last=0", r"train.keep_last=0.*>= 1"),
        ("train.micro_batch=0", r"train.micro_batch=0.*>= 1"),
        ("train.warmup_steps=-1", r"train.warmup_steps=-1"),
        ("train.stages.0.shift=0", r"train.stages\[0\].shift=0"),
        ("model.num_heads=0", r"model.num_heads=0.*>= 1"),
        ("posttrain.chunk_frames=0", r"posttrain.chunk_frames=0.*>= 1"),
        ("posttrain.batch_size=0", r"posttrain.batch_size=0"),
        ("posttrain.clip_frames=8", r"posttrain.clip_frames=8.*1 \+ 4k"),
        ("posttrain.denoise_steps=[]", r"posttrain.denoise_steps=\[\]"),
        ("posttrain.dmd_sigma_min=0.99", r"dmd_sigma_min/dmd_sigma_max"),
        ("data.codec.spatial_stride=0", r"data.codec.spatial_stride=0"),
        ("data.synth_episodes=0", r"data.synth_episodes=0"),
        ("run.log_every=0", r"run.log_every=0"),
        ("decoder.clip_frames=4", r"decoder.clip_frames=4"),
        (
            "posttrain.chunk_frames=3 posttrain.window_frames=2",
            r"posttrain.window_frames=2.*>= posttrain.chunk_frames=3",
        ),
        ("serving.chunk_frames=3 serving.window_frames=2", r"serving.window_frames=2 < serving.chunk_frames=3"),
    ],
)
def test_bad_values_are_config_errors_at_load(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, override.split())


@pytest.mark.parametrize(
    "args",
    [
        ["train", "model.num_heads=0"],
        ["train", "--nproc", "0"],
        ["train", "--nproc", "-2"],
        ["post-train", "causal", "--nproc", "0"],
        ["train", "train.micro_batch=0"],
    ],
)
def test_the_cli_turns_bad_values_into_exit_2(args, tmp_path, capsys):
    rc = main([*args, f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "config error" in err and "Traceback" not in err, err
    assert ("--nproc" in err) if "--nproc" in args else True
    assert not (tmp_path / "run").exists()


def test_disk_full_is_one_clear_line_from_the_cli(data_dir, tiny_fs, capsys):
    """T3 at the command line: the checkpointer's message, exit 1, no traceback; the run dir keeps
    what it had (config, metrics) and no partial checkpoint."""
    rc = main(["train", *BASE, f"data.path={data_dir}", f"run.dir={tiny_fs / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "no space left on" in err and "checkpoint needs ~" in err and "Traceback" not in err, err
    assert not [p for p in (tiny_fs / "run" / "checkpoints").iterdir() if p.name.endswith(".tmp")]
