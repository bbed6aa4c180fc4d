"""A training run's starting weights: where they come from and how they reach each rank's shards.

`train.base_checkpoint` gives them for both tasks: a Wan folder, a two-expert root
(`high_noise_model/` + `low_noise_model/`, e.g. Wan2.2-I2V-A14B) or a run dir's exported
`model/`. Without it (pretraining only) the model starts from Wan's random initialisation.

Either way the model is built on the meta device, wrapped (AC, compile, FSDP) and then
materialised: every rank allocates only its own shards and fills them one tensor at a time
(`parallel.materialize` + `titan_world.model.io.weight_reader`), reading only its rows of each
tensor from the safetensors files, or initialising one full tensor on the CPU and keeping its
rows. No rank ever holds the full model; peak extra host memory is the largest single tensor;
1 process and N ranks start from identical weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from parallel.meta_init import materialize
from titan_world.config import ConfigError
from titan_world.model import WanDiT, WanMoE
from titan_world.model.config import ModelConfig
from titan_world.model.io import (
    CheckpointError,
    WeightFolder,
    check_config_matches,
    resolve_checkpoint_dir,
    weight_reader,
)
from titan_world.model.moe import EXPERT_DIRS

# (tensor name, whether the checkpoint has it) -> start it from Wan's initialisation instead
FreshRule = Callable[[str, bool], bool]


def networks(model: nn.Module) -> list[tuple[str, WanDiT]]:
    """The dense networks of `model` with their name prefixes: [("", dit)] or the two MoE experts."""
    return [("high.", model.high), ("low.", model.low)] if isinstance(model, WanMoE) else [("", model)]


def train_model_config(cfg) -> ModelConfig:
    """`model.*` as the run trains it: one dense expert per job with `train.expert=high|low` on a
    two-expert config; actions enabled for action finetuning."""
    model_cfg = copy.deepcopy(cfg.model)
    if model_cfg.num_experts == 2 and cfg.train.expert != "all":
        model_cfg.num_experts = 1  # one expert per job: a dense network trained on its sigma range
    if cfg.train.task == "action_finetune":
        model_cfg.action.enabled = True
    return model_cfg


def base_folders(base_checkpoint: str, model_cfg: ModelConfig, expert: str = "all") -> list[Path]:
    """The Wan folder of each network of a `model_cfg` model (one; or high, low for an MoE), with
    their config.json checked against `model.*`. ConfigError naming the key and the file."""
    key = f"train.base_checkpoint={base_checkpoint!r}"
    root = resolve_checkpoint_dir(base_checkpoint)
    if not root.is_dir():
        raise ConfigError(f"{key}: no such folder (a Wan folder, a two-expert root or a run dir with model/)")
    experts = {name: root / sub for name, sub in EXPERT_DIRS.items()}
    two_expert = all(p.is_dir() for p in experts.values())
    if model_cfg.num_experts == 2:
        if not two_expert:
            raise ConfigError(
                f"{key}: model.num_experts=2 with train.expert=all needs a two-expert folder "
                f"({EXPERT_DIRS['high']}/ + {EXPERT_DIRS['low']}/); {root} is one network"
            )
        folders = [experts["high"], experts["low"]]
    elif two_expert:
        if expert not in experts:
            raise ConfigError(
                f"{key}: {root} holds two experts; train one per job with train.expert=high|low, "
                "or both with model.num_experts=2"
            )
        folders = [experts[expert]]
    else:
        folders = [root]
    for folder in folders:
        try:
            check_config_matches(model_cfg, folder)
        except CheckpointError as e:
            raise ConfigError(f"{key}: {e}") from None
    return folders


def fill_weights(
    model: nn.Module,
    folders: list[Path] | None,
    *,
    device: torch.device | str,
    seed: int,
    fresh: FreshRule = lambda name, in_checkpoint: False,
) -> list[str]:
    """Materialise every network of a meta-built (possibly FSDP-sharded) `model` on `device` and
    fill its local shards: from `folders` (one per network, see `base_folders`), or Wan's random
    initialisation seeded by `seed` without them; `fresh` picks tensors that start from the
    initialisation even with a checkpoint. Keys and shapes are checked before anything is
    allocated (CheckpointError naming the key and the file). Returns the fresh tensor names."""
    fresh_names = []
    for i, (prefix, net) in enumerate(networks(model)):
        source = WeightFolder(folders[i]) if folders else None

        def rule(name: str, source: WeightFolder | None = source) -> bool:
            return source is not None and fresh(name, name in source)

        fresh_names += [prefix + n for n in net.state_dict() if rule(n)]
        materialize(net, device, weight_reader(net, source, seed=seed, prefix=prefix, fresh=rule))
    return fresh_names
