"""Config validation errors name the key; the CLI has help for every subcommand."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch.cli import COMMANDS, main
from titan_world.config import ConfigError, load_config


def test_default_config_loads():
    cfg = load_config()
    assert cfg.model.name == "tiny"
    assert [s.frames for s in cfg.train.stages] == [17, 33]


def test_overrides_apply_with_types():
    cfg = load_config(
        None,
        [
            "train.steps=7",
            "train.seed=3",
            "parallel.cp=2",
            "run.dir=/tmp/x",
            "train.lr=1e-3",
            "train.profile_steps=[3, 5]",
            "train.base_checkpoint=null",
            "model.action.enabled=true",
        ],
    )
    assert (cfg.train.steps, cfg.train.seed, cfg.parallel.cp, cfg.run.dir) == (7, 3, 2, "/tmp/x")
    assert cfg.train.lr == 1e-3 and cfg.train.profile_steps == [3, 5] and cfg.train.base_checkpoint is None
    assert cfg.model.action.enabled is True


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=abc", "train.steps"),
        ("parallel.cp=3", "model.num_heads=4"),
        ("model.num_heads=5", "model.num_heads"),
        ("train.expert=medium", "train.expert"),
        ("data.height=30", "data.height"),
        ("nonsense", "key=value"),
        ("posttrain.grad_chunks=9", "posttrain.grad_chunks=9"),
        ("data.codec.kind=bogus", "data.codec.kind='bogus': expected tiny or wan_vae"),
        ("data.text_encoder.kind=t5", "data.text_encoder.kind='t5'"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert fragment in str(info.value), str(info.value)


def test_bad_clip_length_names_the_stage(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  - model: tiny\ntrain:\n  stages:\n    - {name: a, frames: 16, steps: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "train.stages[0].frames=16" in str(info.value) and "1 + 4k" in str(info.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr_typo: 1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "lr_typo" in str(info.value) and str(bad) in str(info.value)


def test_missing_config_file_is_clear():
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")


def test_top_level_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_subcommand_help(name):
    proc = subprocess.run([sys.executable, "-m", "launch.cli", name, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"titan-world {name}" in proc.stdout
