"""Checkpoints in Wan's own format: a folder with config.json and (sharded) safetensors.

`load_pretrained` reads the official Wan2.2 folders as they are (`high_noise_model/`,
`low_noise_model/`, or a single expert folder), diffusers-format folders (renamed on the fly),
and what `save_pretrained` writes. Every mismatch is reported by key, file and shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from titan_world.model.config import ActionConfig, ModelConfig
from titan_world.model.diffusers_names import diffusers_config_to_native, diffusers_to_native
from titan_world.model.dit import WanDiT
from titan_world.model.moe import EXPERT_DIRS, WanMoE

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
_NATIVE_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_len", "freq_dim", "eps", "model_type")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the folder, keys and shapes."""


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A Wan folder as given, or a run directory's exported `model/` folder."""
    p = Path(path)
    if (p / "model" / "config.json").is_file() or (p / "model" / EXPERT_DIRS["high"]).is_dir():
        return p / "model"
    return p


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> WanDiT | WanMoE:
    """A freshly initialised dense DiT, or the two-expert MoE when cfg.num_experts == 2."""
    def build():
        if cfg.num_experts == 2:
            return WanMoE(WanDiT(cfg), WanDiT(cfg), cfg.boundary)
        return WanDiT(cfg)

    if device is None:  # respects an enclosing `with torch.device("meta")`
        return build()
    with torch.device(device):
        return build()


def read_config(folder: Path) -> tuple[ModelConfig, bool]:
    """ModelConfig from a folder's config.json; the bool says whether it is diffusers-format."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Wan or diffusers transformer folder)")
    raw = json.loads(path.read_text())
    is_diffusers = raw.get("_class_name") == "WanTransformer3DModel"
    fields = diffusers_config_to_native(raw) if is_diffusers else {k: raw[k] for k in _NATIVE_FIELDS if k in raw}
    extra = raw.get("titan_world", {})
    action = ActionConfig(**extra.pop("action", {}))
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    fields.update({k: v for k, v in extra.items() if k in known})
    if "text_dim" not in fields:
        fields["text_dim"] = 4096  # umT5-XXL; Wan's config.json does not store it
    if "patch_size" in raw and not is_diffusers:
        fields["patch_size"] = list(raw["patch_size"])
    cfg = ModelConfig(**fields, action=action)
    cfg.name = raw.get("titan_world", {}).get("name", folder.name)
    cfg.validate()
    return cfg, is_diffusers


def _weight_files(folder: Path) -> dict[str, Path]:
    """key -> file holding it (from the index when sharded)."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / f for k, f in weight_map.items()}
    single = folder / WEIGHTS_NAME
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME})")
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def read_state_dict(folder: Path, device="cpu") -> dict[str, torch.Tensor]:
    files = _weight_files(folder)
    state = {}
    for f in sorted(set(files.values())):
        if not f.is_file():
            raise CheckpointError(f"{folder}: index names {f.name}, which is missing")
        with safe_open(str(f), "pt", device=str(device)) as fh:
            for k in fh.keys():
                state[k] = fh.get_tensor(k)
    return state


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}" for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match the model config — " + "; ".join(problems))


def _load_dense(folder: Path, dtype, device, cfg_override: ModelConfig | None = None) -> WanDiT:
    cfg, is_diffusers = read_config(folder)
    if cfg_override is not None:
        cfg = cfg_override
    state = read_state_dict(folder, device="cpu")
    if is_diffusers:
        state = diffusers_to_native(state)
    with torch.device("meta"):
        model = WanDiT(cfg)
    check_state_dict(model, state, str(folder))
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu", config: ModelConfig | None = None):
    """Load a Wan checkpoint folder: a MoE root (high_noise_model/ + low_noise_model/) -> WanMoE,
    else one network -> WanDiT. `config` overrides the folder's config.json (e.g. to add actions)."""
    folder = resolve_checkpoint_dir(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    experts = {name: folder / sub for name, sub in EXPERT_DIRS.items()}
    if all(p.is_dir() for p in experts.values()):
        high = _load_dense(experts["high"], dtype, device, config)
        low = _load_dense(experts["low"], dtype, device, config)
        boundary = json.loads((folder / "moe.json").read_text())["boundary"] if (folder / "moe.json").is_file() else high.cfg.boundary
        return WanMoE(high, low, boundary)
    return _load_dense(folder, dtype, device, config)


def _atomic_dir_write(folder: Path, write) -> None:
    """Write into a temp sibling then rename, so a crash never leaves a half-written checkpoint."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    write(tmp)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        import shutil

        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def config_json(cfg: ModelConfig) -> dict:
    raw = {"_class_name": "WanModel", **{k: getattr(cfg, k) for k in _NATIVE_FIELDS}, "patch_size": list(cfg.patch_size)}
    raw["titan_world"] = {"name": cfg.name, "text_dim": cfg.text_dim, "action": dataclasses.asdict(cfg.action), "boundary": cfg.boundary,
        "causal_chunk_frames": cfg.causal_chunk_frames,
    }
    return raw


def save_state_dict(state: dict[str, torch.Tensor], folder: Path, config: dict, max_shard_bytes: int = 5 * 2**30) -> None:
    """config.json + safetensors, sharded with an index past max_shard_bytes (Wan/diffusers layout)."""

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        shards, current, size = [], {}, 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[k] = v.detach().contiguous().cpu()
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME))
            return
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name))
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    _atomic_dir_write(folder, write)


def save_pretrained(model: WanDiT | WanMoE, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    folder = Path(path)
    if isinstance(model, WanMoE):
        for name, sub in EXPERT_DIRS.items():
            save_pretrained(model.expert(name), folder / sub, max_shard_bytes)
        (folder / "moe.json").write_text(json.dumps({"boundary": model.boundary}))
        return
    save_state_dict(model.state_dict(), folder, config_json(model.cfg), max_shard_bytes)
