"""APT-style GAN head on the fake score's features (LingBot §3.4.2, Fig. 6b).

A few learned queries cross-attend to the hidden states of chosen fake-score blocks (read with
forward hooks; the model is not edited) and an MLP maps the pooled answers to one logit per
sample. Softplus non-saturating losses (f = softplus):

    L_D = E_real f(−D(x_σ)) + E_student f(D(x̃_σ)) [+ λ·R1≈]   (updates the head; the trunk too with
                                                              `posttrain.gan_train_trunk`)
    L_G = E_student f(−D(x̂_σ))                               (updates the student only)

(LingBot's eqs. (5)/(6) are written with f(1 − D); we use the standard non-saturating pair.)
By default the fake-score trunk is trained by flow matching only: the D step reads its features
without gradient. With `gan_train_trunk` (DMD2, APT) L_D also reaches the trunk, regularised by
APT's approximate R1 (`approx_r1`). The G step always runs with trunk and head frozen (`frozen`),
so its gradient flows through their activations into x̂ and the student, and nowhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from titan_world.model.moe import experts


class FeatureTap:
    """Capture the outputs of `net.blocks[i]` for i in `blocks` (of every expert of an MoE).

    Checkpointed blocks (`parallel.activation_checkpoint` on the fake score) are fine: the project's
    AC replaces the block's `forward`, and its backward recomputation calls the inner forward, not
    the block's `__call__`, so the hooks fire once per real forward, never on a recompute.
    """

    def __init__(self, net: nn.Module, blocks: list[int]):
        self.blocks, self.features = list(blocks), {}
        nets = experts(net)
        self._handles = [n.blocks[i].register_forward_hook(self._hook(i)) for n in nets for i in self.blocks]
        self.active = False

    def _hook(self, i: int):
        def fn(_module, _inputs, output):
            if self.active:
                self.features[i] = output

        return fn

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[int, torch.Tensor]]:
        self.features, self.active = {}, True
        try:
            yield self.features
        finally:
            self.active = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class GANHead(nn.Module):
    """Learned queries × cross-attention per tapped block -> concat -> MLP -> one logit."""

    def __init__(self, dim: int, num_blocks: int, num_queries: int = 4, num_heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_blocks, num_queries, dim) / dim**0.5)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, num_heads, batch_first=True) for _ in range(num_blocks))
        self.mlp = nn.Sequential(nn.Linear(num_blocks * num_queries * dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: per tapped block [B, L, dim] -> logits [B]."""
        outs = []
        for q, attn, h in zip(self.queries, self.attn, features):
            kv = self.norm(h.float())
            o, _ = attn(q.expand(h.shape[0], -1, -1), kv, kv, need_weights=False)
            outs.append(o.flatten(1))
        return self.mlp(torch.cat(outs, dim=1)).squeeze(-1).clone()  # not a view: FSDP2 warns on view outputs


def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake).mean()


def approx_r1(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    delta: torch.Tensor,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """APT's approximate R1: mean (D(x + δ) − D(x))² over real inputs x, δ ~ N(0, σ²I).

    For small σ this is σ²·‖∇ₓD‖² in expectation — R1's gradient penalty — but it needs only
    forward passes (and their ordinary backward), so it works with FSDP, activation checkpointing
    and flash attention, which double backward does not. `logits`: D(x) if already computed."""
    clean = discriminator(x) if logits is None else logits
    return (discriminator(x + delta) - clean).pow(2).mean()


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """requires_grad=False on every parameter of `modules` for the block (restored after), so a
    loss can flow *through* them to their inputs without touching their gradients.

    FSDP2-sharded modules work too: `parameters()` lists the gathered parameters of a unit FSDP
    keeps gathered after a forward (root, last block) and the sharded ones of the others, and FSDP
    copies a sharded parameter's flag to its gathered copy at every gather. So every parameter the
    block computes with reads False, the critic gets no gradient and no reduce-scatter (checked on
    2 ranks, torch 2.13, by tests/test_posttrain_fsdp.py)."""
    params = [p for m in modules for p in m.parameters()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, before):
            p.requires_grad_(r)
