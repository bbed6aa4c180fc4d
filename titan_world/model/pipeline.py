"""A whole Wan model as downloaded: the diffusers pipeline folder or the official repository's folder.

diffusers (`Wan-AI/Wan2.2-*-Diffusers`): `model_index.json` (`boundary_ratio`, `expand_timesteps`),
`transformer/` (the high-noise expert), `transformer_2/` (low-noise), `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/` (UniPC, `flow_shift`). Official (`Wan-AI/Wan2.2-*`): `high_noise_model/` +
`low_noise_model/` (or the DiT files at the top), `Wan2.1_VAE.pth` or `Wan2.2_VAE.pth`,
`models_t5_umt5-xxl-enc-bf16.pth` and `google/umt5-xxl/`. Everything generation needs is read from
the folder; what it does not say (the official folders carry no sampling settings) comes from the
model's preset (titan_world.model.presets). A missing piece is an error naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from titan_world.model.codec import WanVAECodec
from titan_world.model.io import (
    PIPELINE_INDEX,
    CheckpointError,
    _assemble,
    _load_dense,
    check_not_one_expert,
    checkpoint_networks,
    read_config,
)
from titan_world.model.official import T5_FILE, load_official_t5, official_folder_files
from titan_world.model.presets import WanPreset, preset_for
from titan_world.model.text_encoder import UMT5Encoder

log = logging.getLogger("titan_world.pipeline")
PIPELINE_TEXT_LEN = 512  # the pipelines' max_sequence_length: umT5 tokens, zero-padded
DIFFUSERS_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class WanBundle:
    """What `titan-world generate` runs a downloaded Wan model with."""

    model: torch.nn.Module  # WanDiT or WanMoE (conditioning = "reference")
    text_encoder: object  # .encode(prompts) -> [B, 512, text_dim]
    codec: object  # WanVAECodec
    preset: WanPreset
    boundary: float | None
    flow_shift: float  # the folder's scheduler shift (diffusers) or the preset's (official)
    schedule_start: str  # "diffusers" | "official": where the UniPC grid starts (titan_world.diffusion.unipc)
    source: str


def pipeline_root(path: str | Path) -> Path | None:
    """The diffusers pipeline folder `path` is, or None."""
    p = Path(path)
    return p if (p / PIPELINE_INDEX).is_file() else None


def is_official_folder(path: str | Path) -> bool:
    return (Path(path) / T5_FILE).is_file()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: missing ({what})")
    return path


def _scheduler_shift(root: Path) -> float:
    """flow_shift of the folder's UniPC scheduler; the settings our Flow-UniPC implements are checked."""
    path = _require(root / "scheduler" / "scheduler_config.json", "the scheduler config")
    raw = json.loads(path.read_text())
    if raw.get("_class_name") != "UniPCMultistepScheduler":
        raise CheckpointError(
            f"{path}: _class_name={raw.get('_class_name')!r}; titan-world samples Wan pipelines with "
            "UniPCMultistepScheduler (use_flow_sigmas) as the references do"
        )
    expected = {
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "solver_order": 2,
        "solver_type": "bh2",
        "predict_x0": True,
        "lower_order_final": True,
        "final_sigmas_type": "zero",
        "disable_corrector": [],
        "use_dynamic_shifting": False,
        "use_karras_sigmas": False,
        "thresholding": False,
    }
    wrong = {k: raw[k] for k, v in expected.items() if k in raw and raw[k] != v}
    if wrong or raw.get("shift_terminal") or "flow_shift" not in raw:
        raise CheckpointError(
            f"{path}: {wrong or 'no flow_shift / shift_terminal set'}; expected the Wan pipelines' "
            f"Flow-UniPC settings {expected} and a flow_shift"
        )
    return float(raw["flow_shift"])


def _load_diffusers_text_encoder(root: Path, device, dtype):
    from transformers import UMT5EncoderModel  # noqa: PLC0415 (slow import: transformers)

    te = _require(root / "text_encoder", "the umT5 text encoder")
    tok = _require(root / "tokenizer", "the umT5 tokenizer")
    model = UMT5EncoderModel.from_pretrained(str(te), torch_dtype=dtype, local_files_only=True).to(device).eval()
    return UMT5Encoder.from_model(model, tok, text_len=PIPELINE_TEXT_LEN, device=device)


def _reference_config(cfg, model_type: str, boundary: float | None, experts: int):
    return dataclasses.replace(
        cfg,
        model_type=model_type,
        conditioning="reference",
        text_len=PIPELINE_TEXT_LEN,
        num_experts=experts,
        boundary=boundary if boundary is not None else cfg.boundary,
    )


def load_diffusers_pipeline(root: Path, device="cpu", dtype: torch.dtype = torch.float32) -> WanBundle:
    """Both experts, boundary, expand_timesteps, scheduler shift, text encoder + tokenizer and VAE of
    a diffusers Wan pipeline folder. `dtype`: the DiT's and the text encoder's (the VAE stays fp32)."""
    index = json.loads((root / PIPELINE_INDEX).read_text())
    for name in DIFFUSERS_COMPONENTS:
        _require(root / name, f"the pipeline's {name}, listed in {PIPELINE_INDEX}")
    two = (index.get("transformer_2") or [None])[0] is not None
    folders = [root / "transformer"] + ([_require(root / "transformer_2", "the low-noise expert")] if two else [])
    cfg, _ = read_config(folders[0])
    expand = bool(index.get("expand_timesteps", False))
    model_type = "ti2v" if expand else cfg.model_type
    try:
        preset = preset_for(model_type, len(folders), expand)
    except ValueError as e:
        raise CheckpointError(f"{root}: {e}") from None
    boundary = index.get("boundary_ratio")
    if two and boundary is None:
        log.warning(
            "%s: two experts but no boundary_ratio in %s; using %s's %.3f",
            root,
            PIPELINE_INDEX,
            preset.name,
            preset.boundary,
        )
        boundary = preset.boundary
    cfg = _reference_config(cfg, model_type, boundary, len(folders))
    nets = [_load_dense(f, dtype, device, cfg) for f in folders]
    model = _assemble(nets, boundary).eval()
    vae = _require(root / "vae", "the VAE")
    codec = WanVAECodec(str(vae), device=device, dtype=torch.float32)  # fp32, as the references run it
    return WanBundle(
        model,
        _load_diffusers_text_encoder(root, device, dtype),
        codec,
        preset,
        boundary if two else None,
        _scheduler_shift(root),
        "diffusers",
        str(root),
    )


def load_official_folder(root: Path, device="cpu", dtype: torch.dtype = torch.float32) -> WanBundle:
    """The official repository's layout: DiT folder(s) + VAE .pth + umT5 .pth + tokenizer folder."""
    try:
        files = official_folder_files(root)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    folders, boundary = checkpoint_networks(root)
    cfg, _ = read_config(folders[0])
    model_type = "ti2v" if cfg.out_dim == 48 else cfg.model_type
    try:
        preset = preset_for(model_type, len(folders))
    except ValueError as e:
        raise CheckpointError(f"{root}: {e}") from None
    boundary = boundary if boundary is not None else preset.boundary  # the official config's, not in the folder
    cfg = _reference_config(cfg, model_type, boundary, len(folders))
    model = _assemble([_load_dense(f, dtype, device, cfg) for f in folders], boundary).eval()
    text = load_official_t5(files["t5"], files["tokenizer"], text_len=PIPELINE_TEXT_LEN, dtype=dtype, device=device)
    codec = WanVAECodec(str(files["vae"]), device=device, dtype=torch.float32)  # the official VAE runs in fp32
    return WanBundle(
        model, text, codec, preset, boundary if len(folders) == 2 else None, preset.shift, "official", str(root)
    )


def load_wan_bundle(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> WanBundle | None:
    """A downloaded Wan model (diffusers pipeline or official folder), or None for any other checkpoint."""
    p = Path(path)
    check_not_one_expert(p)
    if pipeline_root(p) is not None:
        return load_diffusers_pipeline(p, device, dtype)
    if is_official_folder(p):
        return load_official_folder(p, device, dtype)
    return None
