"""Action finetuning (LingBot §3.3): base weights + the action adapter, backbone frozen.

An action-free base gets a fresh adapter whose AdaLN projections start at zero, so step 0 of
finetuning reproduces the base model exactly; a base with an adapter continues from it. Only
`action_parameters()` (and, with `train.train_modulation`, every `*modulation` tensor) receive
gradients. Outputs: RUN_DIR/adapter/ (adapter tensors alone,
safetensors + config.json) and RUN_DIR/model/ (the merged Wan-format folder).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from titan_world.model import WanMoE, build_model
from titan_world.model.io import CheckpointError, config_json
from titan_world.train.weights import base_folders, fill_weights

ADAPTER_FILE = "adapter.safetensors"


def is_adapter_name(name: str) -> bool:
    """Whether `name` (a dense network's parameter name) belongs to the action adapter."""
    return name.startswith("action_embedding.") or ".action_proj." in name


def adapter_starts_fresh(name: str, in_checkpoint: bool) -> bool:
    """Whether a tensor starts from Wan's (zero) initialisation rather than the base checkpoint: the
    adapter tensors the base lacks (actions added to an action-free Wan model). A base that has an
    adapter (the tiny default is pretrained with actions) is continued, not thrown away: restarting
    it from zero under a frozen backbone loses what pretraining learned about the actions."""
    return is_adapter_name(name) and not in_checkpoint


def build_action_model(model_cfg, base_checkpoint: str, device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
    """The model of `model_cfg` with actions enabled, on `device`: backbone weights from
    `base_checkpoint`, the base's adapter or a fresh zero-initialised one. The same path as the trainer's (meta build,
    one tensor at a time), unsharded."""
    cfg = copy.deepcopy(model_cfg)
    cfg.action.enabled = True
    folders = base_folders(base_checkpoint, cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    fill_weights(model, folders, device=device, seed=seed, fresh=adapter_starts_fresh)
    return model


def adapter_names(model: nn.Module, train_modulation: bool) -> list[str]:
    """Names of the parameters action finetuning trains."""
    names = []
    for name, _ in model.named_parameters():
        leaf = name.split(".", 1)[1] if isinstance(model, WanMoE) else name
        if is_adapter_name(leaf):
            names.append(name)
        elif train_modulation and name.endswith("modulation"):
            names.append(name)
    return names


def freeze_backbone(model: nn.Module, train_modulation: bool) -> list[str]:
    """requires_grad only on the adapter (+ modulation); returns the trainable names."""
    keep = set(adapter_names(model, train_modulation))
    if not keep:
        raise ValueError("action finetuning: the model has no action adapter (model.action.enabled must be true)")
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return sorted(keep)


def save_adapter(state: dict[str, torch.Tensor], names: list[str], folder: Path, model_cfg) -> Path:
    """Adapter tensors alone (+ the model config they belong to) into `folder`/adapter.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: state[n].detach().contiguous().cpu() for n in names}
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt", "kind": "titan-world-action-adapter"})
    (folder / "config.json").write_text(json.dumps(config_json(model_cfg), indent=2))
    return folder / ADAPTER_FILE


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Put a saved adapter into a model built with actions enabled; returns the loaded names."""
    tensors = load_file(str(Path(folder) / ADAPTER_FILE))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise CheckpointError(f"{folder}: adapter keys not in the model: {unexpected[:5]}")
    return sorted(tensors)
