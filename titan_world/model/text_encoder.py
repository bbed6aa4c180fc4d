"""Text encoders with one interface: list of prompts -> [B, text_len, text_dim] float, zero-padded.

`TinyTextEncoder` is deterministic and weight-free (hash of each word -> a fixed random vector),
so captions of the synthetic world map to stable embeddings and the demo needs no download.
`UMT5Encoder` loads umT5-XXL's encoder from a local path through transformers.
"""

from __future__ import annotations

import hashlib
import re

import torch


class TinyTextEncoder:
    def __init__(self, text_dim: int = 64, text_len: int = 32):
        self.text_dim, self.text_len = text_dim, text_len

    def tokenize(self, prompt: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", prompt.lower())[: self.text_len]

    def _word_vector(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha1(word.encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.text_dim, generator=g) / self.text_dim**0.5

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.text_len, self.text_dim)
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(self.tokenize(prompt)):
                out[i, j] = self._word_vector(word)
        return out


class UMT5Encoder:
    """umT5-XXL encoder (Wan's text encoder) from a local folder; nothing is downloaded."""

    def __init__(self, path: str, text_len: int = 512, device="cpu", dtype=torch.bfloat16):
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = UMT5EncoderModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True).to(device).eval()
        self.text_len, self.device = text_len, device
        self.text_dim = self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.text_len, return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        hidden = self.model(input_ids=tok.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        return (hidden * mask.unsqueeze(-1)).float()  # Wan zero-pads past each prompt's length


def build_text_encoder(kind: str = "tiny", text_dim: int = 64, text_len: int = 32, path: str | None = None, device="cpu"):
    if kind == "tiny":
        return TinyTextEncoder(text_dim, text_len)
    if kind == "umt5":
        if not path:
            raise ValueError("text_encoder.kind=umt5 needs text_encoder.path: a local umT5-XXL folder")
        return UMT5Encoder(path, text_len=text_len, device=device)
    raise ValueError(f"text_encoder.kind={kind!r}; expected 'tiny' or 'umt5'")
