"""Loading the metric models a user supplies (never downloaded) behind small call interfaces.

Every model dimension takes a local path. The file may be
  * a TorchScript archive (`torch.jit.save`), or a `torch.export` archive (`*.pt2`), or
  * a whole pickled `nn.Module` (`torch.save(module)`; loaded with weights_only=False, so only
    load files you trust), or
  * any file/folder plus a *factory* ``"package.module:function"`` (config `<name>_factory`):
    ``function(path) -> callable`` — the way to plug the original RAFT / AMT / MUSIQ / ViCLIP
    code with its released state dict.
The callables must follow the interfaces below (VBench's call conventions, documented in
docs/eval.md), so tiny random stand-ins can be used in tests.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from titan_world.eval.clip_convert import openai_clip_vision


class ModelLoadError(RuntimeError):
    """A metric model could not be loaded; the message names the path and the expected format."""


def resolve_factory(spec: str) -> Callable[[str], Any]:
    """'pkg.mod:fn' -> fn."""
    if ":" not in spec:
        raise ModelLoadError(f"factory {spec!r}: expected 'package.module:function'")
    mod_name, fn_name = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"factory {spec!r}: cannot import: {e}") from e


def load_callable(path: str | Path, factory: str | None = None, device: str = "cpu") -> Any:
    """Load a metric model from `path` (TorchScript, pickled module, or via `factory`)."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path {p} does not exist")
    if factory:
        model = resolve_factory(factory)(str(p))
    elif p.suffix == ".pt2":  # torch.export archive
        try:
            model = torch.export.load(str(p)).module()
        except Exception as e:
            raise ModelLoadError(f"{p}: cannot load the torch.export archive: {e}") from e
    else:
        try:
            with warnings.catch_warnings():  # torch >= 2.13 marks TorchScript deprecated; still the
                warnings.simplefilter("ignore", DeprecationWarning)  # most portable model format
                model = torch.jit.load(str(p), map_location=device)
        except Exception:  # not TorchScript: try a pickled module
            try:
                model = torch.load(str(p), map_location=device, weights_only=False)
            except Exception as e:
                raise ModelLoadError(
                    f"{p}: not a TorchScript archive nor a pickled nn.Module ({e}); for a raw "
                    "state dict give a factory 'pkg.mod:fn' that builds the network"
                ) from e
            if isinstance(model, dict):
                raise ModelLoadError(
                    f"{p}: is a state dict; give a factory 'pkg.mod:fn' (path -> module) that "
                    "builds the architecture and loads it"
                ) from None
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
    return model


def first_tensor(out: Any, key: str | None = None) -> torch.Tensor:
    """Pick the prediction out of a model's output: dict[key], last of a tuple/list, or a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        if key and key in out:
            return out[key]
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):  # RAFT test_mode returns (flow_low, flow_up)
        return first_tensor(out[-1], key)
    raise TypeError(f"model returned {type(out).__name__}, expected a tensor")


# ---------------------------------------------------------------- CLIP + LAION aesthetic head


class ClipAesthetic:
    """CLIP ViT-L/14 image embedding -> L2 norm -> LAION linear head (VBench's aesthetic quality).

    `clip_path`: OpenAI's `ViT-L-14.pt` (what VBench loads; TorchScript or state dict, converted
    by clip_convert.py) or a transformers folder (e.g. a local openai/clip-vit-large-patch14).
    `head_path`: LAION's `sa_0_4_vit_l_14_linear.pth` (state dict of nn.Linear(768, 1)).
    `dtype`: "float32" (CPU default) or "float16" — VBench runs CLIP in fp16 on a GPU: fp16
    weights, LayerNorm computed in fp32, as OpenAI's model does (scores agree to fp16 rounding).
    """

    def __init__(self, clip_path: str | Path, head_path: str | Path, device: str = "cpu", dtype: str = "float32"):
        from transformers import AutoConfig, CLIPVisionModelWithProjection  # noqa: PLC0415 (slow import: transformers)

        clip_path, head_path = Path(clip_path), Path(head_path)
        for p in (clip_path, head_path):
            if not p.exists():
                raise ModelLoadError(f"model path {p} does not exist")
        if dtype not in ("float32", "float16"):
            raise ModelLoadError(f"aesthetic_dtype={dtype!r}: expected float32 or float16")
        try:
            if clip_path.is_file():
                self.clip = openai_clip_vision(clip_path)
            else:  # a full CLIPModel folder: its image tower + projection (projection_dim lives in the top config)
                cfg = AutoConfig.from_pretrained(str(clip_path), local_files_only=True)
                vision_cfg = getattr(cfg, "vision_config", cfg)
                vision_cfg.projection_dim = cfg.projection_dim
                self.clip = CLIPVisionModelWithProjection.from_pretrained(
                    str(clip_path), config=vision_cfg, local_files_only=True
                )
        except Exception as e:
            raise ModelLoadError(
                f"{clip_path}: neither an OpenAI CLIP file (ViT-L-14.pt) nor a transformers CLIP folder: {e}"
            ) from e
        self.clip = self.clip.to(device).eval()
        if dtype == "float16":
            _half_keep_layernorm_fp32(self.clip)
        try:
            sd = torch.load(str(head_path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{head_path}: cannot read the aesthetic head state dict: {e}") from e
        if not isinstance(sd, dict) or "weight" not in sd or "bias" not in sd:
            raise ModelLoadError(f"{head_path}: expected a state dict of nn.Linear(D, 1) (keys 'weight', 'bias')")
        dim = sd["weight"].shape[1]
        if dim != self.clip.config.projection_dim:
            raise ModelLoadError(
                f"{head_path}: head expects {dim}-d features but {clip_path} "
                f"projects to {self.clip.config.projection_dim}"
            )
        self.head = torch.nn.Linear(dim, 1)
        self.head.load_state_dict(sd)
        self.head.to(device).eval()
        self.image_size = int(self.clip.config.image_size)
        self.device = device
        self.dtype = getattr(torch, dtype)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: CLIP-normalised [B, 3, S, S] -> aesthetic score [B] (LAION scale, ~1..10)."""
        feats = self.clip(pixel_values=pixels.to(self.device, self.dtype)).image_embeds.float()
        feats = torch.nn.functional.normalize(feats, dim=-1)
        return self.head(feats).squeeze(-1)


class _Fp32LayerNorm(torch.nn.LayerNorm):
    """LayerNorm computed in fp32 on fp16 activations (OpenAI CLIP's `LayerNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _half_keep_layernorm_fp32(model: torch.nn.Module) -> None:
    """fp16 weights everywhere but LayerNorm (OpenAI's `convert_weights` layout)."""
    model.half()
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.float()
            m.__class__ = _Fp32LayerNorm
