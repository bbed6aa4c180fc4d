"""Action finetuning: only the adapter changes; adapter-only + merged outputs; the action check runs."""

from __future__ import annotations

import json

import pytest
import torch

from titan_world.config import load_config
from titan_world.train.loop import train

BASE = [
    "data.height=32",
    "data.width=32",
    "data.synth_episodes=4",
    "data.synth_seconds=1.0",
    "run.wandb=disabled",
    "run.progress=false",
    "train.global_batch=2",
    "train.lr=1e-2",
    "train.warmup_steps=1",
    "train.ckpt_every=0",
    "model.num_layers=2",
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("action")
    data = str(root / "data")
    # an action-free base (a Wan checkpoint's situation; the tiny default pretrains with actions on)
    cfg = load_config(
        None,
        [
            *BASE,
            f"data.path=synthetic:{data}",
            f"run.dir={root / 'base'}",
            "train.steps=3",
            "model.action.enabled=false",
        ],
    )
    assert train(cfg) == 0
    return root, data


def test_action_finetune_trains_only_the_adapter(base_run):
    from titan_world.model import load_pretrained
    from titan_world.train.adapter import ADAPTER_FILE, build_action_model, load_adapter

    root, data = base_run
    run_dir = root / "act"
    cfg = load_config(
        "train/tiny_action.yaml",
        [
            *BASE,
            f"data.path=synthetic:{data}",
            f"run.dir={run_dir}",
            f"train.base_checkpoint={root / 'base'}",
            "train.stages.0.steps=3",
            "train.action_check_episodes=0",
            "train.train_modulation=false",
        ],
    )
    assert train(cfg) == 0
    base = load_pretrained(root / "base" / "model").state_dict()
    merged_model = load_pretrained(run_dir / "model")
    assert merged_model.cfg.action.enabled
    merged = merged_model.state_dict()
    adapter_keys = {k for k in merged if k.startswith("action_embedding.") or ".action_proj." in k}
    assert adapter_keys and set(merged) - adapter_keys == set(base)
    for k, v in base.items():  # frozen backbone: bit-identical
        assert torch.equal(merged[k], v), k
    assert any(
        merged[k].abs().sum() > 0 for k in adapter_keys if ".action_proj.proj.weight" in k
    )  # zero-init adapter moved

    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter" / ADAPTER_FILE), "pt") as fh:
        assert set(fh.keys()) == adapter_keys
    # base + adapter == merged
    rebuilt = build_action_model(cfg.model, str(root / "base"))
    load_adapter(rebuilt, run_dir / "adapter")
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, merged[k]), k
    assert json.loads((run_dir / "adapter" / "config.json").read_text())["titan_world"]["action"]["enabled"]


def test_train_modulation_also_trains_modulation(base_run):
    from titan_world.model import load_pretrained

    root, data = base_run
    run_dir = root / "act_mod"
    cfg = load_config(
        "train/tiny_action.yaml",
        [
            *BASE,
            f"data.path=synthetic:{data}",
            f"run.dir={run_dir}",
            f"train.base_checkpoint={root / 'base'}",
            "train.stages.0.steps=2",
            "train.train_modulation=true",
            "train.action_check_episodes=0",
        ],
    )
    assert train(cfg) == 0
    base = load_pretrained(root / "base" / "model").state_dict()
    merged = load_pretrained(run_dir / "model").state_dict()
    assert not torch.equal(merged["blocks.0.modulation"], base["blocks.0.modulation"])
    assert torch.equal(merged["blocks.0.ffn.0.weight"], base["blocks.0.ffn.0.weight"])


def test_action_check_reports_true_and_shuffled(base_run):
    from titan_world.train.action_check import action_following_check, format_check
    from titan_world.train.adapter import build_action_model

    root, _ = base_run
    cfg = load_config("train/tiny_action.yaml", [*BASE, "train.stages.0.frames=9", "train.action_check_frames=13"])
    model = build_action_model(cfg.model, str(root / "base"))  # (a run dir or a Wan folder works too)
    res = action_following_check(model, cfg, num_episodes=2, steps=2)
    assert res["episodes"] == 2 and res["frames"] == 13 and res["mse_true"] > 0 and res["mse_shuffled"] > 0
    assert res["reports"][0]["settings"]["num_frames"] == 13
    assert "denoise_mse_true" in res
    assert "shuffled" in format_check(res)
