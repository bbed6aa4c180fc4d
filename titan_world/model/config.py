"""Model configuration: the Wan2.x DiT hyper-parameters plus our additions (actions, backend)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ActionConfig:
    """LingBot-style action adapter (model/action.py). Disabled: the model is the plain Wan DiT."""

    enabled: bool = False
    num_keys: int = 8  # keyboard multi-hot width (W, A, S, D, ... see titan_world.data.actions)
    hidden_dim: int = 0  # 0: use the model dim
    use_camera: bool = True  # Plücker rays from poses + intrinsics
    spatial_stride: int = 8  # codec spatial stride (Wan VAE 8): Plücker rays are computed at latent_hw * stride pixels
    translation_scale: float = 1.0  # world units per normalised translation unit
    # Which frame the camera poses are given in: "relative" to the clip's (a stream's: the session's)
    # first frame, as LingBot-World does for videos of many places; "world": the data's own frame, for
    # data of one place (a game level, the demo level), where a pose then says where the camera is and
    # the model can learn the place itself, not only the motion (docs/model.md)
    pose_frame: str = "relative"
    # > 0: also sin/cos of each token's mean Plücker ray at this many octaves; with world-frame poses the
    # picture is a detailed function of the ray, which a small adapter fits far better from these
    ray_frequencies: int = 0
    # I2V channels of generated frames: the last given frame re-projected to their camera (rotation
    # homography, model/action.py warp_condition) instead of zeros; the tiny default turns it on
    warp_cond: bool = False


@dataclass
class ModelConfig:
    name: str = "tiny"
    model_type: str = "i2v"  # t2v | i2v | ti2v; i2v concatenates mask + conditioning latents
    dim: int = 128
    ffn_dim: int = 384
    num_heads: int = 4
    num_layers: int = 4
    in_dim: int = 36  # noisy latent + (i2v) 4 mask channels + conditioning latent
    out_dim: int = 16
    text_dim: int = 64
    text_len: int = 32
    freq_dim: int = 256
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_backend: str = "sdpa"  # sdpa | flex | flash | xformers (see titan_world.model.attention)
    # MoE: the expert used for t >= boundary * 1000 is the high-noise one.
    num_experts: int = 1
    boundary: float = 0.900
    # (The official sampling defaults of each Wan model — shift, steps, guidance pair — live in one
    # place, titan_world/model/presets.py, which generation reads.)
    action: ActionConfig = field(default_factory=ActionConfig)
    # > 0 for a block-causal student (post-training): latent frames per chunk; 0: bidirectional
    causal_chunk_frames: int = 0
    # How the first frame conditions the model (titan_world.conditioning, docs/model.md): "reference" = the
    # official pipelines' inputs for model_type; "clean_first_frame" = given latent frames clean at t = 0 (+ mask
    # channels), what the tiny default and the causal student are trained with. Official folders load as "reference".
    conditioning: str = "clean_first_frame"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def cond_channels(self) -> int:
        """Channels concatenated to the noisy latents (mask + conditioning latent), 0 for t2v."""
        return self.in_dim - self.out_dim

    def validate(self) -> None:
        def bad(key: str, value, expected: str):
            raise ValueError(f"model.{key}={value!r}: expected {expected}")

        if self.dim % self.num_heads:
            bad("num_heads", self.num_heads, f"a divisor of model.dim={self.dim}")
        if self.head_dim % 2 or self.head_dim < 6:
            bad("num_heads", self.num_heads, "a head_dim (dim/num_heads) that is even and >= 6 for 3-D RoPE")
        if self.model_type not in ("t2v", "i2v", "ti2v"):
            bad("model_type", self.model_type, "one of t2v, i2v, ti2v")
        if self.model_type == "i2v" and self.in_dim != 2 * self.out_dim + 4:
            bad("in_dim", self.in_dim, f"2*out_dim+4 = {2 * self.out_dim + 4} for i2v (noise + mask + conditioning)")
        if self.model_type != "i2v" and self.in_dim != self.out_dim:
            bad("in_dim", self.in_dim, f"out_dim={self.out_dim} for {self.model_type}")
        if len(self.patch_size) != 3:
            bad("patch_size", self.patch_size, "three ints [t, h, w]")
        if self.attn_backend not in ("sdpa", "flex", "flash", "xformers"):
            bad("attn_backend", self.attn_backend, "one of sdpa, flex, flash, xformers")
        if self.num_experts not in (1, 2):
            bad("num_experts", self.num_experts, "1 (dense) or 2 (high/low-noise MoE)")
        if not 0.0 < self.boundary < 1.0:
            bad("boundary", self.boundary, "a fraction in (0, 1), e.g. 0.900")
        if self.conditioning not in ("reference", "clean_first_frame"):
            bad("conditioning", self.conditioning, "reference or clean_first_frame")
        if self.action.pose_frame not in ("relative", "world"):
            bad("action.pose_frame", self.action.pose_frame, "relative or world")
        if not 0 <= self.action.ray_frequencies <= 16:
            bad("action.ray_frequencies", self.action.ray_frequencies, "0 (off) .. 16 octaves")
