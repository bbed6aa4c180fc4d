"""Checkpoints in Wan's own format: a folder with config.json and (sharded) safetensors.

`load_pretrained` reads the official Wan2.2 folders as they are (`high_noise_model/`,
`low_noise_model/`, or a single expert folder), diffusers-format folders (renamed on the fly),
and what `save_pretrained` writes. Every mismatch is reported by key, file and shape.

`WeightFolder` reads a folder one tensor (or one region of a tensor) at a time; `weight_reader`
turns it, plus Wan's per-tensor initialisation, into the reader `parallel.materialize` fills a
meta-built, possibly FSDP-sharded model with: the one path by which training gets its weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from titan_world.model.config import ActionConfig, ModelConfig
from titan_world.model.diffusers_names import diffusers_config_to_native, diffusers_to_native
from titan_world.model.dit import WanDiT, keeps_fp32
from titan_world.model.moe import EXPERT_DIRS, WanMoE

PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline folder (titan_world.model.pipeline)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
_NATIVE_FIELDS = (
    "dim",
    "ffn_dim",
    "num_heads",
    "num_layers",
    "in_dim",
    "out_dim",
    "text_len",
    "freq_dim",
    "eps",
    "model_type",
)


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
    extra = dict(raw.get("titan_world", {}))
    if not extra:  # an official or diffusers download: its weights were trained on the reference inputs
        fields["conditioning"] = "reference"
        if is_diffusers:
            fields.setdefault("text_len", 512)  # the pipelines' umT5 length (Wan's own config.json stores it)
    action = ActionConfig(**extra.pop("action", {}))
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    fields.update({k: v for k, v in extra.items() if k in known})
    if "text_dim" not in fields:
        fields["text_dim"] = raw.get("text_dim", 4096)  # umT5-XXL; Wan's config.json does not store it
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


def check_shapes(
    expected: dict[str, tuple], found: dict[str, tuple], where: str, files: dict[str, str] | None = None
) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys (with the file holding
    each mis-shaped one when `files` is given)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    in_file = (lambda k: f" in {files[k]}") if files else (lambda k: "")
    misshaped = [
        f"{k}: checkpoint {tuple(found[k])}{in_file(k)} vs model {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match the model config — " + "; ".join(problems))


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, where)


# the fields that fix tensor shapes (action fields are checked through the adapter's shapes)
_SHAPE_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "patch_size")


def check_config_matches(cfg: ModelConfig, folder: Path) -> None:
    """CheckpointError naming the first field where `folder`/config.json disagrees with `model.*`."""
    saved, _ = read_config(folder)
    for key in _SHAPE_FIELDS:
        have, want = getattr(saved, key), getattr(cfg, key)
        if key == "patch_size":  # a list or a tuple, depending on where it came from
            have, want = list(have), list(want)
        if have != want:
            raise CheckpointError(f"{folder / 'config.json'}: {key}={have!r} but model.{key}={want!r}")


class WeightFolder:
    """One Wan (or diffusers) folder's tensors by native name, read one at a time and only the
    region asked for (safetensors `get_slice`): peak host memory is one region, not the model."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config, is_diffusers = read_config(self.folder)
        stored = _weight_files(self.folder)  # key in the file -> file
        for f in sorted(set(stored.values())):
            if not f.is_file():
                raise CheckpointError(f"{self.folder}: index names {f.name}, which is missing")
        native = diffusers_to_native({k: k for k in stored}) if is_diffusers else {k: k for k in stored}
        self.sources = {name: (stored[key], key) for name, key in native.items()}  # native -> (file, key)
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers (no tensor data is read)."""
        if self._shapes is None:
            self._shapes = {}
            for f in sorted({f for f, _ in self.sources.values()}):
                with safe_open(str(f), "pt") as fh:
                    for name, (g, key) in self.sources.items():
                        if g == f:
                            self._shapes[name] = tuple(fh.get_slice(key).get_shape())
        return self._shapes

    def check(self, expected: dict[str, tuple], ignore: Callable[[str], bool] = lambda name: False) -> None:
        """CheckpointError naming every missing / unexpected / mis-shaped key (and its file)."""
        found = {k: v for k, v in self.shapes().items() if not ignore(k)}
        files = {k: f.name for k, (f, _) in self.sources.items()}
        check_shapes({k: v for k, v in expected.items() if not ignore(k)}, found, str(self.folder), files)

    def read(self, name: str, region: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Tensor `name` (native name), or only `region` of it (one slice per dim)."""
        f, key = self.sources[name]
        with safe_open(str(f), "pt") as fh:
            return fh.get_tensor(key) if region is None else fh.get_slice(key)[region]


class LazyState(Mapping[str, torch.Tensor]):
    """A state dict whose tensors are read from a `WeightFolder` when accessed: `names` maps each
    key to the folder's native name. `save_state_dict` walks it one tensor at a time, so a
    conversion holds one output shard on the host, not the checkpoint."""

    def __init__(self, source: WeightFolder, names: dict[str, str]):
        self.source, self.names = source, names

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source.read(self.names[key])

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _tensor_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}/{name}".encode())


def weight_reader(
    net: WanDiT,
    source: WeightFolder | None,
    *,
    seed: int,
    prefix: str = "",
    fresh: Callable[[str], bool] = lambda name: False,
) -> Callable[[str, torch.Size, tuple[slice, ...]], torch.Tensor]:
    """The `read(name, shape, region)` with which `parallel.materialize` fills `net` (meta-built,
    sharded or not): tensors from `source`, and Wan's initialisation (`WanDiT.init_parameter`)
    for the names `fresh` selects (all of them without a source; such names in the checkpoint are
    ignored). Each initialised tensor gets its own generator, seeded by (seed, prefix + name), so
    any world size and sharding draws the same values; the full tensor is built on the CPU and only
    the region is kept. Checks `source` against `net` first (CheckpointError naming the keys)."""
    if source is not None:
        source.check({k: tuple(v.shape) for k, v in net.state_dict().items()}, ignore=fresh)

    def read(name: str, shape: torch.Size, region: tuple[slice, ...]) -> torch.Tensor:
        if source is not None and not fresh(name):
            return source.read(name, region)
        full = torch.empty(shape)
        net.init_parameter(name, full, torch.Generator().manual_seed(_tensor_seed(seed, prefix + name)))
        return full[region]

    return read


def _load_dense(folder: Path, dtype, device, cfg_override: ModelConfig | None = None) -> WanDiT:
    source = WeightFolder(folder)
    cfg = cfg_override if cfg_override is not None else source.config
    with torch.device("meta"):
        model = WanDiT(cfg)
    source.check({k: tuple(v.shape) for k, v in model.state_dict().items()})

    def placed(name: str) -> torch.Tensor:
        # one tensor at a time to its device and dtype (none: the file's): an fp32 14B expert
        # loaded in bf16 onto a GPU never holds its 57 GB on the host
        t = source.read(name)
        if dtype is None or not t.is_floating_point():
            return t.to(device=device)
        return t.to(device=device, dtype=torch.float32 if keeps_fp32(name) and dtype.itemsize < 4 else dtype)

    model.load_state_dict({name: placed(name) for name in source.sources}, assign=True)
    return model


def check_not_one_expert(folder: Path) -> None:
    """A `transformer/` (or `transformer_2/`) folder of a two-expert diffusers pipeline is half a
    model: refuse it rather than sample every step with one expert."""
    index = folder.parent / PIPELINE_INDEX
    if folder.name not in ("transformer", "transformer_2") or not index.is_file():
        return
    if (json.loads(index.read_text()).get("transformer_2") or [None])[0] is not None:
        raise CheckpointError(
            f"{folder} is one expert of the two-expert pipeline {folder.parent} (transformer/ = high-noise, "
            f"transformer_2/ = low-noise): pass the pipeline folder {folder.parent}"
        )


def checkpoint_networks(path: str | os.PathLike) -> tuple[list[Path], float | None]:
    """The folder of each network of a checkpoint: a MoE root (high_noise_model/ +
    low_noise_model/) -> [high, low], else [folder]; and the boundary of its moe.json if any.
    One expert of a two-expert diffusers pipeline is refused (`check_not_one_expert`)."""
    folder = resolve_checkpoint_dir(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    check_not_one_expert(folder)
    experts = [folder / EXPERT_DIRS["high"], folder / EXPERT_DIRS["low"]]
    if not all(p.is_dir() for p in experts):
        return [folder], None
    moe = folder / "moe.json"
    return experts, json.loads(moe.read_text())["boundary"] if moe.is_file() else None


def _assemble(nets: list[WanDiT], boundary: float | None) -> WanDiT | WanMoE:
    """One network, or the two experts routed at `boundary` (default: the high expert's config)."""
    if len(nets) == 1:
        return nets[0]
    return WanMoE(*nets, boundary if boundary is not None else nets[0].cfg.boundary)


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu", config: ModelConfig | None = None
):
    """Load a Wan checkpoint folder: a MoE root (high_noise_model/ + low_noise_model/) -> WanMoE,
    else one network -> WanDiT. `config` overrides the folder's config.json (e.g. to add actions)."""
    folders, boundary = checkpoint_networks(path)
    return _assemble([_load_dense(f, dtype, device, config) for f in folders], boundary)


def pretrained_on_meta(path: str | os.PathLike) -> tuple[WanDiT | WanMoE, list[Path]]:
    """The architecture of a checkpoint built on the meta device (no storage) and the folder of
    each of its networks, for `parallel.materialize`-style loading after sharding: no rank then
    ever holds a full copy (`titan_world.train.weights.fill_weights` fills it from the folders)."""
    folders, boundary = checkpoint_networks(path)
    with torch.device("meta"):
        nets = [WanDiT(WeightFolder(f).config) for f in folders]
    return _assemble(nets, boundary), folders


def write_atomically(dst: Path, write: Callable[[Path], None]) -> None:
    """`write(folder)` into an empty folder beside `dst`, then rename it to `dst` (replacing what is there):
    a crash or an error leaves `dst` as it was and no temp folder behind."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        out = scratch / dst.name
        out.mkdir()
        write(out)
        old = scratch / "replaced"
        if dst.exists() or dst.is_symlink():
            os.rename(dst, old)
        try:
            os.rename(out, dst)
        except OSError:
            if old.exists() or old.is_symlink():
                os.rename(old, dst)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def config_json(cfg: ModelConfig) -> dict:
    raw = {
        "_class_name": "WanModel",
        **{k: getattr(cfg, k) for k in _NATIVE_FIELDS},
        "patch_size": list(cfg.patch_size),
    }
    raw["titan_world"] = {
        "name": cfg.name,
        "text_dim": cfg.text_dim,
        "action": dataclasses.asdict(cfg.action),
        "boundary": cfg.boundary,
        "causal_chunk_frames": cfg.causal_chunk_frames,
        "conditioning": cfg.conditioning,
    }
    return raw


def save_state_dict(
    state: Mapping[str, torch.Tensor], folder: Path, config: dict, max_shard_bytes: int = 5 * 2**30
) -> None:
    """config.json + safetensors, sharded with an index past max_shard_bytes (Wan/diffusers layout).

    Each shard is written as soon as it is full, under a temporary name (the final names carry
    the shard count): with a `LazyState`, host memory peaks at one shard."""

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        parts: list[tuple[Path, list[str]]] = []
        current: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush() -> None:
            part = tmp / f".part-{len(parts):05d}.safetensors"
            save_file(current, str(part), metadata={"format": "pt"})  # transformers' loaders require it
            parts.append((part, list(current)))
            current.clear()

        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
                size = 0
            current[k] = v.detach().contiguous().cpu()
            size, total = size + nbytes, total + nbytes
        flush()
        if len(parts) == 1:
            parts[0][0].rename(tmp / WEIGHTS_NAME)
            return
        weight_map = {}
        for i, (part, keys) in enumerate(parts, 1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(parts):05d}.safetensors"
            part.rename(tmp / name)
            weight_map.update({k: name for k in keys})
        (tmp / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )

    write_atomically(folder, write)


def save_pretrained(model: WanDiT | WanMoE, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    folder = Path(path)
    if isinstance(model, WanMoE):
        for name, sub in EXPERT_DIRS.items():
            save_pretrained(model.expert(name), folder / sub, max_shard_bytes)
        (folder / "moe.json").write_text(json.dumps({"boundary": model.boundary}))
        return
    save_state_dict(model.state_dict(), folder, config_json(model.cfg), max_shard_bytes)
