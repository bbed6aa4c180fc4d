"""Tiny random stand-ins for every metric model, written to disk in the formats users supply.

For tests, CI and the CPU demo: they exercise the exact loading and call paths of the real
models, but their numbers mean nothing (reports made with them say so in the settings).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


class TinyFlow(nn.Module):
    """RAFT-shaped: (img1, img2) in 0..255 [B,3,H,W] -> (flow_low [B,2,H/8,W/8], flow_up [B,2,H,W])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up = self.conv(torch.cat([a, b], 1) / 255.0) * 4.0
        return up[:, :, ::8, ::8], up


class TinyInterp(nn.Module):
    """AMT-shaped: (img0, img1 in 0..1, embt [B,1,1,1]) -> {'imgt_pred': [B,3,H,W]}."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        mid = a * (1 - t) + b * t
        return {"imgt_pred": (mid + 0.05 * torch.tanh(self.conv(torch.cat([a, b], 1)))).clamp(0, 1)}


class TinyIQA(nn.Module):
    """MUSIQ-shaped: img 0..1 [B,3,H,W] -> score [B] on a 0..100 scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean(dim=(2, 3))
        return 100.0 * torch.sigmoid(self.fc(h)).squeeze(-1)


class TinyViCLIP(nn.Module):
    """ViCLIP-shaped: encode_vision([1,T,3,S,S], test=True) -> [1,D]; encode_text(str) -> [1,D]."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.vis = nn.Linear(3, dim)
        self.txt = nn.Embedding(256, dim)

    @torch.jit.export
    def encode_vision(self, x: torch.Tensor, test: bool = False) -> torch.Tensor:
        return self.vis(x.mean(dim=(1, 3, 4)))

    @torch.jit.export
    def encode_text(self, text: str) -> torch.Tensor:
        ids = torch.tensor([ord(c) % 256 for c in text] + [0], dtype=torch.long)
        return self.txt(ids).mean(0, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_vision(x, True)


def write_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Write every tiny model; returns EvalConfig field -> path (pass as dataclasses.replace)."""
    from transformers import CLIPConfig, CLIPModel  # noqa: PLC0415 (slow import: transformers)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    paths = {}
    for key, mod in (
        ("raft_path", TinyFlow()),
        ("amt_path", TinyInterp()),
        ("musiq_path", TinyIQA()),
        ("viclip_path", TinyViCLIP()),
    ):
        p = out / f"tiny_{key[:-5]}.ts"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(mod.eval()), str(p))
        paths[key] = str(p)
    cfg = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 99,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    CLIPModel(cfg).eval().save_pretrained(str(out / "tiny_clip"))
    head = nn.Linear(8, 1)
    torch.save(head.state_dict(), str(out / "tiny_aesthetic_head.pth"))
    paths["clip_path"] = str(out / "tiny_clip")
    paths["aesthetic_head_path"] = str(out / "tiny_aesthetic_head.pth")
    return paths
