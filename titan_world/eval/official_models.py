"""Factories for VBench's own metric networks, built from the official code in *your* environment.

    titan-world eval vbench ... --raft-path raft-things.pth --raft-factory titan_world.eval.official_models:raft
        --amt-path amt-s.pth --amt-factory titan_world.eval.official_models:amt
        --musiq-path musiq_spaq_ckpt-358bb6af.pth --musiq-factory titan_world.eval.official_models:musiq
        --viclip-path ViClip-InternVid-10M-FLT.pth --viclip-factory titan_world.eval.official_models:viclip

Each builds the network exactly as VBench 0.1.5 does (same class, same checkpoint handling, same
call) and returns it behind the interface of docs/eval.md. They need the `vbench` package (RAFT,
AMT-S; it imports torchvision, so a GPU environment) or `pyiqa` (MUSIQ) installed; titan-world
does not depend on either (imports are local for that reason). tests/test_vbench_parity.py runs
them against the official dimension functions.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn


class RaftFlow(nn.Module):
    """VBench's RAFT call: `model(img1, img2, iters=20, test_mode=True)[1]` (the upsampled flow)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a, b, iters=20, test_mode=True)[1]


class AmtInterp(nn.Module):
    """VBench's AMT-S call at scale 1: `model(img0, img1, embt, scale_factor=1.0, eval=True)['imgt_pred']`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(a, b, t, scale_factor=1.0, eval=True)["imgt_pred"]


def raft(path: str) -> nn.Module:
    """raft-things.pth (keys with DataParallel's 'module.' prefix) -> RAFT (not small), as VBench loads it."""
    from easydict import EasyDict  # noqa: PLC0415 (optional dependency: easydict)
    from vbench.third_party.RAFT.core.raft import RAFT  # noqa: PLC0415 (optional dependency: vbench)

    net = RAFT(EasyDict({"small": False, "mixed_precision": False, "alternate_corr": False}))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict({k.replace("module.", ""): v for k, v in sd.items()})
    return RaftFlow(net.eval())


def amt(path: str) -> nn.Module:
    """amt-s.pth ({'state_dict': ...}) -> AMT-S built from VBench's cfgs/AMT-S.yaml."""
    import vbench  # noqa: PLC0415 (optional dependency: vbench)
    from vbench.third_party.amt.utils.build_utils import build_from_cfg  # noqa: PLC0415 (optional dependency: vbench)

    cfg = Path(vbench.__file__).parent / "third_party" / "amt" / "cfgs" / "AMT-S.yaml"
    net = build_from_cfg(OmegaConf.load(cfg).network)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return AmtInterp(net.eval())


def musiq(path: str) -> nn.Module:
    """A pyiqa MUSIQ checkpoint (VBench: musiq_spaq_ckpt-358bb6af.pth) -> `MUSIQ(pretrained_model_path=path)`.

    Transformer width, depth and MLP size are read from the tensors (the release: 384, 14, 1152;
    heads = width / 64 as in the release), so smaller checkpoints of the same class load too."""
    from pyiqa.archs.musiq_arch import MUSIQ  # noqa: PLC0415 (optional dependency: pyiqa)

    sd = {k.removeprefix("module."): v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    hidden = sd["embedding.weight"].shape[0]
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer_encoder.transformer.encoderblock_")})
    mlp = sd["transformer_encoder.transformer.encoderblock_0.mlp.fc1.weight"].shape[0]
    net = MUSIQ(
        pretrained_model_path=path, hidden_size=hidden, mlp_dim=mlp, num_heads=max(1, hidden // 64), num_layers=layers
    )
    return net.eval()


def viclip(path: str) -> nn.Module:
    """ViClip-InternVid-10M-FLT.pth -> ViCLIP-L/14, as VBench's compute_overall_consistency builds it:
    `ViCLIP(tokenizer=SimpleTokenizer(bpe), pretrain=path)`. The BPE vocabulary
    (`bpe_simple_vocab_16e6.txt.gz`) is read beside the checkpoint, else from VBench's cache
    (`$VBENCH_CACHE_DIR` or ~/.cache/vbench, `ViCLIP/`); it is never downloaded here."""
    from vbench.third_party.ViCLIP.simple_tokenizer import SimpleTokenizer  # noqa: PLC0415 (optional dependency: vbench)
    from vbench.third_party.ViCLIP.viclip import ViCLIP  # noqa: PLC0415 (optional dependency: vbench)

    name = "bpe_simple_vocab_16e6.txt.gz"
    cache = Path(os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench") / "ViCLIP" / name
    bpe = next((p for p in (Path(path).with_name(name), cache) if p.is_file()), None)
    if bpe is None:
        raise FileNotFoundError(f"ViCLIP's BPE vocabulary {name}: put it beside {path} or at {cache}")
    return ViCLIP(tokenizer=SimpleTokenizer(str(bpe)), pretrain=path).eval()
