"""Text encoders with one interface: list of prompts -> [B, text_len, text_dim] float, zero-padded.

`TinyTextEncoder` is deterministic and weight-free (hash of each word -> a fixed random vector),
so captions of the synthetic world map to stable embeddings and the demo needs no download.
`UMT5Encoder` runs umT5-XXL's encoder through transformers, from a Hugging Face folder or from
the official Wan download (`models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`, see
titan_world.model.official).

A real model (text_dim 4096: umT5-XXL's width) never falls back to the hash encoder: kind `auto`
(the default) picks umT5 for it and asks for its files; `tiny` must be asked for by name.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from titan_world.model import official

UMT5_XXL_DIM = 4096


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
        from transformers import UMT5EncoderModel  # noqa: PLC0415 (slow import: transformers)

        model = UMT5EncoderModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True).to(device).eval()
        self._setup(model, path, text_len, device)

    @classmethod
    def from_model(cls, model, tokenizer_dir: str | Path, text_len: int = 512, device="cpu") -> UMT5Encoder:
        """Wrap a loaded `UMT5EncoderModel` (e.g. from the official .pth) with a local tokenizer folder."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer_dir, text_len, device)
        return self

    def _setup(self, model, tokenizer_dir, text_len: int, device) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415 (slow import: transformers)

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.model, self.text_len, self.device = model, text_len, device
        self.text_dim = model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.text_len, return_tensors="pt"
        )
        mask = tok.attention_mask.to(self.device)
        hidden = self.model(input_ids=tok.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        return (hidden * mask.unsqueeze(-1)).float()  # Wan zero-pads past each prompt's length


def resolve_text_encoder_kind(kind: str, text_dim: int) -> str:
    """`auto`: umT5 for a model that reads umT5-XXL embeddings (text_dim 4096), else the tiny encoder."""
    if kind == "auto":
        return "umt5" if text_dim == UMT5_XXL_DIM else "tiny"
    if kind not in ("tiny", "umt5"):
        raise ValueError(f"text_encoder.kind={kind!r}; expected 'auto', 'tiny' or 'umt5'")
    return kind


def build_text_encoder(
    kind: str = "auto",
    text_dim: int = 64,
    text_len: int = 32,
    path: str | None = None,
    device="cpu",
    tokenizer: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
):
    """The text encoder for `data.text_encoder` (kind, path).

    umt5 `path`: a Hugging Face umT5 folder (config.json + weights + tokenizer), an official
    download folder (holding models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl/), or the .pth
    file itself (`tokenizer`: the tokenizer folder, default google/umt5-xxl/ beside it).
    """
    kind = resolve_text_encoder_kind(kind, text_dim)
    if kind == "tiny":
        return TinyTextEncoder(text_dim, text_len)
    if not path:
        raise ValueError(
            f"this model reads umT5-XXL text embeddings (text_dim {text_dim}): set data.text_encoder.path to the "
            f"official {official.T5_FILE} (with {official.T5_TOKENIZER_DIR}/ beside it), the folder holding both, or a "
            "Hugging Face umT5-XXL folder; data.text_encoder.kind=tiny uses the weight-free hash encoder instead "
            "(not what the weights saw)"
        )
    p = Path(path)
    if p.is_dir() and (p / official.T5_FILE).is_file():
        p = p / official.T5_FILE
    if p.suffix == ".pth" or not p.is_dir():
        return official.load_official_t5(p, tokenizer, text_len=text_len, dtype=dtype, device=device)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{p}: neither a Hugging Face umT5 folder (no config.json) nor an official download "
            f"folder (no {official.T5_FILE})"
        )
    return UMT5Encoder(str(p), text_len=text_len, device=device, dtype=dtype)
