"""The official `vbench` 0.1.5 code in this process, for the side-by-side parity tests.

The wheel is installed --no-deps (scripts/install.sh); what its per-dimension modules import
but the scoring path never runs is stood in here, registered in `sys.modules` only while the
official modules are imported and removed afterwards (the official functions keep references):

* `torchvision.transforms`: Compose, Resize, CenterCrop, Lambda, Normalize, ToTensor,
  ToPILImage, InterpolationMode — written from torchvision's documented tensor semantics
  (Resize: int = shorter side -> n, longer -> int(n * long / short); F.interpolate with
  align_corners=False, antialias off; a uint8 input is resized in float, clamped to 0..255 for
  bicubic and rounded back to uint8; CenterCrop: top = int(round((h - n) / 2)), zero-pads a
  smaller image). Only Resize/CenterCrop/Lambda/Normalize/Compose run in the scoring paths.
* `scipy.interpolate`, `scipy.special` (RAFT's training-time flow warm start, pyiqa's steerable
  pyramid), `imageio` (AMT's image files), `pkg_resources.packaging` (= `packaging`), and
  `timm.models.layers.DropPath` / `timm.models.registry.register_model` (ViCLIP; DropPath is the
  identity in eval mode, register_model a no-op decorator).
* `torchvision.io.write_video` (VBench-Long re-encodes its clips with it): torchvision's default
  path re-stated on PyAV (libx264, yuv420p, no options); `scenedetect`, `moviepy`, `scipy.stats`
  names (the semantic split and slow-fast fusion, off in custom mode).
* `pyiqa`, `pyiqa.archs`, `pyiqa.utils`, `pyiqa.data`, `vbench2_beta_long`: package shells whose
  `__init__` (importing every metric / the whole long pipeline) is not run, so
  `pyiqa.archs.musiq_arch` and `vbench2_beta_long.utils` load alone.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

STUB_ROOTS = ("torchvision", "scipy", "imageio", "pkg_resources", "timm", "scenedetect", "moviepy")
# package shells stay registered after the import (with what was loaded through them), so
# titan_world.eval.official_models:musiq finds pyiqa.archs.musiq_arch as a user's pyiqa provides it
SHELLS = ("pyiqa", "pyiqa.archs", "pyiqa.utils", "pyiqa.data", "vbench2_beta_long")


# ------------------------------------------------------------------ torchvision.transforms stand-in


class InterpolationMode:
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    NEAREST = "nearest"


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=None):
        self.size, self.mode, self.antialias = size, interpolation, antialias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert self.antialias is False, "the shim implements VBench's antialias=False only"
        h, w = x.shape[-2:]
        if isinstance(self.size, int):
            short, long = (w, h) if w <= h else (h, w)
            if short == self.size:
                return x
            new_short, new_long = self.size, int(self.size * long / short)
            out_hw = (new_long, new_short) if w <= h else (new_short, new_long)
        else:
            out_hw = tuple(self.size)
        dtype = x.dtype
        y = F.interpolate(x.float(), size=out_hw, mode=self.mode, align_corners=False)
        if dtype == torch.uint8:
            if self.mode == InterpolationMode.BICUBIC:
                y = y.clamp(0, 255)
            y = y.round().to(torch.uint8)
        return y


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = self.size
        h, w = x.shape[-2:]
        if h < n or w < n:
            ph, pw = max(n - h, 0), max(n - w, 0)
            x = F.pad(x, [pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2])
            h, w = x.shape[-2:]
        top, left = int(round((h - n) / 2.0)), int(round((w - n) / 2.0))
        return x[..., top : top + n, left : left + n]


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std


class ToTensor:
    def __call__(self, pic):
        return torch.from_numpy(np.array(pic)).permute(2, 0, 1).float().div(255)


class ToPILImage:
    def __call__(self, x):
        raise NotImplementedError("ToPILImage is not on a scoring path")


def write_video(filename, video_array, fps, video_codec="libx264", options=None, **unused):
    """torchvision.io.write_video's default path (VBench-Long re-encodes its clips with it): PyAV,
    libx264, yuv420p, the given options (none), picture type left to the encoder."""
    import av

    video_array = torch.as_tensor(video_array, dtype=torch.uint8).numpy()
    if isinstance(fps, float):
        fps = np.round(fps)
    with av.open(filename, mode="w") as container:
        stream = container.add_stream(video_codec, rate=fps)
        stream.width, stream.height = video_array.shape[2], video_array.shape[1]
        stream.pix_fmt = "yuv420p" if video_codec != "libx264rgb" else "rgb24"
        stream.options = options or {}
        for img in video_array:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pict_type = av.video.frame.PictureType.NONE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


class DropPath(torch.nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        assert not self.training or not self.drop_prob, "eval-only stand-in"
        return x


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def _package_shell(name: str) -> types.ModuleType:
    """A package whose __init__ is not run: its submodules import from its real folder."""
    root, *rest = name.split(".")
    folder = Path(importlib.util.find_spec(root).submodule_search_locations[0]).joinpath(*rest)
    m = types.ModuleType(name)
    m.__path__ = [str(folder)]
    return m


def _stubs() -> dict[str, types.ModuleType]:
    import packaging.version

    tr = _module(
        "torchvision.transforms",
        Compose=Compose,
        Resize=Resize,
        CenterCrop=CenterCrop,
        Lambda=Lambda,
        Normalize=Normalize,
        ToTensor=ToTensor,
        ToPILImage=ToPILImage,
        InterpolationMode=InterpolationMode,
    )
    stubs = {
        "torchvision": _module("torchvision", transforms=tr),
        "torchvision.transforms": tr,
        "torchvision.io": _module("torchvision.io", write_video=write_video),
        "scenedetect": _module("scenedetect", open_video=None, SceneManager=None, split_video_ffmpeg=None),
        "scenedetect.video_splitter": _module("scenedetect.video_splitter", split_video_ffmpeg=None),
        "scenedetect.detectors": _module("scenedetect.detectors", ContentDetector=None),
        "moviepy": _module("moviepy"),
        "moviepy.editor": _module("moviepy.editor", VideoFileClip=None),
        "scipy.stats": _module("scipy.stats", rankdata=None),
        "scipy": _module("scipy"),
        "scipy.interpolate": _module("scipy.interpolate"),
        "scipy.special": _module("scipy.special", factorial=None),
        "imageio": _module("imageio", imread=None, imwrite=None),
        "pkg_resources": _module("pkg_resources", packaging=packaging),
        "timm": _module("timm"),
        "timm.models": _module("timm.models"),
        "timm.models.layers": _module("timm.models.layers", DropPath=DropPath),
        "timm.models.registry": _module("timm.models.registry", register_model=lambda f: f),
    }
    for name in SHELLS:
        stubs[name] = _package_shell(name)
    return stubs


class Official:
    """Handles on the official modules (attribute access = the imported module)."""

    MODULES = {
        "tf": "vbench.temporal_flickering",
        "dd": "vbench.dynamic_degree",
        "ms": "vbench.motion_smoothness",
        "iq": "vbench.imaging_quality",
        "aq": "vbench.aesthetic_quality",
        "oc": "vbench.overall_consistency",
        "utils": "vbench.utils",
        "raft": "vbench.third_party.RAFT.core.raft",
        "clip_model": "clip.model",
        "viclip": "vbench.third_party.ViCLIP.viclip",
        "musiq": "pyiqa.archs.musiq_arch",
        "long_utils": "vbench2_beta_long.utils",
    }

    def __init__(self) -> None:
        if importlib.util.find_spec("vbench") is None or importlib.util.find_spec("decord") is None:
            msg = "the official vbench 0.1.5 wheel (+ decord, opencv) is not installed: scripts/install.sh"
            if os.environ.get("CI"):
                raise RuntimeError(msg)
            pytest.skip(msg)
        # VBench's ViCLIP tokenizer downloads its BPE vocabulary into the cache at import; the
        # openai-clip package ships the same file, so the cache is a temp folder holding it
        self.cache_dir = Path(tempfile.mkdtemp(prefix="vbench_cache_"))
        atexit.register(shutil.rmtree, self.cache_dir, True)
        (self.cache_dir / "ViCLIP").mkdir()
        bpe = Path(importlib.util.find_spec("clip").submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
        shutil.copy(bpe, self.cache_dir / "ViCLIP" / bpe.name)
        os.environ["VBENCH_CACHE_DIR"] = str(self.cache_dir)
        before = set(sys.modules)
        stubs = _stubs()
        sys.modules.update(stubs)
        try:
            for key, name in self.MODULES.items():
                setattr(self, key, importlib.import_module(name))
        finally:
            for name in list(sys.modules):
                if name.split(".")[0] in STUB_ROOTS and name not in before:
                    del sys.modules[name]
        self.package_dir = Path(self.utils.__file__).parent


# ------------------------------------------------------------------------------------ test videos


def make_video(path: Path, frames: np.ndarray, fps: float, kind: str = "yuv420p") -> Path:
    """Write `frames` (uint8 [T,H,W,3]) as H.264: 'yuv420p' (untagged), 'bt709' (yuv420p tagged
    BT.709 matrix/primaries/transfer, limited range) or 'rgb' (lossless libx264rgb)."""
    from fractions import Fraction

    import av

    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264rgb" if kind == "rgb" else "libx264", rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height = w, h
        s.pix_fmt = "rgb24" if kind == "rgb" else "yuv420p"
        s.options = {"qp": "0"} if kind == "rgb" else {"crf": "12"}
        if kind == "bt709":
            s.codec_context.colorspace = s.codec_context.color_primaries = s.codec_context.color_trc = 1
            s.options = {"crf": "12", "colorprim": "bt709", "transfer": "bt709", "colormatrix": "bt709"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def moving_frames(t: int, h: int, w: int, shift: int = 2, seed: int = 0) -> np.ndarray:
    """A smooth random texture panning right by `shift` px per frame (real motion for RAFT/AMT)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, (w + shift * t) // 4 + 2, 3)).astype(np.float32)
    big = torch.from_numpy(base).permute(2, 0, 1)[None]
    big = F.interpolate(big, scale_factor=4, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    return np.stack([big[:h, i * shift : i * shift + w] for i in range(t)]).clip(0, 255).astype(np.uint8)


_OFFICIAL: Official | None = None


def official() -> Official:
    """The official modules, imported once per process."""
    global _OFFICIAL
    if _OFFICIAL is None:
        _OFFICIAL = Official()
    return _OFFICIAL


# ------------------------------------------- seeded random official networks, saved as released

RAFT_ARGS = {"small": False, "mixed_precision": False, "alternate_corr": False}


def write_raft(path: Path, seed: int = 0) -> Path:
    """A random RAFT (full size, as VBench builds it) saved like raft-things.pth ('module.' keys)."""
    torch.manual_seed(seed)
    from easydict import EasyDict

    net = official().raft.RAFT(EasyDict(RAFT_ARGS))
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)
    return path


def write_amt(path: Path, seed: int = 0) -> Path:
    """A random AMT-S (VBench's cfgs/AMT-S.yaml) saved like amt-s.pth ({'state_dict': ...})."""
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    net = official().ms.build_from_cfg(OmegaConf.load(amt_config()).network)
    torch.save({"state_dict": net.state_dict()}, path)
    return path


def amt_config() -> str:
    return str(official().package_dir / "third_party" / "amt" / "cfgs" / "AMT-S.yaml")


# ViCLIP: the official class with its vision/text towers built by the official constructors at a
# tiny width (ViCLIP-L/14's 24+12 layers at 1024/768 would take minutes on 2 cores); patch 14,
# 224 px, 8 frames, 32-token context as the released model.
TINY_VICLIP = {"width": 64, "layers": 2, "heads": 2, "embed": 32}


def tiny_viclip_class():
    o = official()
    vision_mod = sys.modules["vbench.third_party.ViCLIP.viclip_vision"]
    text_mod = sys.modules["vbench.third_party.ViCLIP.viclip_text"]
    t = TINY_VICLIP

    class TinyOfficialViCLIP(o.viclip.ViCLIP):
        def build_vision_encoder(self):
            return vision_mod.VisionTransformer(
                input_resolution=self.inputs_image_res,
                patch_size=14,
                width=t["width"],
                layers=t["layers"],
                heads=t["heads"],
                output_dim=t["embed"],
                kernel_size=self.vision_encoder_kernel_size,
                num_frames=self.video_input_num_frames,
                drop_path=self.vision_encoder_drop_path_rate,
                checkpoint_num=self.vision_encoder_checkpoint_num,
            ).eval()

        def build_text_encoder(self):
            return text_mod.CLIP_TEXT(
                t["embed"], self.max_txt_l, self.text_encoder_vocab_size, t["width"], t["heads"], t["layers"], 0
            ).eval()

    return TinyOfficialViCLIP


def viclip_tokenizer():
    o = official()
    return sys.modules["vbench.third_party.ViCLIP.simple_tokenizer"].SimpleTokenizer(
        str(o.cache_dir / "ViCLIP" / "bpe_simple_vocab_16e6.txt.gz")
    )


def write_viclip(path: Path, seed: int = 0) -> Path:
    """A random tiny official ViCLIP saved like ViClip-InternVid-10M-FLT.pth ({'model': ...})."""
    torch.manual_seed(seed)
    net = tiny_viclip_class()(tokenizer=viclip_tokenizer(), pretrain=None)
    with torch.no_grad():  # the towers leave these torch.empty (the release fills them)
        net.vision_encoder.proj.normal_(std=TINY_VICLIP["width"] ** -0.5)
        net.text_encoder.positional_embedding.normal_(std=0.01)
        net.text_encoder.text_projection.normal_(std=TINY_VICLIP["width"] ** -0.5)
    torch.save({"model": net.state_dict()}, path)
    return path


def viclip_factory(path: str):
    """As VBench's compute_overall_consistency builds it: ViCLIP(tokenizer, pretrain=path)."""
    return tiny_viclip_class()(tokenizer=viclip_tokenizer(), pretrain=path)


# MUSIQ: pyiqa's class (VBench builds MUSIQ(pretrained_model_path=musiq_spaq_ckpt-358bb6af.pth), num_class 1)
# at a tiny transformer size; the ResNet root, multi-scale patching (224/384 + native) and head as released.
TINY_MUSIQ = {"hidden_size": 64, "mlp_dim": 128, "num_heads": 1, "num_layers": 1}  # heads = width / 64


def write_musiq(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = official().musiq.MUSIQ(pretrained=False, **TINY_MUSIQ)
    with torch.no_grad():  # scores around 50 +- tens on the 0..100 MOS scale, as the released head gives
        net.head.bias.fill_(50.0)
        net.head.weight.mul_(300.0)
    torch.save(net.state_dict(), path)  # the released file is a plain state dict too
    return path


# OpenAI CLIP (the `clip` package VBench imports) at a tiny width; 224 px, patch 14 and a 768-d
# projection as ViT-L/14, so LAION's Linear(768, 1) head fits.
TINY_CLIP = {
    "embed_dim": 768,
    "image_resolution": 224,
    "vision_layers": 2,
    "vision_width": 64,
    "vision_patch_size": 14,
    "context_length": 77,
    "vocab_size": 49408,
    "transformer_width": 64,
    "transformer_heads": 1,
    "transformer_layers": 1,
}


def write_openai_clip(path: Path, seed: int = 0) -> Path:
    """A random tiny OpenAI CLIP saved as the release is: a traced TorchScript archive with
    forward/encode_image/encode_text and an input_resolution tensor
    (clip.load cannot read a plain state dict on current torch: its fallback re-reads a consumed file)."""
    torch.manual_seed(seed)
    model = official().clip_model.CLIP(**TINY_CLIP).eval()
    with torch.no_grad():  # the release stores fp16 weights; clip.load's build_model rounds to fp16 even on CPU
        for p in model.parameters():
            p.copy_(p.half().float())
    model.register_buffer("input_resolution", torch.tensor(TINY_CLIP["image_resolution"]))
    img, txt = torch.randn(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"forward": (img, txt), "encode_image": img, "encode_text": txt})
        torch.jit.save(traced, str(path))
    return path


def write_aesthetic_head(folder: Path, seed: int = 0) -> Path:
    """A random LAION head saved as sa_0_4_vit_l_14_linear.pth (VBench's get_aesthetic_model reads it)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(768, 1)
    with torch.no_grad():  # scores ~ 5 +- 1 on LAION's 1..10 scale
        head.weight.mul_(40.0)
        head.bias.fill_(5.0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), folder / "sa_0_4_vit_l_14_linear.pth")
    return folder / "sa_0_4_vit_l_14_linear.pth"


def info_json(path: Path, videos, dimension: str) -> str:
    """VBench's full-info JSON for custom videos (prompt from the file name)."""
    import json

    path.write_text(
        json.dumps([{"prompt_en": Path(v).stem, "dimension": [dimension], "video_list": [str(v)]} for v in videos])
    )
    return str(path)
