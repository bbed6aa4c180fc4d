"""Post-training with Ulysses context parallelism on 2 real gloo ranks (`parallel.cp=2`) against
one process, both stages, GAN head on.

With cp=2 and one data-parallel group the two ranks read the same clips and draw the same noise
as a single process; each runs every pass on half of the tokens and attends over half of the
heads (the rollout's KV cache holds those heads only). The run must be the one-process run:
  - causal (block-causal mask, per-frame timesteps; also with a sequence padded to split) and DMD
    (self-rollout through the KV cache, teacher and fake scores, GAN head over the gathered features of
    tapped blocks) give the same losses and gradient norms (every step clips, so the norms are checked
    through their use), and export the same student — with FSDP2 over the CP ranks and with full replicas;
  - a preempted CP run resumes with the uninterrupted losses;
  - a frame whose tokens do not split over the CP ranks is refused with the keys to change.
Tiny sizes: 32x32 video (16 tokens per latent frame), 2 student sigmas, 2-chunk rollouts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from posttrain_runs import COMMON, records, save_teacher, weights

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(name="posttrain_cp")]

DMD_STEPS = 3
ODD = ["data.height=24", "data.width=24"]  # 3x3 = 9 tokens per latent frame: not divisible by 2


def _cfg(tmp: Path, run: str, *extra: str):
    from titan_world.config import load_config

    teacher = tmp / "teacher"
    data = tmp / ("data24" if "data.height=24" in extra else "data")
    return load_config(
        None,
        [
            f"run.dir={tmp / run}",
            f"data.path=synthetic:{data}",
            f"posttrain.teacher={teacher}",
            f"posttrain.student={teacher}",
            *COMMON,
            *extra,
        ],
    )


def one_process(tmp: Path) -> None:
    from titan_world.posttrain.loop import CausalJob, DMDJob

    assert CausalJob(_cfg(tmp, "causal-1", "train.steps=2")).fit() == 0
    assert CausalJob(_cfg(tmp, "causal-odd-1", *ODD, "train.steps=2")).fit() == 0
    assert DMDJob(_cfg(tmp, "dmd-1", f"train.steps={DMD_STEPS}")).fit() == 0


def two_cp_ranks(tmp: Path) -> dict:
    from parallel.distributed import init_distributed
    from titan_world.exit_codes import EXIT_PREEMPTED
    from titan_world.posttrain.loop import CausalJob, DMDJob

    init_distributed()
    cp = "parallel.cp=2"
    job = CausalJob(_cfg(tmp, "causal-cp", cp, "train.steps=2"))
    out = {"dp": (job.dp_rank, job.dp_size), "cp_size": job.cp.size}
    assert job.fit() == 0
    assert (
        CausalJob(_cfg(tmp, "causal-odd-cp", cp, *ODD, "train.steps=2")).fit() == 0
    )  # the sequence is padded to 28 tokens
    assert DMDJob(_cfg(tmp, "dmd-cp", cp, f"train.steps={DMD_STEPS}")).fit() == 0
    assert DMDJob(_cfg(tmp, "dmd-cp-replicas", cp, "posttrain.fsdp=false", f"train.steps={DMD_STEPS}")).fit() == 0
    assert (
        DMDJob(_cfg(tmp, "dmd-cut", cp, f"train.steps={DMD_STEPS}", "train.preempt_at_step=2")).fit() == EXIT_PREEMPTED
    )
    assert DMDJob(_cfg(tmp, "dmd-cut", cp, f"train.steps={DMD_STEPS}"), resume=True).fit() == 0
    odd = DMDJob(_cfg(tmp, "dmd-odd", cp, *ODD, "train.steps=1"))
    try:
        odd.fit()
    except ValueError as e:
        out["odd_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from titan_world.data.loader import prepare_dataset

    tmp = tmp_path_factory.mktemp("posttrain_cp")
    save_teacher(tmp / "teacher")
    prepare_dataset(_cfg(tmp, "data"), progress=False)
    prepare_dataset(_cfg(tmp, "data24", *ODD), progress=False)
    run_distributed(one_process, 1, tmp, timeout=300)
    ranks = run_distributed(two_cp_ranks, 2, tmp, timeout=300)
    return tmp, ranks


DMD_KEYS = ["fake_loss", "d_loss", "dmd_loss", "g_loss", "critic_grad_norm", "student_grad_norm"]


@pytest.mark.parametrize(
    "ref,run,keys",
    [
        ("causal-1", "causal-cp", ["loss", "grad_norm"]),
        ("causal-odd-1", "causal-odd-cp", ["loss", "grad_norm"]),
        ("dmd-1", "dmd-cp", DMD_KEYS),
        ("dmd-1", "dmd-cp-replicas", DMD_KEYS),
    ],
)
def test_cp_matches_one_process(runs, ref, run, keys):
    tmp, ranks = runs
    assert all(r["dp"] == (0, 1) and r["cp_size"] == 2 for r in ranks), (
        "both ranks are one CP group of one data-parallel rank"
    )
    want, got = records(tmp / ref), records(tmp / run)
    assert [r["step"] for r in got] == [r["step"] for r in want] and len(want) >= 2
    for a, b in zip(want, got):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (run, a["step"], k)
    full, cp = weights(tmp / ref / "model"), weights(tmp / run / "model")
    assert full.keys() == cp.keys()
    for k in full:  # atol: 1% of one lr step (AdamW with beta1 = 0 turns rounding near eps into up to lr)
        torch.testing.assert_close(cp[k], full[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{run} {k}: {m}")
    teacher = weights(tmp / "teacher")
    assert max(float((full[k] - teacher[k]).abs().max()) for k in full) > 1e-4, "the stage must move the student"


def test_cp_resume_reproduces_uninterrupted_losses(runs):
    tmp, _ = runs
    full, cut = records(tmp / "dmd-cp"), records(tmp / "dmd-cut")
    assert [r["step"] for r in cut] == list(range(DMD_STEPS))
    for a, b in zip(full, cut):
        for k in DMD_KEYS:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)


def test_frame_tokens_not_divisible_by_cp_is_refused(runs):
    _, ranks = runs
    for r in ranks:
        msg = r.get("odd_error", "")
        assert "parallel.cp=2" in msg and "3x3 = 9 tokens" in msg and "data.height/width" in msg, msg


def test_bad_meshes_are_refused_before_launch(tmp_path, capsys):
    from launch.cli import main
    from titan_world.config import ConfigError
    from titan_world.posttrain.loop import check_mesh

    with pytest.raises(ConfigError, match=r"parallel.cp=2: one process has no context parallelism"):
        check_mesh(_cfg(tmp_path, "x", "parallel.cp=2"), 1)
    # 3 ranks do not factor into CP groups of 2: refused by the CLI, no rank is started
    assert main(["post-train", "dmd", "--nproc", "3", "parallel.cp=2", f"run.dir={tmp_path / 'y'}"]) == 2
    assert "world_size=3 is not divisible" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
