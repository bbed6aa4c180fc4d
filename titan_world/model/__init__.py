"""The Wan2.x-compatible DiT, its MoE wrapper, codecs, text encoders and checkpoint I/O."""

from titan_world.model.action import ActionInputs
from titan_world.model.attention import AttnMask
from titan_world.model.config import ActionConfig, ModelConfig
from titan_world.model.dit import WanDiT
from titan_world.model.io import CheckpointError, build_model, load_pretrained, save_pretrained
from titan_world.model.kv_cache import KVCache
from titan_world.model.moe import WanMoE, expert_for

__all__ = [
    "ActionConfig",
    "ActionInputs",
    "AttnMask",
    "CheckpointError",
    "KVCache",
    "ModelConfig",
    "WanDiT",
    "WanMoE",
    "build_model",
    "expert_for",
    "load_pretrained",
    "save_pretrained",
]
