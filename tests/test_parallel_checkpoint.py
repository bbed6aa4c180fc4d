"""DCP checkpoints: resharding across world sizes (1 -> 4 -> 2 -> 1), atomicity and fallback,
keep-last pruning, safetensors export.

Resume tolerance: the two losses after resuming equal the uninterrupted run's to rtol=1e-5,
atol=1e-6 (AdamW state included: the second loss depends on the restored moments).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
from dist_utils import run_distributed
from safetensors.torch import load_file
from test_parallel_harness import ATOL, RTOL, make_model, setup, train_step

from parallel.checkpoint import Checkpointer, CheckpointWarning, export_safetensors, list_checkpoints

SAVE_AT = 2


class Loader:
    """Stands in for a resumable dataloader."""

    def __init__(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.pos = sd["pos"]


def _state(dims):
    model, opt, mesh = setup(dims, optim="adamw")
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.5, total_iters=10)
    state = {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "dataloader": Loader(),
        "curriculum": {"stage": 0, "stage_step": 0},
    }
    return state, mesh


def _step(state, mesh, step: int) -> float:
    loss = train_step(state["model"], state["optimizer"], mesh, step)
    state["scheduler"].step()
    state["dataloader"].pos += 1
    state["curriculum"].update(stage=1, stage_step=step + 1)
    return loss


def train_and_save(dims, run_dir: str) -> dict[str, Any]:
    """SAVE_AT steps, checkpoint, then 2 more steps (the losses a resumed run must reproduce)."""
    state, mesh = _state(dims)
    losses = [_step(state, mesh, s) for s in range(SAVE_AT)]
    Checkpointer(run_dir, keep_last=2).save(SAVE_AT, state)
    rng_after_save = torch.rand(3)
    losses += [_step(state, mesh, s) for s in range(SAVE_AT, SAVE_AT + 2)]
    return {"losses": losses, "rng_after_save": rng_after_save}


def resume(dims, run_dir: str) -> dict[str, Any]:
    state, mesh = _state(dims)
    with torch.no_grad():  # make sure the weights really come from the checkpoint
        for p in state["model"].parameters():
            p.zero_()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        step = Checkpointer(run_dir, keep_last=2).load_latest(state)
    rng = torch.rand(3)
    out = {
        "step": step,
        "lr": state["optimizer"].param_groups[0]["lr"],
        "loader": state["dataloader"].pos,
        "curriculum": dict(state["curriculum"]),
        "rng": rng,
    }
    out["losses"] = [_step(state, mesh, s) for s in range(step, step + 2)]
    return out


def calls_worker(calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    return [globals()[name](**kw) for name, kw in calls]


def _close(a, b, what):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
@pytest.mark.xdist_group("dist")
def test_resharding_1_to_4_to_2_to_1(tmp_path):
    d1, d4 = str(tmp_path / "w1"), str(tmp_path / "w4")
    fsdp_cp = {"dp_shard": 2, "cp": 2}
    ref = train_and_save(None, d1)
    expected_next = ref["losses"][SAVE_AT:]

    # same world (1 -> 1): RNG and everything else restored exactly
    r = resume(None, d1)
    assert r["step"] == SAVE_AT and r["loader"] == SAVE_AT
    assert r["curriculum"] == {"stage": 1, "stage_step": SAVE_AT}
    torch.testing.assert_close(r["rng"], ref["rng_after_save"], rtol=0, atol=0)
    _close(r["losses"], expected_next, "1 -> 1")

    # 1 -> 4, and a fresh 4-rank run that saves
    res4 = run_distributed(
        calls_worker,
        4,
        [("resume", {"dims": fsdp_cp, "run_dir": d1}), ("train_and_save", {"dims": fsdp_cp, "run_dir": d4})],
        timeout=300,
    )
    from_1, saved_4 = res4[0]
    _close(from_1["losses"], expected_next, "1 -> 4")
    _close(saved_4["losses"], ref["losses"], "4-rank run vs 1-process run")
    assert from_1["lr"] == pytest.approx(r["lr"]) and from_1["loader"] == SAVE_AT

    # 4 -> 2 (CP and FSDP layouts)
    res2 = run_distributed(
        calls_worker,
        2,
        [("resume", {"dims": {"cp": 2}, "run_dir": d4}), ("resume", {"dims": {"dp_shard": 2}, "run_dir": d4})],
        timeout=300,
    )
    for got, label in zip(res2[0], ["4 -> 2 (cp)", "4 -> 2 (fsdp)"]):
        assert got["step"] == SAVE_AT and got["curriculum"]["stage_step"] == SAVE_AT
        _close(got["losses"], saved_4["losses"][SAVE_AT:], label)

    # 4 -> 1 (plain module, no process group)
    _close(resume(None, d4)["losses"], saved_4["losses"][SAVE_AT:], "4 -> 1")


# ------------------------------------------------------------------ single-process, fast tests
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))


def _tiny_state():
    m = Tiny()
    return {"model": m, "optimizer": torch.optim.AdamW(m.parameters(), lr=0.1), "extra": {"k": 0}}


def test_partial_and_corrupt_checkpoints_fall_back(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=5)
    state = _tiny_state()
    for step in (1, 2, 3, 4):
        state["extra"]["k"] = step
        ck.save(step, state)
    root = tmp_path / "checkpoints"
    (root / "step_00000004" / "COMPLETE").unlink()  # crashed before the marker
    (root / "step_00000003" / ".metadata").write_bytes(b"\x80garbage")  # corrupt metadata
    (root / "step_00000002" / "__0_0.distcp").write_bytes(b"short")  # truncated shard (size check)
    (root / "step_00000009.tmp").mkdir()  # a save that died before the rename
    fresh = _tiny_state()
    with pytest.warns(CheckpointWarning) as rec:
        assert ck.load_latest(fresh) == 1
    text = " ".join(str(w.message) for w in rec)
    assert "step_00000004" in text and "COMPLETE" in text
    assert "step_00000003" in text and "metadata" in text
    assert "step_00000002" in text
    assert fresh["extra"]["k"] == 1
    # the next save removes the stale .tmp; nothing else goes before 2 valid ones are counted (the
    # broken ones sit between the new save and the only older valid one)
    Checkpointer(tmp_path, keep_last=2).save(5, state)
    assert sorted(p.name for p in root.iterdir()) == [f"step_0000000{i}" for i in (1, 2, 3, 4, 5)]
    # then everything older than the newest 2 valid ones that this code wrote (COMPLETE marker);
    # step 4 has no marker, so it is not provably ours and stays
    Checkpointer(tmp_path, keep_last=2).save(6, state)
    assert [s for s, _ in list_checkpoints(root)] == [6, 5, 4]


def test_no_checkpoint_returns_none(tmp_path):
    assert Checkpointer(tmp_path).load_latest(_tiny_state()) is None


def test_export_safetensors_single_and_sharded(tmp_path):
    """One writer (model.io.save_state_dict): the export loads back with our loader, exactly."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    path = Checkpointer(tmp_path).save(7, {"model": model, "optimizer": opt})
    want = model.state_dict()
    export_safetensors(path, tmp_path / "one", {"dim": 128})
    got = load_file(str(tmp_path / "one" / "diffusion_pytorch_model.safetensors"))
    assert got.keys() == want.keys()  # Wan names, no prefix, no optimizer state
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    export_safetensors(path, tmp_path / "sharded", {"dim": 128}, max_shard_bytes=1 << 20, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want) and len({*index["weight_map"].values()}) > 1
    merged = {}
    for f in {*index["weight_map"].values()}:
        merged.update(load_file(str(tmp_path / "sharded" / f)))
    assert merged.keys() == want.keys() and all(v.dtype == torch.bfloat16 for v in merged.values())
    assert json.loads((tmp_path / "sharded" / "config.json").read_text()) == {"dim": 128}
