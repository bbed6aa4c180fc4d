"""DMD fidelity to the references (issue 21): the real score's unconditional branch is the encoded
negative prompt, the exported student is the EMA of its weights (Self-Forcing keeps one), and the
scores' given frame is a start image's latent (decoded and re-encoded, as Self-Forcing does)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from test_posttrain_units import actions, tiny

from titan_world.config import load_config
from titan_world.model import build_model, save_pretrained
from titan_world.model.codec import TinyCodec
from titan_world.model.text_encoder import build_text_encoder
from titan_world.posttrain.config import PostTrainConfig
from titan_world.posttrain.distill import Batch, DMDTrainer, step_generators
from titan_world.posttrain.dmd import dmd_step_loss
from titan_world.posttrain.loop import DMDJob, load_net

NEGATIVE = "blurry static frames"
SMALL = ["posttrain.rollout_chunks=2", "posttrain.grad_chunks=2", "posttrain.fake_updates=1", "train.ckpt_every=0"]


def _cfg(tmp: Path, data: Path, run: str, teacher: Path, *extra: str):
    return load_config(
        None,
        [
            f"run.dir={tmp / run}",
            f"data.path=synthetic:{data}",
            "data.synth_episodes=4",
            "data.synth_seconds=1.0",
            "run.progress=false",
            "run.wandb=disabled",
            f"posttrain.teacher={teacher}",
            f"posttrain.student={teacher}",
            *SMALL,
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fidelity")
    torch.manual_seed(0)
    teacher = build_model(load_config(None, ["model.action.enabled=true"]).model)
    for p in teacher.head.parameters():  # Wan init zeroes the head: give the scores a signal
        p.data.normal_(0, 0.02)
    save_pretrained(teacher, tmp / "teacher")
    return tmp, tmp / "data", tmp / "teacher"


def test_real_score_unconditional_branch_is_the_encoded_negative_prompt(world):
    tmp, data, teacher = world
    cfg = _cfg(tmp, data, "neg", teacher, "posttrain.guidance_scale=2.0", f"posttrain.negative_prompt={NEGATIVE}")
    job = DMDJob(cfg)
    try:
        tr = job.trainer
        contexts: list[torch.Tensor] = []
        tr.teacher.register_forward_pre_hook(lambda net, args: contexts.append(args[2].detach().clone()))
        batch = Batch.from_loader(next(job.loader.batches()), job.use_actions, job.device)
        tr.student_update(batch, 0)
    finally:
        job.loader.close()
    te = cfg.data.text_encoder
    expected = build_text_encoder(te.kind, cfg.model.text_dim, cfg.model.text_len, te.path).encode([NEGATIVE])
    b = batch.context.shape[0]
    assert expected.abs().sum() > 0
    assert len(contexts) == 2  # one real score with guidance: the conditional pass, then the unconditional one
    assert torch.equal(contexts[0], batch.context)
    assert torch.equal(contexts[1], expected.expand(b, -1, -1))

    # ... and it matters: the DMD loss with the all-zero text tensor (the old unconditional input) differs.
    inp = tr.window(batch, batch.latents)
    noise = torch.randn(inp.latents.shape, generator=torch.Generator().manual_seed(0))
    neg = dmd_step_loss(inp.latents, inp, tr.teacher, tr.critic.fake, 0.5, noise, 2.0)
    zero = dmd_step_loss(
        inp.latents,
        dataclasses.replace(inp, uncond_context=torch.zeros_like(inp.uncond_context)),
        tr.teacher,
        tr.critic.fake,
        0.5,
        noise,
        2.0,
    )
    assert not torch.allclose(neg.loss, zero.loss, rtol=1e-4, atol=0), (neg.loss, zero.loss)


def test_official_negative_prompt_and_ema_range():
    from titan_world.model.presets import OFFICIAL_NEGATIVE_PROMPT

    assert PostTrainConfig(negative_prompt="official").negative_text() == OFFICIAL_NEGATIVE_PROMPT
    assert load_config("configs/posttrain/a14b_8gpu.yaml", []).posttrain.negative_text() == OFFICIAL_NEGATIVE_PROMPT
    assert PostTrainConfig().negative_text() == ""
    with pytest.raises(ValueError, match="posttrain.ema_decay=1.0"):
        PostTrainConfig(ema_decay=1.0).validate()


def _params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def test_exported_student_is_the_ema_of_its_updates(world):
    """The export equals an EMA computed here from the student after every applied update: a copy
    before `ema_start_step` (1), an average from it on."""
    tmp, data, teacher = world
    decay, steps = 0.5, 3
    job = DMDJob(
        _cfg(
            tmp,
            data,
            "ema",
            teacher,
            f"train.steps={steps}",
            f"posttrain.ema_decay={decay}",
            "posttrain.ema_start_step=1",
        )
    )
    updates = []
    job.trainer.opt_student.register_step_post_hook(lambda opt, args, kwargs: updates.append(_params(job.student)))
    assert job.fit() == 0
    assert len(updates) == steps
    expected = updates[0]
    for snap in updates[1:]:
        expected = {n: decay * e + (1 - decay) * snap[n] for n, e in expected.items()}
    exported = load_net(tmp / "ema" / "model", "cpu").state_dict()
    raw = _params(job.student)
    for n, e in expected.items():
        assert torch.allclose(exported[n], e, atol=1e-6, rtol=1e-5), n
    assert any(not torch.allclose(exported[n], raw[n]) for n in raw), "the EMA should differ from the raw student"


def test_export_ema_false_exports_the_raw_student(world):
    tmp, data, teacher = world
    job = DMDJob(
        _cfg(tmp, data, "raw", teacher, "train.steps=1", "posttrain.export_ema=false", "posttrain.ema_start_step=0")
    )
    assert job.fit() == 0
    exported = load_net(tmp / "raw" / "model", "cpu").state_dict()
    for n, p in _params(job.student).items():
        assert torch.equal(exported[n], p), n
    ema = job.trainer.ema.state_for_export()  # still kept (and checkpointed); only the export picks the raw weights
    assert any(not torch.allclose(exported[n], ema[n]) for n in ema)


C, HW = 8, 8


def _start_image_latent(codec: TinyCodec, latents: torch.Tensor, g: int) -> torch.Tensor:
    """Latent frame g - 1 the way the teacher's start images are made: decode, last frame, encode."""
    return codec.encode(codec.decode(latents[:, :, :g])[:, :, -1:])


def test_scores_given_frame_is_a_reencoded_start_image():
    """grad_chunks 1 of 3: the scores see frames [2, 4); frame 2 is a generated 4-frame latent, and the
    teacher gets it the way it saw every conditioning frame in training, as one encoded image."""
    torch.manual_seed(0)
    codec = TinyCodec(2, C)  # lossy: 8 of 48 coefficients, so a re-encoded frame differs from the latent
    pcfg = PostTrainConfig(chunk_frames=1, rollout_chunks=3, grad_chunks=1, fake_updates=1, window_frames=4)
    student, teacher = tiny(), tiny()
    tr = DMDTrainer(student, teacher, copy.deepcopy(teacher), pcfg, codec=codec)
    batch = Batch(torch.randn(2, C, 4, HW, HW), torch.randn(2, 8, 16), actions(2, 4))

    inp = tr.window(batch, batch.latents)  # the real clip's window (the discriminator's)
    given = _start_image_latent(codec, batch.latents, 3)
    assert torch.allclose(inp.latents[:, :, :1], given, atol=1e-6, rtol=0)
    assert not torch.allclose(given, batch.latents[:, :, 2:3], atol=1e-2)
    assert torch.equal(inp.latents[:, :, 1:], batch.latents[:, :, 3:4])

    # The teacher's input in a student update: its given (clean, t = 0) frame is the re-encoded rollout frame.
    shared, local = step_generators(tr.seed, 0, 0, pcfg.fake_updates)
    rolled = tr.rollout(batch, shared, local, grad=False).latents
    seen: list[torch.Tensor] = []
    teacher.register_forward_pre_hook(lambda net, args: seen.append(args[0][:, :C, :1].detach().clone()))
    tr.student_update(batch, 0)
    assert torch.allclose(seen[0], _start_image_latent(codec, rolled, 3), atol=1e-5, rtol=0)

    # posttrain.score_cond=latent: the generated latent as it is; without a codec the default is refused.
    raw = DMDTrainer(tiny(), tiny(), tiny(), dataclasses.replace(pcfg, score_cond="latent"))
    assert torch.equal(raw.window(batch, batch.latents).latents, batch.latents[:, :, 2:4])
    with pytest.raises(ValueError, match="score_cond=reencode"):
        DMDTrainer(tiny(), tiny(), tiny(), pcfg)
