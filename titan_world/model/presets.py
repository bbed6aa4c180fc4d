"""The official sampling defaults of each Wan model (docs/model.md lists them with their sources).

Values from the Wan-Video repositories: Wan2.2 `wan/configs/wan_i2v_A14B.py`, `wan_t2v_A14B.py`,
`wan_ti2v_5B.py`, `shared_config.py` and `generate.py` (`--size`, `--sample_solver unipc`); Wan2.1
`generate.py` and `wan/text2video.py` (50 steps for text-to-video, shift 5.0, guidance 5.0; 480*832
and 832*480 the only sizes its 1.3B model supports). Sizes are height x width; an I2V model keeps the image's aspect
ratio within the preset's area (as the official `image2video.py` does).
"""

from __future__ import annotations

from dataclasses import dataclass

# wan/configs/shared_config.py `sample_neg_prompt` (Wan2.1 and Wan2.2): used when no negative prompt is given
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class WanPreset:
    name: str
    model_type: str  # i2v | t2v | ti2v
    experts: int
    sampler: str
    steps: int
    shift: float
    guidance_high: float  # the high-noise expert's scale (the only one of a dense model)
    guidance_low: float
    boundary: float | None  # t >= boundary * 1000 -> high-noise expert
    frames: int
    height: int
    width: int
    fps: int
    source: str


PRESETS = {
    p.name: p
    for p in (
        WanPreset(
            "wan2.2-i2v-a14b",
            "i2v",
            2,
            "unipc",
            40,
            5.0,
            3.5,
            3.5,
            0.900,
            81,
            720,
            1280,
            16,
            "Wan2.2 wan/configs/wan_i2v_A14B.py",
        ),
        WanPreset(
            "wan2.2-t2v-a14b",
            "t2v",
            2,
            "unipc",
            40,
            12.0,
            4.0,
            3.0,
            0.875,
            81,
            720,
            1280,
            16,
            "Wan2.2 wan/configs/wan_t2v_A14B.py",
        ),
        WanPreset(
            "wan2.2-ti2v-5b",
            "ti2v",
            1,
            "unipc",
            50,
            5.0,
            5.0,
            5.0,
            None,
            121,
            704,
            1280,
            24,
            "Wan2.2 wan/configs/wan_ti2v_5B.py",
        ),
        WanPreset(
            "wan2.1-t2v",
            "t2v",
            1,
            "unipc",
            50,
            5.0,
            5.0,
            5.0,
            None,
            81,
            480,
            832,
            16,
            "Wan2.1 generate.py, wan/text2video.py",
        ),
    )
}


def preset_for(model_type: str, experts: int, expand_timesteps: bool = False) -> WanPreset:
    """The preset of a Wan model from what its files say: a TI2V model (48-channel VAE, diffusers'
    `expand_timesteps`), a two-expert I2V or T2V model, or a dense T2V one."""
    if expand_timesteps or model_type == "ti2v":
        return PRESETS["wan2.2-ti2v-5b"]
    if experts == 2:
        return PRESETS["wan2.2-i2v-a14b" if model_type == "i2v" else "wan2.2-t2v-a14b"]
    if model_type == "t2v":
        return PRESETS["wan2.1-t2v"]
    raise ValueError(
        "a single-expert I2V Wan model (Wan2.1 I2V) conditions on CLIP image features, "
        "which titan-world does not implement; use Wan2.2 I2V-A14B or TI2V-5B"
    )
