"""Key renaming between Wan's native names (ours) and diffusers' `WanTransformer3DModel`."""

from __future__ import annotations

import re

# (native prefix, diffusers prefix); "{i}" is the block index. A prefix ending in "." is followed by
# weight/bias; one without is a whole parameter name.
_PAIRS: list[tuple[str, str]] = [
    ("patch_embedding.", "patch_embedding."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("blocks.{i}.self_attn.q.", "blocks.{i}.attn1.to_q."),
    ("blocks.{i}.self_attn.k.", "blocks.{i}.attn1.to_k."),
    ("blocks.{i}.self_attn.v.", "blocks.{i}.attn1.to_v."),
    ("blocks.{i}.self_attn.o.", "blocks.{i}.attn1.to_out.0."),
    ("blocks.{i}.self_attn.norm_q.", "blocks.{i}.attn1.norm_q."),
    ("blocks.{i}.self_attn.norm_k.", "blocks.{i}.attn1.norm_k."),
    ("blocks.{i}.cross_attn.q.", "blocks.{i}.attn2.to_q."),
    ("blocks.{i}.cross_attn.k.", "blocks.{i}.attn2.to_k."),
    ("blocks.{i}.cross_attn.v.", "blocks.{i}.attn2.to_v."),
    ("blocks.{i}.cross_attn.o.", "blocks.{i}.attn2.to_out.0."),
    ("blocks.{i}.cross_attn.norm_q.", "blocks.{i}.attn2.norm_q."),
    ("blocks.{i}.cross_attn.norm_k.", "blocks.{i}.attn2.norm_k."),
    ("blocks.{i}.norm3.", "blocks.{i}.norm2."),  # the affine cross-attention pre-norm
    ("blocks.{i}.ffn.0.", "blocks.{i}.ffn.net.0.proj."),
    ("blocks.{i}.ffn.2.", "blocks.{i}.ffn.net.2."),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
]


def _pattern(prefix: str) -> re.Pattern:
    body = re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile("^" + body + ("" if prefix.endswith(".") else "$"))


_TO_DIFFUSERS = [(_pattern(a), b) for a, b in _PAIRS]
_TO_NATIVE = [(_pattern(b), a) for a, b in _PAIRS]


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            prefix = target.replace("{i}", m.groupdict().get("i") or "")
            return prefix + key[m.end() :]
    return None


def native_to_diffusers(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        new = _rename(key, _TO_DIFFUSERS)
        if new is None:
            raise KeyError(f"{key!r} has no diffusers equivalent (action adapter keys are titan-world only)")
        out[new] = value
    return out


def diffusers_to_native(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        new = _rename(key, _TO_NATIVE)
        if new is None:
            raise KeyError(
                f"diffusers key {key!r} is not part of a Wan2.x transformer (image embedder / added kv are unsupported)"
            )
        out[new] = value
    return out


def diffusers_config_to_native(dc: dict) -> dict:
    """diffusers' config.json -> fields of ModelConfig."""
    dim = dc["num_attention_heads"] * dc["attention_head_dim"]
    in_dim, out_dim = dc["in_channels"], dc["out_channels"]
    model_type = "i2v" if in_dim == 2 * out_dim + 4 else ("ti2v" if out_dim == 48 else "t2v")
    return dict(
        dim=dim,
        ffn_dim=dc["ffn_dim"],
        num_heads=dc["num_attention_heads"],
        num_layers=dc["num_layers"],
        in_dim=in_dim,
        out_dim=out_dim,
        text_dim=dc.get("text_dim", 4096),
        freq_dim=dc.get("freq_dim", 256),
        patch_size=list(dc.get("patch_size", [1, 2, 2])),
        eps=dc.get("eps", 1e-6),
        model_type=model_type,
    )


def native_config_to_diffusers(cfg) -> dict:
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
    }
