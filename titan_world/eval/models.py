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
from pathlib import Path
from typing import Any, Callable

import torch


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
                    "state dict give a factory 'pkg.mod:fn' that builds the network") from e
            if isinstance(model, dict):
                raise ModelLoadError(
                    f"{p}: is a state dict; give a factory 'pkg.mod:fn' (path -> module) that "
                    "builds the architecture and loads it")
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
    """CLIP ViT-L/14 image embedding (transformers CLIPModel folder) -> LAION linear head.

    `clip_path`: a folder in transformers format (e.g. a local copy of
    openai/clip-vit-large-patch14). `head_path`: LAION's `sa_0_4_vit_l_14_linear.pth` (state
    dict of nn.Linear(768, 1)). Score per frame = head(l2-normalised image embedding).
    """

    def __init__(self, clip_path: str | Path, head_path: str | Path, device: str = "cpu"):
        from transformers import CLIPModel  # imported here: transformers is slow to import

        clip_path, head_path = Path(clip_path), Path(head_path)
        for p in (clip_path, head_path):
            if not p.exists():
                raise ModelLoadError(f"model path {p} does not exist")
        try:
            self.clip = CLIPModel.from_pretrained(str(clip_path), local_files_only=True).to(device).eval()
        except Exception as e:
            raise ModelLoadError(f"{clip_path}: not a transformers CLIPModel folder: {e}") from e
        try:
            sd = torch.load(str(head_path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{head_path}: cannot read the aesthetic head state dict: {e}") from e
        if not isinstance(sd, dict) or "weight" not in sd or "bias" not in sd:
            raise ModelLoadError(f"{head_path}: expected a state dict of nn.Linear(D, 1) "
                                 "(keys 'weight', 'bias')")
        dim = sd["weight"].shape[1]
        if dim != self.clip.config.projection_dim:
            raise ModelLoadError(f"{head_path}: head expects {dim}-d features but {clip_path} "
                                 f"projects to {self.clip.config.projection_dim}")
        self.head = torch.nn.Linear(dim, 1)
        self.head.load_state_dict(sd)
        self.head.to(device).eval()
        self.image_size = int(self.clip.config.vision_config.image_size)
        self.device = device

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: CLIP-normalised [B, 3, S, S] -> aesthetic score [B] (LAION scale, ~1..10)."""
        feats = self.clip.get_image_features(pixel_values=pixels.to(self.device)).float()
        feats = torch.nn.functional.normalize(feats, dim=-1)
        return self.head(feats).squeeze(-1)
