"""OpenAI CLIP checkpoints (the `ViT-L-14.pt` VBench's aesthetic quality loads) -> transformers.

VBench scores aesthetic quality with OpenAI's `clip` package; users may hold that file rather
than a transformers folder. This maps its image tower onto `CLIPVisionModelWithProjection`
(same maths: QuickGELU, pre/post LayerNorm, class-token projection), with the sizes read from
the tensors as OpenAI's `build_model` does. tests/test_vbench_parity.py checks it against the
official code.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch


def read_openai_clip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an OpenAI CLIP file: a TorchScript archive (as released) or a plain state dict."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return {k: v.float() for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    except RuntimeError:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or "visual.conv1.weight" not in sd:
        raise ValueError(
            f"{path}: not an OpenAI CLIP checkpoint (no 'visual.conv1.weight'); a ViT CLIP "
            "(ViT-L-14.pt) or a transformers CLIPModel folder is expected"
        )
    return {k: v.float() for k, v in sd.items()}


def openai_clip_vision(path: str | Path):
    """`CLIPVisionModelWithProjection` holding the image tower of OpenAI CLIP file `path` (fp32, eval)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: PLC0415 (slow import: transformers)

    sd = read_openai_clip_state(path)
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    cfg = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        image_size=patch * grid,
        patch_size=patch,
        projection_dim=sd["visual.proj"].shape[1],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPVisionModelWithProjection(cfg)
    missing, unexpected = model.load_state_dict(convert_openai_vision(sd), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{path}: OpenAI CLIP conversion left missing={missing[:5]} unexpected={unexpected[:5]}")
    return model.eval()


_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def convert_openai_vision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI `visual.*` keys -> transformers CLIPVisionModelWithProjection keys."""
    out = {
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
    }
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            out[f"vision_model.{ours}.{p}"] = sd[f"visual.{theirs}.{p}"]
    for k, v in sd.items():
        m = re.match(r"visual\.transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if not m:
            continue
        i, name, p = m.groups()
        out[f"vision_model.encoder.layers.{i}.{_LAYER[name]}.{p}"] = v
    for k in [k for k in sd if k.startswith("visual.transformer.") and k.endswith(("in_proj_weight", "in_proj_bias"))]:
        i = k.split(".")[3]
        p = "weight" if k.endswith("weight") else "bias"
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), sd[k].chunk(3, dim=0)):
            out[f"vision_model.encoder.layers.{i}.self_attn.{proj}.{p}"] = part.contiguous()
    return out
