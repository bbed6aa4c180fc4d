"""Post-training pieces on their own: cached rollout == uncached, DMD gradient, gradient
truncation, two-time-scale ratio, causal mask (the GAN's: tests/test_posttrain_gan.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from titan_world.model import ActionConfig, ActionInputs, AttnMask, ModelConfig, build_model
from titan_world.model.codec import TinyCodec
from titan_world.posttrain.causal import CausalMask, ChunkLayout, diffusion_forcing_loss, forcing_sigmas
from titan_world.posttrain.config import PostTrainConfig
from titan_world.posttrain.distill import Batch, DMDTrainer
from titan_world.posttrain.dmd import dmd_direction, dmd_loss
from titan_world.posttrain.rollout import RolloutInputs, self_rollout, self_rollout_uncached

C, HW = 8, 8


def tiny(actions: bool = True, warp: bool = False):
    cfg = ModelConfig(
        dim=48,
        ffn_dim=96,
        num_heads=4,
        num_layers=4,
        in_dim=2 * C + 4,
        out_dim=C,
        text_dim=16,
        text_len=8,
        action=ActionConfig(enabled=actions, spatial_stride=1, warp_cond=warp),
    )
    m = build_model(cfg)
    for p in m.parameters():  # Wan init zeroes the head: give every path a signal
        p.data.normal_(0, 0.05)
    return m


def actions(b: int, f: int) -> ActionInputs:
    c2w = torch.eye(4).repeat(b, f, 1, 1)
    c2w[:, :, 0, 3] = torch.linspace(0, 1, f)
    return ActionInputs(torch.rand(b, f, 8), c2w, torch.tensor([8.0, 8, 4, 4]).repeat(b, f, 1))


def rollout_inputs(b=2, chunks=4, chunk=2):
    f = 1 + chunks * chunk
    return RolloutInputs(torch.randn(b, C, 1, HW, HW), torch.randn(b, 8, 16), actions(b, f), ChunkLayout(f, 1, chunk))


def turning(inp: RolloutInputs) -> RolloutInputs:
    """The same inputs with the camera also turning (0.1 rad per latent frame): a warp that moves pixels."""
    c2w = inp.actions.c2w.clone()
    yaw = 0.1 * torch.arange(c2w.shape[1], dtype=torch.float32)
    c2w[:, :, 0, 0], c2w[:, :, 0, 2], c2w[:, :, 2, 0], c2w[:, :, 2, 2] = yaw.cos(), yaw.sin(), -yaw.sin(), yaw.cos()
    return RolloutInputs(
        inp.given, inp.context, ActionInputs(inp.actions.keys, c2w, inp.actions.intrinsics), inp.layout
    )


@pytest.mark.parametrize("window,warp", [(2, False), (8, False), (2, True)])
def test_cached_rollout_equals_uncached_block_causal(window, warp):
    """Rolling KV cache (sink + window, RoPE offsets, per-chunk exits) == full masked forwards; with
    the warped condition, every chunk re-projects the given frame in both (model.action.warp_cond)."""
    m, inp = tiny(warp=warp), rollout_inputs()
    if warp:
        inp = turning(inp)
    sig, exits = [1.0, 0.75, 0.5, 0.25], [3, 1, 0, 2]
    a = self_rollout(
        m, inp, sig, torch.Generator().manual_seed(1), exit_steps=exits, sink_frames=1, window_frames=window
    ).latents
    b = self_rollout_uncached(
        m, inp, sig, torch.Generator().manual_seed(1), exit_steps=exits, sink_frames=1, window_frames=window
    )
    assert torch.allclose(a, b, atol=2e-5, rtol=0), (a - b).abs().max()
    # a recorded (gradient) pass reads the cache without writing it and gives the same numbers
    c = self_rollout(
        m,
        inp,
        sig,
        torch.Generator().manual_seed(1),
        exit_steps=exits,
        grad_chunks=4,
        sink_frames=1,
        window_frames=window,
    ).latents
    assert torch.allclose(a, c.detach(), atol=1e-6, rtol=0)


def test_causal_mask_without_prefix_is_block_causal():
    ref = AttnMask.block_causal(7, 3, 2, sink_frames=1, window_frames=2).dense()
    assert torch.equal(CausalMask(7, 3, 2, 1, 2, None, 0).dense(), ref)
    m = ChunkLayout(5, 1, 2).mask(1).dense()  # chunks {0} {1,2} {3,4}
    assert m[0].tolist() == [True, False, False, False, False]
    assert m[1].tolist() == m[2].tolist() == [True, True, True, False, False]


def test_diffusion_forcing_loss_ignores_clean_chunks():
    m = tiny()
    lay = ChunkLayout(5, 1, 2)
    lat = torch.randn(2, C, 5, HW, HW)
    sig = forcing_sigmas(2, lay, [1000, 500], torch.Generator().manual_seed(0))
    assert set(sig[:, 1:].unique().tolist()) <= {0.0, 0.5, 1.0} and (sig[:, 0] == 0).all()
    zero = diffusion_forcing_loss(
        m, lat, torch.randn(2, 8, 16), torch.zeros(2, 5), torch.randn_like(lat), lay, actions=actions(2, 5)
    )
    assert float(zero.loss.detach()) == 0.0  # t = 0 everywhere: x0 = x_t exactly, no loss
    out = diffusion_forcing_loss(
        m, lat, torch.randn(2, 8, 16), torch.full((2, 5), 0.5), torch.randn_like(lat), lay, actions=actions(2, 5)
    )
    out.loss.backward()
    assert float(out.loss) > 0 and m.blocks[0].self_attn.q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["full", "attention"])
def test_causal_stage_activation_checkpointing_is_exact(mode):
    """`post-train causal` applies `parallel.activation_checkpoint` to the student (no KV cache in
    stage 1): the block-causal loss and every gradient match the un-checkpointed student."""
    from parallel.checkpointing import apply_activation_checkpointing
    from parallel.config import ParallelConfig

    m = tiny()
    ac = copy.deepcopy(m)
    assert apply_activation_checkpointing(ac, ParallelConfig(activation_checkpoint=mode))
    lay = ChunkLayout(5, 1, 2)
    lat, ctx = torch.randn(2, C, 5, HW, HW), torch.randn(2, 8, 16)
    sig, noise, acts = (
        forcing_sigmas(2, lay, [1000, 500], torch.Generator().manual_seed(0)),
        torch.randn_like(lat),
        actions(2, 5),
    )
    losses = []
    for net in (m, ac):
        out = diffusion_forcing_loss(net, lat, ctx, sig, noise, lay, actions=acts, sink_frames=1, window_frames=2)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, p), q in zip(m.named_parameters(), ac.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=lambda msg, name=name: f"{name}: {msg}")


def test_dmd_gradient_is_the_normalised_fake_minus_real_direction():
    torch.manual_seed(0)
    x = torch.randn(2, C, 4, HW, HW, requires_grad=True)
    mu_real, mu_fake = torch.randn_like(x), torch.randn_like(x)
    gen = torch.tensor([[False, True, True, True]] * 2)
    g = dmd_direction(x.detach(), mu_real, mu_fake, gen)
    w = (x.detach() - mu_real)[:, :, 1:].abs().mean(dim=(1, 2, 3, 4))  # per-sample mean over generated frames
    expected = (mu_fake - mu_real) / w.view(-1, 1, 1, 1, 1)
    expected[:, :, 0] = 0
    assert torch.allclose(g, expected, atol=1e-6)
    dmd_loss(x, g, gen).backward()
    n = C * HW * HW * int(gen.sum())  # L = ½ mean over generated elements
    assert torch.allclose(x.grad, g / n, atol=1e-9, rtol=1e-5)


def _trainer(gan_weight=0.5, fake_updates=3, grad_chunks=1, **gan):
    pcfg = PostTrainConfig(
        chunk_frames=1,
        rollout_chunks=3,
        grad_chunks=grad_chunks,
        fake_updates=fake_updates,
        gan_weight=gan_weight,
        gan_blocks=[1, 3],
        window_frames=4,
        **gan,
    )
    student, teacher = tiny(), tiny()
    fake = copy.deepcopy(teacher)
    tr = DMDTrainer(student, teacher, fake, pcfg, codec=TinyCodec(2, C))  # the scores' given frame is re-encoded
    b = Batch(torch.randn(2, C, 4, HW, HW), torch.randn(2, 8, 16), actions(2, 4))
    return tr, b


def _grads(module):
    return [p.grad for p in module.parameters()]


def _nonzero(grads):
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradient_truncation_leaves_earlier_chunks_without_graph():
    m, inp = tiny(), rollout_inputs(chunks=4, chunk=1)
    r = self_rollout(m, inp, [1.0, 0.5], torch.Generator().manual_seed(0), grad_chunks=2)
    assert [c.requires_grad for c in r.chunks] == [False, False, True, True]
    assert r.grad_start == 3
    r.chunks[-1].sum().backward()
    assert _nonzero(_grads(m))
    with torch.no_grad():
        r2 = self_rollout(m, inp, [1.0, 0.5], torch.Generator().manual_seed(0), grad_chunks=2)
    assert not any(c.requires_grad for c in r2.chunks)


def test_two_time_scale_ratio():
    tr, b = _trainer(gan_weight=0.0, fake_updates=3)
    logs = [tr.step(b, s) for s in range(2)]
    assert tr.counts == {"critic_updates": 6, "student_updates": 2}
    assert tr.opt_critic.state[next(iter(tr.critic.parameters()))]["step"] == 6
    assert tr.opt_student.state[next(iter(tr.student.parameters()))]["step"] == 2
    assert all(k in logs[0] for k in ("fake_loss", "dmd_loss", "real_fake_gap"))
