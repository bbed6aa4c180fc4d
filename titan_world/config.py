"""The one configuration object of a titan-world job.

Plain dataclasses (one per section, each living beside the code that uses it) composed into
`TitanConfig`, loaded from OmegaConf YAML with `key=value` overrides. Every error names the key,
the value and what was expected, and is raised before any work starts.
"""

from __future__ import annotations

import datetime as _dt
import itertools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from launch.config import LaunchConfig
from parallel.config import FLOAT8_RECIPES, ParallelConfig
from serving.config import ServingConfig
from titan_world.data.config import DataConfig
from titan_world.eval.config import EvalConfig
from titan_world.model.codec import check_frame_count, default_vae_stride
from titan_world.model.config import ModelConfig
from titan_world.posttrain.config import PostTrainConfig
from titan_world.train.config import DecoderDistillConfig, TrainConfig


class ConfigError(ValueError):
    """A config problem, worded for the user: which key, which value, what was expected."""


@dataclass
class RunConfig:
    dir: str | None = None  # None: runs/<timestamp>
    name: str = "titan-world"
    wandb: str = "offline"  # offline | online | disabled
    log_every: int = 1
    progress: bool = True


@dataclass
class TitanConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    posttrain: PostTrainConfig = field(default_factory=PostTrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decoder: DecoderDistillConfig = field(default_factory=DecoderDistillConfig)


CONFIG_ROOT = Path(str(resources.files("configs")))
DEFAULT_CONFIG = CONFIG_ROOT / "tiny.yaml"


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or a name under the packaged configs/ (with or without .yaml)."""
    p = Path(name)
    for cand in (p, CONFIG_ROOT / p, CONFIG_ROOT / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file {str(name)!r} not found (looked in the current directory and {CONFIG_ROOT})")


def _read_yaml(path: Path) -> DictConfig:
    """Read a YAML file, following its `defaults:` list (paths relative to the file, then configs/)."""
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    defaults = node.pop("defaults", [])
    merged = OmegaConf.create()
    for entry in defaults:
        if isinstance(entry, DictConfig) or isinstance(entry, dict):
            ((section, name),) = dict(entry).items()
            sub = _read_yaml(_find_relative(path, f"{section}/{name}"))
            merged = OmegaConf.merge(merged, OmegaConf.create({section: sub}))
        else:
            merged = OmegaConf.merge(merged, _read_yaml(_find_relative(path, str(entry))))
    return OmegaConf.merge(merged, node)


def _find_relative(base: Path, name: str) -> Path:
    for root in (base.parent, CONFIG_ROOT):
        for cand in (root / name, root / f"{name}.yaml"):
            if cand.is_file():
                return cand
    raise ConfigError(f"{base}: defaults entry {name!r} not found next to it or under {CONFIG_ROOT}")


def _explain(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError):
        return ConfigError(f"{source}: unknown key {key!r} (check the spelling; see configs/ for valid keys)")
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return ConfigError(f"{source}: key {key!r}: {msg}")
    return ConfigError(f"{source}: key {key!r}: {str(e).splitlines()[0]}")


def _parse_value(text: str):
    """An override's value as YAML (`10`, `true`, `null`, `[3, 5]`, `{a: 1}`); plain text stays text."""
    try:
        return yaml.safe_load(text) if text else text
    except yaml.YAMLError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TitanConfig:
    """Compose defaults <- YAML file <- `key=value` overrides, type-check and validate."""
    schema = OmegaConf.structured(TitanConfig)
    cfg_path = resolve_config_path(path) if path is not None else DEFAULT_CONFIG
    try:
        merged = OmegaConf.merge(schema, _read_yaml(cfg_path))
    except OmegaConfBaseException as e:
        raise _explain(e, str(cfg_path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=10")
        key, value = item.split("=", 1)
        try:
            OmegaConf.update(merged, key, _parse_value(value), merge=True)
            # a dotted key must name an existing field (update() would happily add new ones)
            if OmegaConf.select(merged, key, throw_on_missing=False) is None and value not in ("null", "None", ""):
                raise ConfigKeyError(f"unknown key {key}")
        except OmegaConfBaseException as e:
            if not getattr(e, "full_key", None):
                e.full_key = key  # type: ignore[attr-defined]
            raise _explain(e, f"override {item!r}") from None
    cfg: TitanConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    try:
        validate(cfg)
    except ConfigError:
        raise
    except (ArithmeticError, TypeError, ValueError) as e:  # a check that tripped over a value it did not expect
        raise ConfigError(
            f"{cfg_path}: invalid value ({type(e).__name__}: {e}); see configs/ for valid values"
        ) from None
    return cfg


MODEL_SIZES = ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "text_len", "freq_dim", "in_dim", "out_dim")


def validate(cfg: TitanConfig) -> None:
    """Range and cross-field checks that types alone cannot express: each section's own
    `validate()`, then the checks that span sections. Any error is a `ConfigError`."""
    m = cfg.model
    for key in MODEL_SIZES:  # before model.validate(), which divides by some of them
        if getattr(m, key, 1) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)}: expected >= 1")
    if cfg.run.log_every < 1:
        raise ConfigError(f"run.log_every={cfg.run.log_every}: expected >= 1 (log every N steps)")
    for section in (cfg.model, cfg.data, cfg.train, cfg.decoder, cfg.posttrain, cfg.serving):
        try:
            section.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    p = cfg.parallel
    for key in ("dp_replicate", "cp"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(p, key)}: expected an integer >= 1")
    if p.dp_shard == 0 or p.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard={p.dp_shard}: expected -1 (rest of the world) or >= 1")
    if p.activation_checkpoint not in ("none", "full", "selective", "attention"):
        raise ConfigError(
            f"parallel.activation_checkpoint={p.activation_checkpoint!r}: expected none, full, selective or attention"
        )
    if not 0 <= p.ac_skip_last <= cfg.model.num_layers:
        raise ConfigError(
            f"parallel.ac_skip_last={p.ac_skip_last}: expected 0 .. model.num_layers={cfg.model.num_layers} (blocks "
            "left un-checkpointed)"
        )
    for key, recipe in (("parallel.float8", p.float8), ("serving.float8", cfg.serving.float8)):
        if recipe not in FLOAT8_RECIPES:
            raise ConfigError(f"{key}={recipe!r}: expected one of {', '.join(FLOAT8_RECIPES)}")
    if p.cp_backend not in ("native", "deepspeed"):
        raise ConfigError(f"parallel.cp_backend={p.cp_backend!r}: expected native or deepspeed")
    for i, stage in enumerate(cfg.train.stages):
        cp = stage.cp or p.cp
        if cfg.model.num_heads % cp:
            raise ConfigError(
                f"train.stages[{i}].cp={cp} (or parallel.cp): model.num_heads={cfg.model.num_heads} must be "
                "divisible by the CP degree"
            )
        try:
            check_frame_count(stage.frames, f"train.stages[{i}].frames={stage.frames}:")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if stage.steps < 0:
            raise ConfigError(f"train.stages[{i}].steps={stage.steps}: expected >= 0")
    if cfg.train.action_check_frames:
        try:
            check_frame_count(
                cfg.train.action_check_frames, f"train.action_check_frames={cfg.train.action_check_frames}:"
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.model.num_heads % p.cp:
        raise ConfigError(f"parallel.cp={p.cp}: model.num_heads={cfg.model.num_heads} must be divisible by it")
    if cfg.train.expert not in ("all", "high", "low"):
        raise ConfigError(f"train.expert={cfg.train.expert!r}: expected all, high or low")
    if cfg.train.task not in ("pretrain", "action_finetune"):
        raise ConfigError(f"train.task={cfg.train.task!r}: expected pretrain or action_finetune")
    if cfg.train.schedule not in ("cosine", "constant"):
        raise ConfigError(f"train.schedule={cfg.train.schedule!r}: expected cosine or constant")
    pt = cfg.posttrain
    if not 1 <= pt.grad_chunks <= pt.rollout_chunks:
        raise ConfigError(
            f"posttrain.grad_chunks={pt.grad_chunks}: expected 1 .. posttrain.rollout_chunks={pt.rollout_chunks}"
        )
    if pt.teacher_dtype not in ("auto", "bfloat16", "float32"):
        raise ConfigError(f"posttrain.teacher_dtype={pt.teacher_dtype!r}: expected auto, bfloat16 or float32")
    if cfg.run.wandb not in ("offline", "online", "disabled"):
        raise ConfigError(f"run.wandb={cfg.run.wandb!r}: expected offline, online or disabled")
    if not 0.0 <= cfg.data.i2v_ratio <= 1.0:
        raise ConfigError(f"data.i2v_ratio={cfg.data.i2v_ratio}: expected a fraction in [0, 1]")
    if cfg.data.ingest_arrays not in ("stored", "upright"):
        raise ConfigError(f"data.ingest_arrays={cfg.data.ingest_arrays!r}: expected stored or upright")
    codec, text = cfg.data.codec, cfg.data.text_encoder
    if codec.kind not in ("tiny", "wan_vae"):
        raise ConfigError(f"data.codec.kind={codec.kind!r}: expected tiny or wan_vae")
    if text.kind not in ("auto", "tiny", "umt5"):
        raise ConfigError(f"data.text_encoder.kind={text.kind!r}: expected auto, tiny or umt5")
    s = default_vae_stride(cfg.model) if codec.kind == "wan_vae" else codec.spatial_stride
    if cfg.data.height % (s * 2) or cfg.data.width % (s * 2):
        raise ConfigError(
            f"data.height/width={cfg.data.height}x{cfg.data.width}: expected multiples of {2 * s} "
            f"(codec stride {s} x patch 2)"
        )


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def claim_new_run_dir(root: Path = Path("runs")) -> Path:
    """Create and return a run dir no other job has: root/<timestamp>, or root/<timestamp>-N when
    another job claimed that one first. `mkdir` without exist_ok is atomic, so two jobs started in
    the same second never share a dir (they would overwrite each other's checkpoints and metrics)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = _timestamp()
    for n in itertools.count(1):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def resolve_run_dir(cfg: TitanConfig) -> Path:
    """`run.dir`, created if missing; unset, a new dir claimed under runs/ (recorded in `run.dir`).
    Call once per job (rank 0), then hand `run.dir` to the other ranks."""
    if not cfg.run.dir:
        cfg.run.dir = str(claim_new_run_dir())
    path = Path(cfg.run.dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_config(cfg: TitanConfig, path: str | Path) -> None:
    OmegaConf.save(OmegaConf.structured(cfg), str(path))


def to_dict(cfg: TitanConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
