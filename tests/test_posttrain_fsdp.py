"""Post-training on 2 real gloo ranks: FSDP2-sharded networks vs full replicas with gradient
all-reduce (`posttrain.fsdp=false`), both stages, GAN head on.

One launch of 2 ranks runs every job (spawning ranks costs seconds on a busy CPU), a module
fixture keeps what they report, and each test checks one property of it:
  - the same losses, gradient norms (every step clips) and exported students from both paths,
    causal and DMD; a DMD student update runs several forwards (denoising passes, t = 0 cache
    writes, 2 recorded chunks) before its one backward;
  - each rank stores about half of every network; the teacher has no grads, no optimizer state;
  - under FSDP a student update leaves the critic bit-identical and a critic update the student;
  - an MoE teacher and fake score shard expert by expert;
  - preempted (checkpoint, exit 75) then resumed under FSDP == uninterrupted;
  - sharded jobs never load a full copy of a network (built on meta, each rank reads its rows).
Tiny sizes: 32x32 video (16 tokens per latent frame), 2 student sigmas, 2-chunk rollouts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from posttrain_runs import COMMON, records, save_teacher, weights

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(name="posttrain_fsdp")]

DMD_STEPS = 3


def _cfg(tmp: Path, run: str, fsdp: bool, *extra: str, teacher: str = "teacher"):
    from titan_world.config import load_config

    path = tmp / teacher
    return load_config(
        None,
        [
            f"run.dir={tmp / run}",
            f"data.path=synthetic:{tmp / 'data'}",
            f"posttrain.teacher={path}",
            f"posttrain.student={path}",
            f"posttrain.fsdp={str(fsdp).lower()}",
            *COMMON,
            *extra,
        ],
    )


def _local(module: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of this rank's shards. FSDP keeps some units gathered after a forward (the root, the
    last block) and the module then lists their unsharded parameters: reshard first."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _probe(job) -> dict:
    """Shard sizes, the teacher's (absent) training state and which networks one student / one
    critic update touch, on a sharded DMD job after its run."""
    from titan_world.posttrain.distill import Batch
    from titan_world.posttrain.loop import make_loader

    t = job.trainer
    nets = {"student": job.student, "fake": t.critic.fake, "head": t.critic.head, "teacher": t.teacher}
    shares = {k: sum(x.numel() for x in _local(m)) / sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    optimized = {id(p) for opt in (t.opt_student, t.opt_critic) for g in opt.param_groups for p in g["params"]}
    stated = {id(p) for opt in (t.opt_student, t.opt_critic) for p in opt.state}
    teacher_ids = {id(p) for p in t.teacher.parameters()}
    loader = make_loader(job.cfg, job.clip_frames, job.rank, job.world, seed=99)
    try:
        batch = Batch.from_loader(next(loader.batches()), job.use_actions, job.device)
    finally:
        loader.close()
    t.critic.zero_grad(set_to_none=True)  # the run's last critic update left its gradients
    critic0, student0 = _local(t.critic), _local(job.student)
    t.student_update(batch, step=100)
    critic_grads = [n for n, p in t.critic.named_parameters() if p.grad is not None]
    critic1, student1 = _local(t.critic), _local(job.student)
    t.critic_update(batch, step=101, sub=0)
    critic2, student2 = _local(t.critic), _local(job.student)
    return {
        "shares": shares,
        "teacher_trainable": any(p.requires_grad for p in t.teacher.parameters()),
        "teacher_grads": any(p.grad is not None for p in t.teacher.parameters()),
        "teacher_in_optimizer": bool(teacher_ids & (optimized | stated)),
        "student_update_critic_same": _same(critic0, critic1),
        "student_update_critic_grads": critic_grads,
        "student_update_moved_student": not _same(student0, student1),
        "critic_update_student_same": _same(student1, student2),
        "critic_update_moved_critic": not _same(critic1, critic2),
    }


def all_jobs(tmp: Path) -> dict:
    """Every job of this module on one rank (the process group stays up between jobs)."""
    from parallel.distributed import init_distributed
    from titan_world.exit_codes import EXIT_PREEMPTED
    from titan_world.posttrain import loop
    from titan_world.posttrain.loop import CausalJob, DMDJob

    init_distributed()
    out: dict = {}
    replica_load = loop.load_net

    def no_full_copy(path, *args, **kwargs):
        raise AssertionError(f"a sharded job loaded a full copy of {path} (it must build on meta and read its shards)")

    for fsdp in (False, True):
        tag = "fsdp" if fsdp else "allreduce"
        loop.load_net = no_full_copy if fsdp else replica_load  # from here on every job is sharded
        assert CausalJob(_cfg(tmp, f"causal-{tag}", fsdp, "train.steps=2")).fit() == 0
        dmd = DMDJob(_cfg(tmp, f"dmd-{tag}", fsdp, f"train.steps={DMD_STEPS}"))
        assert dmd.fit() == 0
        if fsdp:
            out["probe"] = _probe(dmd)
    assert (
        DMDJob(_cfg(tmp, "dmd-cut", True, f"train.steps={DMD_STEPS}", "train.preempt_at_step=2")).fit()
        == EXIT_PREEMPTED
    )
    assert DMDJob(_cfg(tmp, "dmd-cut", True, f"train.steps={DMD_STEPS}"), resume=True).fit() == 0
    # student: the high expert; with seed 0, sigmas in [0.5, 0.98] route critic and student updates to both
    # experts (boundary 0.9)
    moe = DMDJob(
        _cfg(
            tmp,
            "dmd-moe",
            True,
            "train.steps=2",
            "posttrain.dmd_shift=1.0",
            "posttrain.dmd_sigma_min=0.5",
            teacher="moe",
        )
    )
    assert moe.fit() == 0
    nets = {
        "student": moe.student,
        "fake.high": moe.trainer.critic.fake.high,
        "fake.low": moe.trainer.critic.fake.low,
        "teacher.high": moe.trainer.teacher.high,
        "teacher.low": moe.trainer.teacher.low,
    }
    out["moe_shares"] = {
        k: sum(x.numel() for x in _local(m)) / sum(p.numel() for p in m.parameters()) for k, m in nets.items()
    }
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from titan_world.data.loader import prepare_dataset

    tmp = tmp_path_factory.mktemp("posttrain_fsdp")
    save_teacher(tmp / "teacher")
    save_teacher(tmp / "moe", "model.num_experts=2")
    prepare_dataset(_cfg(tmp, "data", True), progress=False)
    ranks = run_distributed(all_jobs, 2, tmp, timeout=300)
    return tmp, ranks


@pytest.mark.parametrize(
    "stage,keys",
    [
        ("causal", ["loss", "grad_norm"]),
        ("dmd", ["fake_loss", "d_loss", "dmd_loss", "g_loss", "critic_grad_norm", "student_grad_norm"]),
    ],
)
def test_fsdp_matches_allreduce(runs, stage, keys):
    tmp, _ = runs
    ref, got = records(tmp / f"{stage}-allreduce"), records(tmp / f"{stage}-fsdp")
    assert [r["step"] for r in got] == [r["step"] for r in ref] and len(ref) >= 2
    for a, b in zip(ref, got):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (stage, a["step"], k)
    full, sharded = weights(tmp / f"{stage}-allreduce" / "model"), weights(tmp / f"{stage}-fsdp" / "model")
    assert full.keys() == sharded.keys()
    # The export gathered the whole student from the shards. atol = 1% of one lr step: the
    # gradients agree to float rounding (reduce-scatter vs all-reduce, a norm summed over shards),
    # and DMD's AdamW (beta1 = 0) turns a gradient near its eps into a step of any size up to lr.
    for k in full:
        torch.testing.assert_close(sharded[k], full[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{stage} {k}: {m}")
    teacher = weights(tmp / "teacher")
    assert max(float((full[k] - teacher[k]).abs().max()) for k in full) > 1e-4, "the stage must move the student"


def test_each_rank_holds_half_and_the_teacher_no_training_state(runs):
    _, ranks = runs
    for rank, res in enumerate(ranks):
        p = res["probe"]
        for net, share in p["shares"].items():
            assert 0.4 < share < 0.6, (rank, net, share)
        assert not p["teacher_trainable"] and not p["teacher_grads"] and not p["teacher_in_optimizer"], rank


def test_updates_touch_only_their_own_network_under_fsdp(runs):
    _, ranks = runs
    for rank, res in enumerate(ranks):
        p = res["probe"]
        assert p["student_update_moved_student"], rank
        assert p["student_update_critic_same"], f"rank {rank}: the G step changed the critic"
        assert not p["student_update_critic_grads"], (
            f"rank {rank}: the G step gave critic weights gradients: {p['student_update_critic_grads'][:5]}"
        )
        assert p["critic_update_student_same"], f"rank {rank}: the critic step touched the student"
        assert p["critic_update_moved_critic"], rank


def test_moe_teacher_and_fake_shard_each_expert(runs):
    """An MoE teacher (and the fake score initialised from it): each expert is its own FSDP root;
    both ranks route every score to the same expert (shared sigma), so the run completes."""
    tmp, ranks = runs
    for rank, res in enumerate(ranks):
        for net, share in res["moe_shares"].items():
            assert 0.4 < share < 0.6, (rank, net, share)
    rec = records(tmp / "dmd-moe")
    assert len(rec) == 2 and all(
        torch.isfinite(torch.tensor([r["dmd_loss"], r["fake_loss"], r["g_loss"]])).all() for r in rec
    )
    assert min(r["sigma"] for r in rec) < 0.9 < max(r["sigma"] for r in rec), "both experts must have been used"
    assert (tmp / "dmd-moe" / "model" / "config.json").is_file()


def test_fsdp_resume_reproduces_uninterrupted_losses(runs):
    tmp, _ = runs
    full, cut = records(tmp / "dmd-fsdp"), records(tmp / "dmd-cut")
    assert [r["step"] for r in cut] == list(range(DMD_STEPS))
    for a, b in zip(full, cut):
        for k in ("fake_loss", "d_loss", "dmd_loss", "g_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)
    assert (tmp / "dmd-cut" / "checkpoints" / "step_00000002").is_dir()
    assert (tmp / "dmd-cut" / "model" / "posttrain.json").is_file()
