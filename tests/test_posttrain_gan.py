"""The GAN discriminator of stage 2 on its own: which parameters each loss reaches (head-only and
head + trunk), APT's approximate R1, and the config checks of the variant."""

from __future__ import annotations

import re

import pytest
import torch
from test_posttrain_units import _grads, _nonzero, _trainer

from titan_world.config import load_config
from titan_world.posttrain import distill
from titan_world.posttrain.dmd import noised

TRUNK_R1 = {"gan_train_trunk": True, "gan_r1_weight": 100.0, "gan_r1_sigma": 0.01}


def _all_zero(grads):
    return all(g is None or g.abs().sum() == 0 for g in grads)


class _ZeroDMD:
    def __init__(self, x):
        self.loss, self.gap = 0.0 * x.sum(), 0.0


@pytest.mark.parametrize("trunk", [False, True], ids=["head-only", "trunk+r1"])
def test_discriminator_loss_reaches_the_trunk_only_when_asked(monkeypatch, trunk):
    tr, b = _trainer(**(TRUNK_R1 if trunk else {}))
    tr.opt_critic.step = tr.opt_student.step = lambda *a, **k: None  # keep the grads to inspect them
    real_fake_loss = distill.fake_score_loss
    monkeypatch.setattr(distill, "fake_score_loss", lambda *a, **k: 0.0 * real_fake_loss(*a, **k))  # L_D alone
    logs = tr.critic_update(b, step=0, sub=0)
    assert _nonzero(_grads(tr.critic.head)), "D step must train the head"
    if trunk:
        assert _nonzero(_grads(tr.critic.fake)), "with gan_train_trunk the D step must train the fake-score trunk"
        assert logs["r1"] > 0
    else:
        assert _all_zero(_grads(tr.critic.fake)), "head-only: the D step must not touch the fake-score trunk"
        assert "r1" not in logs
    assert _all_zero(_grads(tr.student)) and _all_zero(_grads(tr.teacher))
    tr.critic.zero_grad(set_to_none=True)
    monkeypatch.setattr(distill, "dmd_step_loss", lambda *a, **k: _ZeroDMD(a[0]))  # L_G alone
    tr.student_update(b, step=0)
    assert _nonzero(_grads(tr.student)), "G step must train the student"
    assert all(g is None for g in _grads(tr.critic)), "G step must not touch the critic (trunk or head)"
    assert all(g is None for g in _grads(tr.teacher))
    assert all(p.requires_grad for p in tr.critic.parameters())  # unfrozen again


def test_approximate_r1_is_zero_unperturbed_and_grows_with_sigma():
    """D = fake-score pass + head of a randomly initialised critic, on a real window."""
    torch.manual_seed(0)
    tr, b = _trainer(**TRUNK_R1)
    real = tr.window(b, b.latents)
    nb = noised(real, 0.5, torch.randn(real.latents.shape))
    d = tr._discriminator(real, nb, 0.5)
    delta = torch.randn(real.latents.shape) * nb.loss_mask[:, None, :, None, None]
    with torch.no_grad():
        r1 = [float(distill.approx_r1(d, nb.x_t, sigma * delta)) for sigma in (0.0, 0.01, 0.03, 0.1, 0.3)]
    assert r1[0] == 0.0, r1
    assert all(a < b for a, b in zip(r1, r1[1:])), r1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["posttrain.gan_train_trunk=true"], "posttrain.gan_weight=0.0: expected > 0 with posttrain.gan_train_trunk"),
        (["posttrain.gan_r1_weight=10"], "posttrain.gan_weight=0.0: expected > 0"),
        (["posttrain.gan_weight=0.1", "posttrain.gan_r1_weight=-1"], "posttrain.gan_r1_weight=-1.0: expected"),
        (["posttrain.gan_weight=0.1", "posttrain.gan_r1_weight=10", "posttrain.gan_r1_sigma=0"], "gan_r1_sigma=0.0"),
    ],
)
def test_gan_variant_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, overrides)
