"""Checkpoints and `convert` never lose data and never load something silently wrong (issue 17).

Each test is a fault a user hits: a flipped byte in a checkpoint file (W7/T1), a config that no
longer matches the checkpoint (W2), a save that would prune the only fallback (D3), a full disk
(T3, on a real 2 MB tmpfs), `convert` picking the oldest checkpoint (W1) or replacing a folder
(D2).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from dist_utils import run_distributed

from launch.cli import main
from parallel.checkpoint import (
    Checkpointer,
    DiskFullError,
    file_checksum,
    list_checkpoints,
    validate_checkpoint,
)
from titan_world.model import save_pretrained
from titan_world.model.io import CheckpointError


class Net(nn.Module):
    def __init__(self, layers: int = 2, width: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))


def _state(layers: int = 2, width: int = 4, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = Net(layers, width)
    return {"model": m, "optimizer": torch.optim.AdamW(m.parameters(), lr=0.1), "extra": {"k": 0}}


def _save_steps(run_dir: Path, steps, keep_last: int = 5) -> dict:
    state = _state()
    ck = Checkpointer(run_dir, keep_last=keep_last)
    for step in steps:
        state["extra"]["k"] = step
        with torch.no_grad():
            state["model"].blocks[0].weight.fill_(float(step))
        ck.save(step, state)
    return state


def _flip_byte(path: Path, at: int | None = None) -> None:
    """Same-size corruption: one byte inverted in the middle of the file."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _load_quietly(ck: Checkpointer, state: dict) -> tuple[int | None, str]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        step = ck.load_latest(state)
    return step, " ".join(str(w.message) for w in rec)


# ------------------------------------------------------------------ latest(): the contract
def test_latest_none_only_without_checkpoints_and_error_when_none_valid(tmp_path):
    ck = Checkpointer(tmp_path)
    assert ck.latest() is None
    _save_steps(tmp_path, [1, 2])
    assert ck.latest() == ck.path_for(2)
    root = tmp_path / "checkpoints"
    (root / "step_00000002" / "COMPLETE").unlink()
    _flip_byte(root / "step_00000001" / "__0_0.distcp")
    with pytest.raises(CheckpointError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Checkpointer(tmp_path).latest()
    text = str(info.value)
    assert "step_00000002" in text and "no COMPLETE marker" in text
    assert "step_00000001" in text and "__0_0.distcp" in text and "corrupt" in text
    assert [s for s, _ in list_checkpoints(root)] == [2, 1]  # nothing deleted


# ------------------------------------------------------------------ W7 / T1: same-size corruption
@pytest.mark.parametrize("name", ["__0_0.distcp", "state.pt", "rank_00000.pt", ".metadata"])
def test_same_size_corruption_is_detected_and_falls_back(tmp_path, name):
    _save_steps(tmp_path, [1, 2])
    newest = tmp_path / "checkpoints" / "step_00000002"
    marker = json.loads((newest / "COMPLETE").read_text())
    digest = file_checksum(newest / name)
    _flip_byte(newest / name)
    assert (newest / name).stat().st_size == marker["sizes"][name]  # the size check cannot see it
    reason = validate_checkpoint(newest)
    assert name in reason and ("corrupt" in reason or "unreadable" in reason)  # (.metadata may not even parse)
    fresh = _state(seed=1)
    step, said = _load_quietly(Checkpointer(tmp_path), fresh)
    assert step == 1 and fresh["extra"]["k"] == 1
    assert torch.all(fresh["model"].blocks[0].weight == 1.0)
    assert "step_00000002" in said and name in said
    assert marker["checksums"][name] == digest


@pytest.mark.parametrize("name", ["state.pt", "rank_00000.pt", "__0_0.distcp"])
def test_load_failure_without_checksums_names_the_file_and_falls_back(tmp_path, name):
    """A checkpoint written before checksums were stored (or a failure checksums cannot see):
    the load error names the file, and the previous checkpoint is loaded."""
    _save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        marker_path = tmp_path / "checkpoints" / f"step_0000000{step}" / "COMPLETE"
        marker = json.loads(marker_path.read_text())
        marker.pop("checksums", None)
        marker_path.write_text(json.dumps(marker))
    _flip_byte(tmp_path / "checkpoints" / "step_00000002" / name, at=0)  # its header: unreadable
    fresh = _state(seed=1)
    ck = Checkpointer(tmp_path)
    step, said = _load_quietly(ck, fresh)
    assert step == 1 and fresh["extra"]["k"] == 1 and ck.loaded_from == ck.path_for(1)
    assert name in said and "step_00000002" in said and "falling back" in said
    assert "no checksums" in said  # the old checkpoints load, with a note


def _save_two_ranks(run_dir: str) -> dict:
    from parallel import init_distributed

    init_distributed()
    state = _state()
    Checkpointer(run_dir).save(1, state)
    with torch.no_grad():
        state["model"].blocks[0].weight.fill_(2.0)
    path = Checkpointer(run_dir).save(2, state)
    files = sorted(p.name for p in path.iterdir())
    # corrupt a file that rank 1 verifies (names are split over the ranks): both ranks fall back
    corrupt = Path(run_dir) / "corrupt"
    corrupt.mkdir(exist_ok=True)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (corrupt / "rank_00000.pt").write_bytes((path / "rank_00000.pt").read_bytes())
        _flip_byte(path / "rank_00000.pt")
    torch.distributed.barrier()
    step, said = _load_quietly(Checkpointer(run_dir), _state(seed=1))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:  # put it back for the single-process part of the test
        (path / "rank_00000.pt").write_bytes((corrupt / "rank_00000.pt").read_bytes())
    return {"files": files, "step": step, "said": said}


@pytest.mark.slow
@pytest.mark.xdist_group("dist")
def test_two_rank_save_checksums_every_rank_file(tmp_path):
    ranks = run_distributed(_save_two_ranks, 2, str(tmp_path), timeout=120)
    assert [r["step"] for r in ranks] == [1, 1] and "rank_00000.pt is corrupt" in ranks[0]["said"]
    files = ranks[0]["files"]
    newest = tmp_path / "checkpoints" / "step_00000002"
    marker = json.loads((newest / "COMPLETE").read_text())
    expected = {"__0_0.distcp", "__1_0.distcp", "rank_00000.pt", "rank_00001.pt", "state.pt", ".metadata"}
    assert expected <= set(files) and set(marker["checksums"]) == set(files) - {"COMPLETE"}
    for name, digest in marker["checksums"].items():
        assert digest == file_checksum(newest / name), name
    _flip_byte(newest / "__1_0.distcp")  # rank 1's shard
    fresh = _state(seed=1)
    step, said = _load_quietly(Checkpointer(tmp_path), fresh)
    assert step == 1 and "__1_0.distcp" in said
    assert not torch.all(fresh["model"].blocks[0].weight == 2.0)


# ------------------------------------------------------------------ W2: config mismatch
def test_resume_with_fewer_layers_names_the_keys_and_does_not_fall_back(tmp_path):
    four = _state(layers=4)
    ck = Checkpointer(tmp_path)
    ck.save(1, four)
    ck.save(2, four)
    two = _state(layers=2, seed=1)
    before = {k: v.clone() for k, v in two["model"].state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        Checkpointer(tmp_path).load_latest(two)
    text = str(info.value)
    assert "step_00000002" in text and "unexpected keys" in text
    assert "blocks.2.weight" in text and "blocks.3.bias" in text
    assert "config differs" in text
    for k, v in two["model"].state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing loaded

    wide = _state(layers=4, width=8)
    mis_shaped = r"mis-shaped keys: blocks\.0\.weight: checkpoint \(4, 4\) vs model \(8, 8\)"
    with pytest.raises(CheckpointError, match=mis_shaped):
        Checkpointer(tmp_path).load(tmp_path / "checkpoints" / "step_00000001", wide)


# ------------------------------------------------------------------ D3: pruning
def test_save_never_prunes_newer_or_unmarked_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    _save_steps(tmp_path, [5, 6])
    _flip_byte(root / "step_00000005" / "__0_0.distcp")
    (root / "step_00000006" / "state.pt").write_bytes(b"short")  # both newer ones broken
    user = root / "step_00000000"  # not written by the platform (no marker)
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    state = _state()
    ck = Checkpointer(tmp_path, keep_last=1)
    with pytest.raises(CheckpointError), warnings.catch_warnings():  # the run refuses to resume ...
        warnings.simplefilter("ignore")
        ck.latest()
    # ... and even a run that saves anyway (a fresh start at step 1 and 2) deletes none of them
    ck.save(1, state)
    ck.save(2, state)
    assert [s for s, _ in list_checkpoints(root)] == [6, 5, 2, 0]
    assert (user / "notes.txt").read_text() == "mine"


def test_resumed_run_keeps_checkpoints_above_its_step(tmp_path):
    """Resumed from step 3 (4 and 5 exist): saving step 4 replaces 4 but never deletes 5, even
    with keep_last=1; older ones go only once keep_last valid ones at or below the step exist."""
    root = tmp_path / "checkpoints"
    _save_steps(tmp_path, [3, 4, 5], keep_last=5)
    Checkpointer(tmp_path, keep_last=1).save(4, _state())
    assert [s for s, _ in list_checkpoints(root)] == [5, 4]
    assert validate_checkpoint(root / "step_00000004") is None


# ------------------------------------------------------------------ T3: disk full
def test_disk_full_during_save_is_clear_and_keeps_the_previous_checkpoint(tiny_fs):
    state = _state(layers=1, width=300)  # ~1.1 MB per checkpoint (weights + two AdamW moments)
    ck = Checkpointer(tiny_fs / "run", keep_last=2)
    first = ck.save(1, state)
    with pytest.raises(DiskFullError) as info:
        ck.save(2, state)
    text = str(info.value)
    assert text.startswith("no space left on tmpfs") and "step_00000002.tmp" in text
    assert re.search(r"checkpoint needs ~1\.\d\d MB, \d+\.\d\d kB free\)", text), text
    assert info.value.errno == 28
    assert sorted(p.name for p in (tiny_fs / "run" / "checkpoints").iterdir()) == ["step_00000001"]
    assert validate_checkpoint(first) is None
    fresh = _state(layers=1, width=300, seed=1)
    assert Checkpointer(tiny_fs / "run").load_latest(fresh) == 1


# ------------------------------------------------------------------ W1 / D2: convert
def _run_with_config(tmp_path: Path) -> Path:
    from titan_world.config import load_config, save_config

    run = tmp_path / "run"
    _save_steps(run, [1, 2, 3])
    save_config(load_config(), run / "config.yaml")
    return run


def test_convert_to_safetensors_exports_the_newest_checkpoint(tmp_path, capsys):
    from safetensors.torch import load_file

    run = _run_with_config(tmp_path)
    assert main(["convert", "--to", "safetensors", str(run), str(tmp_path / "out")]) == 0
    assert "step_00000003" in capsys.readouterr().out
    weights = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    assert torch.all(weights["blocks.0.weight"] == 3.0)
    # a corrupt newest one is skipped (and named), not exported
    _flip_byte(run / "checkpoints" / "step_00000003" / "__0_0.distcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["convert", "--to", "safetensors", str(run), str(tmp_path / "out2")]) == 0
    weights = load_file(str(tmp_path / "out2" / "diffusion_pytorch_model.safetensors"))
    assert torch.all(weights["blocks.0.weight"] == 2.0)
    # and a corrupt step folder named directly is refused, naming the file
    step_dir = run / "checkpoints" / "step_00000003"
    assert main(["convert", "--to", "safetensors", str(step_dir), str(tmp_path / "out3")]) == 2
    assert "__0_0.distcp is corrupt" in capsys.readouterr().err and not (tmp_path / "out3").exists()


def _wan_folder(path: Path) -> Path:
    from titan_world.model import WanDiT
    from titan_world.model.config import ModelConfig

    cfg = ModelConfig(
        name="t",
        model_type="t2v",
        dim=32,
        ffn_dim=64,
        num_heads=2,
        num_layers=1,
        in_dim=4,
        out_dim=4,
        text_dim=8,
        text_len=4,
    )
    save_pretrained(WanDiT(cfg), path)
    return path


def test_convert_refuses_to_replace_a_non_empty_destination(tmp_path, capsys):
    src = _wan_folder(tmp_path / "wan")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "thesis.txt").write_text("three years")
    assert main(["convert", "--to", "diffusers", str(src), str(dst)]) == 2
    assert "not empty" in capsys.readouterr().err and (dst / "thesis.txt").read_text() == "three years"
    assert main(["convert", "--from", "diffusers", str(src), str(dst)]) == 2
    assert (dst / "thesis.txt").read_text() == "three years"
    assert [p.name for p in tmp_path.iterdir() if ".convert-" in p.name] == []  # no temp left behind
    # never onto the source, a folder holding it, or the current directory, even with --overwrite
    for target in (src, tmp_path, Path(".")):
        assert main(["convert", "--to", "diffusers", str(src), str(target), "--overwrite"]) == 2
        assert "refusing" in capsys.readouterr().err
    assert (src / "config.json").is_file()
    # --overwrite says what it replaces; a second run replaces its own output quietly
    assert main(["convert", "--to", "diffusers", str(src), str(dst), "--overwrite"]) == 0
    assert "1 file(s)" in capsys.readouterr().err and not (dst / "thesis.txt").exists()
    assert (dst / ".titan-world-convert.json").is_file() and (dst / "config.json").is_file()
    assert main(["convert", "--to", "diffusers", str(src), str(dst)]) == 2
    assert "earlier convert output" in capsys.readouterr().err
    assert main(["convert", "--to", "diffusers", str(src), str(dst), "--overwrite"]) == 0
    assert "earlier convert output" in capsys.readouterr().err


def test_convert_safetensors_file_output_is_not_replaced(tmp_path):
    run = _run_with_config(tmp_path)
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"someone else's weights")
    assert main(["convert", "--to", "safetensors", str(run), str(out)]) == 2
    assert out.read_bytes() == b"someone else's weights"
    assert main(["convert", "--to", "safetensors", str(run), str(out), "--overwrite"]) == 0
    assert out.stat().st_size > 100 and not [p for p in tmp_path.iterdir() if ".convert-" in p.name]
