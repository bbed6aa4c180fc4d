"""Stage-2 memory levers (titan_world/posttrain/memory.py): activation checkpointing on the fake
score and the student (whose recorded rollout passes then read snapshots of the KV cache), and the
frozen teacher stored in bf16 (`posttrain.teacher_dtype`).

Every DMD step here has the GAN head on, so the `FeatureTap` path runs through checkpointed
blocks both in the critic update (L_D on detached features) and in the student update (L_G
flows through the frozen, checkpointed fake score into the student).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_posttrain_units import HW, C, actions, tiny
from torch.distributed.fsdp import FSDPModule

from parallel.config import ParallelConfig
from parallel.parallelize import parallelize
from titan_world.model import ModelConfig, build_model
from titan_world.posttrain.config import PostTrainConfig
from titan_world.posttrain.distill import Batch, DMDTrainer
from titan_world.posttrain.memory import teacher_dtype

pytestmark = pytest.mark.xdist_group(name="posttrain_memory")

STEPS = 2


def _trainer(ac: str = "none", dtype: str = "auto", mesh=None, window: int = 4, **speed) -> tuple[DMDTrainer, Batch]:
    """Same nets, batch and seeds for every call: only `ac` / `dtype` / `window` differ. With
    window 1 the ring of the rollout's cache wraps: each chunk's t = 0 pass overwrites the frame
    the previous recorded pass attended to, before the backward."""
    torch.manual_seed(0)
    pcfg = PostTrainConfig(
        chunk_frames=1,
        rollout_chunks=3,
        grad_chunks=3,
        fake_updates=1,
        gan_weight=0.5,
        gan_blocks=[1, 3],
        window_frames=window,
        teacher_dtype=dtype,
    )
    student, teacher = tiny(), tiny()
    fake = copy.deepcopy(teacher)
    tr = DMDTrainer(
        student,
        teacher,
        fake,
        pcfg,
        dp_rank=dist.get_rank() if dist.is_initialized() else 0,
        mesh=mesh,
        parallel=ParallelConfig(activation_checkpoint=ac, **speed),
    )
    batch = Batch(torch.randn(2, C, 4, HW, HW), torch.randn(2, 8, 16), actions(2, 4))
    return tr, batch


def _run(tr: DMDTrainer, batch: Batch) -> tuple[list[dict], list[torch.Tensor], list[torch.Tensor]]:
    """Logs of STEPS DMD steps and the updated critic / student parameters (local shards)."""
    logs = [tr.step(batch, s) for s in range(STEPS)]

    def local(m):  # reshard first: FSDP keeps the root and last block gathered after a forward
        for unit in m.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()
        return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in m.parameters()]

    return logs, local(tr.critic), local(tr.student)


def _count_calls(modules: list[torch.nn.Module]) -> list[int]:
    """A counter bumped by every `__call__` of any of `modules` (their forward hooks fire)."""
    count = [0]
    for m in modules:
        m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def _is_checkpointed(block: torch.nn.Module) -> bool:
    return getattr(block, "_titan_ac", False) or "forward" in vars(block)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_fake_score_ac_gives_the_same_dmd_steps(mode):
    """Same losses, gradient norms and updated critic + student as without AC, while the fake's
    blocks really recompute in backward (their attention runs more often than the blocks are
    called), and the block-level hooks (the GAN tap) see only the recorded forward."""
    runs, calls = {}, {}
    for ac in ("none", mode):
        tr, batch = _trainer(ac)
        fake = tr.critic.fake
        calls[ac] = (_count_calls(list(fake.blocks)), _count_calls([b.self_attn for b in fake.blocks]))
        runs[ac] = _run(tr, batch)
    (ref_logs, ref_critic, ref_student), (logs, critic, student) = runs["none"], runs[mode]
    for a, b in zip(ref_logs, logs):
        assert a.keys() == b.keys() and "g_loss" in a and "d_loss" in a
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
    torch.testing.assert_close(critic, ref_critic, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(student, ref_student, rtol=1e-6, atol=1e-7)
    (blocks0, attn0), (blocks1, attn1) = calls["none"], calls[mode]
    assert blocks1[0] == blocks0[0] == attn0[0], "the tap's block hooks must fire once per real forward"
    assert attn1[0] > attn0[0], f"{mode}: no fake-score block was recomputed in backward"


def test_trained_networks_are_checkpointed_and_the_teacher_never():
    """parallel.activation_checkpoint=full: every fake-score block (both MoE experts) and every
    student block recomputes; the frozen teacher (no backward) never does."""
    tr, _ = _trainer("full")
    assert all(_is_checkpointed(b) for b in tr.critic.fake.blocks) and tr.fake_checkpointed == [0, 1, 2, 3]
    assert all(_is_checkpointed(b) for b in tr.student.blocks) and tr.student_checkpointed == [0, 1, 2, 3]
    assert not any(_is_checkpointed(b) for b in tr.teacher.blocks)
    moe = build_model(
        ModelConfig(
            dim=32,
            ffn_dim=64,
            num_heads=2,
            num_layers=3,
            in_dim=2 * C + 4,
            out_dim=C,
            text_dim=16,
            text_len=8,
            num_experts=2,
        )
    )
    cfg = ParallelConfig(activation_checkpoint="selective", ac_every=2)
    assert parallelize(moe, None, cfg, "student").checkpointed == [0, 2]
    assert [_is_checkpointed(b) for e in (moe.high, moe.low) for b in e.blocks] == [True, False, True] * 2
    assert parallelize(tiny(), None, ParallelConfig(), "critic").checkpointed == []
    assert parallelize(tiny(), None, cfg, "teacher").checkpointed == []  # no backward: nothing to recompute


@pytest.mark.parametrize("mode", ["full", "attention"])
def test_checkpointed_student_over_a_wrapping_cache_gives_the_same_dmd_steps(mode):
    """Window 1: the ring is overwritten between each recorded pass and the backward. With the
    student checkpointed its recorded passes recompute in backward, reading the snapshots they
    took, and the steps equal the uncheckpointed ones; without the snapshots (the plain view of
    the ring) the recomputed passes read other K/V and the student's update differs."""
    ref_logs, ref_critic, ref_student = _run(*_trainer("none", window=1))
    tr, batch = _trainer(mode, window=1)
    assert tr.student_checkpointed == [0, 1, 2, 3]
    attn = _count_calls([b.self_attn for b in tr.student.blocks])
    logs, critic, student = _run(tr, batch)
    assert attn[0] > 0
    for a, b in zip(ref_logs, logs):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
    torch.testing.assert_close(critic, ref_critic, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(student, ref_student, rtol=1e-6, atol=1e-7)
    broken, batch = _trainer(mode, window=1)
    broken.student_checkpointed = []  # blocks still recompute, but the rollout no longer snapshots
    _, _, wrong = _run(broken, batch)
    # measured: the equal runs above are bit-identical; these differ by about one lr step (2e-5)
    assert max(float((a - b).abs().max()) for a, b in zip(wrong, ref_student)) > 5e-6


def test_compile_reaches_every_network_and_float8_the_student(monkeypatch):
    """parallel.compile compiles the blocks of the student (rolling out over its KV cache, with AC
    and snapshots), the fake score and the teacher, and the DMD steps stay what they were;
    parallel.float8 gives the student FP8 block linears and leaves the two scores as they are
    (`parallel.parallelize`)."""
    import torch._dynamo.testing

    import parallel.parallelize as parallelize_module

    ref_logs, ref_critic, ref_student = _run(*_trainer("full", window=1))
    counter = torch._dynamo.testing.CompileCounter()  # a counting backend: no inductor build on CPU
    monkeypatch.setattr(parallelize_module, "COMPILE_BACKEND", counter)
    tr, batch = _trainer("full", window=1, compile=True)
    nets = (tr.student, tr.critic.fake, tr.teacher)
    assert all(getattr(b, "_titan_compiled", False) for n in nets for b in n.blocks)
    logs, critic, student = _run(tr, batch)
    assert counter.frame_count > 0
    for a, b in zip(ref_logs, logs):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
    torch.testing.assert_close(critic, ref_critic, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(student, ref_student, rtol=1e-6, atol=1e-7)
    f8, batch = _trainer(float8="rowwise")
    assert type(f8.student.blocks[0].ffn[0]).__name__ == "Float8Linear"
    assert all(type(n.blocks[0].ffn[0]) is torch.nn.Linear for n in (f8.critic.fake, f8.teacher))
    log = f8.step(batch, 0)
    assert all(math.isfinite(v) for v in log.values()), log


def test_teacher_dtype_auto_is_fp32_on_cpu_bf16_on_cuda():
    assert teacher_dtype("auto", "cpu") == torch.float32 and teacher_dtype("auto", "cuda:0") == torch.bfloat16
    assert teacher_dtype("bfloat16", "cpu") == torch.bfloat16 and teacher_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="posttrain.teacher_dtype"):
        teacher_dtype("float16", "cpu")
    tr, _ = _trainer()  # the default config keeps the tiny CPU numerics: an fp32 teacher
    assert {p.dtype for p in tr.teacher.parameters()} == {torch.float32}


def test_teacher_dtype_is_validated():
    from titan_world.config import ConfigError, load_config

    assert load_config(None, ["posttrain.teacher_dtype=bfloat16"]).posttrain.teacher_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="posttrain.teacher_dtype='float16'"):
        load_config(None, ["posttrain.teacher_dtype=float16"])


def _student_move(dtype: str) -> tuple[list[dict], list[torch.Tensor], torch.Tensor]:
    """(logs, critic after, student after − before, flattened) of STEPS DMD steps."""
    tr, batch = _trainer(dtype=dtype)
    before = [p.detach().clone() for p in tr.student.parameters()]
    logs, critic, student = _run(tr, batch)
    return logs, critic, torch.cat([(a - b).flatten() for a, b in zip(student, before)])


def test_bf16_teacher_close_to_fp32():
    """A bf16-stored teacher: its weights are bf16, the critic updates are (nearly) unchanged
    (they never read the teacher; only through the student they train on) and the student's
    move close. Loose tolerance on the DMD terms: the fake score starts as a copy of the teacher,
    so L_DMD is driven by μ_fake − μ_real, a difference of two nearly equal scores (gap ~3e-3),
    and bf16 rounds the teacher's weights and activations by up to 2^-9 relative: an error of a
    few percent of that gap (5% measured). The student is compared by the direction it moved:
    AdamW with β1 = 0 steps ±lr on nearly every element, so a few sign flips of tiny gradients
    make elementwise differences as large as the step itself."""
    tr, _ = _trainer(dtype="bfloat16")
    stored = {n: p.dtype for n, p in tr.teacher.named_parameters()}  # bf16 but the reference-fp32 modules
    assert {d for n, d in stored.items() if not tr.teacher.keeps_fp32(n)} == {torch.bfloat16}
    assert {d for n, d in stored.items() if tr.teacher.keeps_fp32(n)} == {torch.float32}
    assert {p.dtype for p in tr.student.parameters()} == {p.dtype for p in tr.critic.parameters()} == {torch.float32}
    ref_logs, ref_critic, ref_move = _student_move("float32")
    logs, critic, move = _student_move("bfloat16")
    for k in ("fake_loss", "d_loss", "critic_grad_norm"):  # the first critic update: before any student update
        assert logs[0][k] == ref_logs[0][k], k
    for a, b in zip(ref_logs, logs):
        for k in ("dmd_loss", "real_fake_gap", "student_grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=0.1), k
        for k in ("fake_loss", "d_loss", "g_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-3), k
    assert float(torch.nn.functional.cosine_similarity(move, ref_move, dim=0)) > 0.98
    torch.testing.assert_close(critic, ref_critic, rtol=0, atol=1e-4)


# -- 2 gloo ranks, FSDP2 ------------------------------------------------------------------------------
def _sharded_runs(_tmp: Path) -> dict:
    """On each rank: sharded DMD steps without AC, with full AC on the fake score, and with a
    bf16 teacher; plus the dtype the teacher's weights have *during* its forward."""
    from parallel.distributed import init_distributed
    from parallel.mesh import build_mesh

    _, world, device = init_distributed()

    def sharded(ac: str = "none", dtype: str = "auto", window: int = 4):
        return _trainer(ac, dtype, build_mesh(ParallelConfig(activation_checkpoint=ac), world, device.type), window)

    out = {"none": _run(*sharded())}
    tr, batch = sharded("full")
    out["full_wrapped"] = all(_is_checkpointed(b) for b in (*tr.critic.fake.blocks, *tr.student.blocks))
    out["full"] = _run(tr, batch)
    out["wrap_none"] = _run(*sharded(window=1))  # the ring wraps: the checkpointed student reads its snapshots
    out["wrap_full"] = _run(*sharded("full", window=1))
    tr, batch = sharded(dtype="bfloat16")
    seen: set[torch.dtype] = set()
    tr.teacher.blocks[0].self_attn.q.register_forward_pre_hook(lambda m, _: seen.add(m.weight.dtype))
    out["bf16"] = _run(tr, batch)
    out["bf16_stored"] = {
        (p.to_local() if hasattr(p, "to_local") else p).dtype
        for n, p in tr.teacher.named_parameters()
        if not tr.teacher.keeps_fp32(n)
    }  # (the reference-fp32 modules stay fp32)
    out["bf16_computed"] = seen
    return out


@pytest.mark.slow
def test_fsdp_fake_score_ac_and_bf16_teacher(tmp_path):
    """2 ranks: AC on the sharded fake score and student == no AC (also over a wrapping cache); a
    bf16 teacher is sharded and gathered in bf16 (the CPU policy would upcast it to fp32) and
    lands close to the fp32 run."""
    from dist_utils import run_distributed

    for rank, res in enumerate(run_distributed(_sharded_runs, 2, tmp_path, timeout=120)):
        assert res["full_wrapped"], rank
        for ref, got in (("none", "full"), ("wrap_none", "wrap_full")):
            (ref_logs, ref_critic, ref_student), (logs, critic, student) = res[ref], res[got]
            for a, b in zip(ref_logs, logs):
                for k in a:
                    assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (rank, got, k)
            torch.testing.assert_close(critic, ref_critic, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(student, ref_student, rtol=1e-6, atol=1e-7)
        ref_logs = res["none"][0]
        assert res["bf16_stored"] == res["bf16_computed"] == {torch.bfloat16}, rank
        for a, b in zip(ref_logs, res["bf16"][0]):
            assert b["dmd_loss"] == pytest.approx(a["dmd_loss"], rel=0.1) and b["fake_loss"] == pytest.approx(
                a["fake_loss"], rel=1e-3
            ), rank
