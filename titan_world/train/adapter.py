"""Action finetuning (LingBot §3.3): base weights + a fresh action adapter, backbone frozen.

The adapter's AdaLN projections start at zero, so step 0 of finetuning reproduces the base
model exactly; only `action_parameters()` (and, with `train.train_modulation`, every
`*modulation` tensor) receive gradients. Outputs: RUN_DIR/adapter/ (adapter tensors alone,
safetensors + config.json) and RUN_DIR/model/ (the merged Wan-format folder).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from titan_world.model import WanDiT, WanMoE, build_model, load_pretrained
from titan_world.model.io import CheckpointError, config_json

ADAPTER_FILE = "adapter.safetensors"


def base_checkpoint_path(path: str) -> Path:
    """A Wan folder as given, or a training run dir's exported `model/`."""
    p = Path(path)
    if (p / "model").is_dir() and not (p / "config.json").is_file():
        return p / "model"
    return p


def _experts(model: nn.Module) -> list[tuple[str, WanDiT]]:
    return [("high.", model.high), ("low.", model.low)] if isinstance(model, WanMoE) else [("", model)]


def build_action_model(model_cfg, base_checkpoint: str) -> nn.Module:
    """The model of `model_cfg` with actions enabled, backbone weights from `base_checkpoint`."""
    path = base_checkpoint_path(base_checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"train.base_checkpoint={base_checkpoint!r}: no such folder (a Wan folder or a run dir with model/)")
    base = load_pretrained(path)
    cfg = copy.deepcopy(model_cfg)
    cfg.action.enabled = True
    base_cfg = _experts(base)[0][1].cfg
    for key in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "text_len"):
        if getattr(base_cfg, key) != getattr(cfg, key):
            raise CheckpointError(f"train.base_checkpoint={str(path)!r}: {key}={getattr(base_cfg, key)} but model.{key}={getattr(cfg, key)}")
    model = build_model(cfg)
    for (_, dst), (_, src) in zip(_experts(model), _experts(base)):
        state = {k: v for k, v in src.state_dict().items() if ".action_proj." not in k and not k.startswith("action_embedding.")}
        missing, unexpected = dst.load_state_dict(state, strict=False)
        extra = [k for k in missing if not (k.startswith("action_embedding.") or ".action_proj." in k)]
        if extra or unexpected:
            raise CheckpointError(f"{path}: backbone keys do not match: missing {extra[:5]}, unexpected {unexpected[:5]}")
    return model


def adapter_names(model: nn.Module, train_modulation: bool) -> list[str]:
    """Names of the parameters action finetuning trains."""
    names = []
    for name, _ in model.named_parameters():
        leaf = name.split(".", 1)[1] if isinstance(model, WanMoE) else name
        if leaf.startswith("action_embedding.") or ".action_proj." in leaf:
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
