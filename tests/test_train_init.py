"""Starting weights: `train.base_checkpoint` for pretraining (dense, one expert of a two-expert
folder) and action finetuning, and meta-device construction with per-shard loading on 2 ranks.

Every 2-rank case runs in one pair of gloo processes (`two_ranks`, spawned once) to keep the
file fast; the 1-process references run in the pytest process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from safetensors.torch import load_file, save_file

from titan_world.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(name="train_init")]

BASE = [
    "data.height=32",
    "data.width=32",
    "data.synth_episodes=4",
    "data.synth_seconds=1.0",
    "run.wandb=disabled",
    "run.progress=false",
    "train.global_batch=2",
    "train.lr=1e-3",
    "train.warmup_steps=1",
    "train.ckpt_every=0",
    "model.num_layers=2",
    "train.steps=3",
    "train.stages.0.frames=9",
    "train.action_check_episodes=0",
]


def _cfg(root: Path, run: str, *extra: str):
    return load_config(None, [*BASE, f"data.path=synthetic:{root / 'data'}", f"run.dir={root / run}", *extra])


def _random_net(cfg, seed: int):
    """A tiny network with every tensor random (a fresh Wan init has a zero head: its loss would
    not depend on the other weights)."""
    from titan_world.model import build_model

    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Synthetic data + checkpoints: base/ (dense, with the action adapter the tiny default has),
    moe/ (high_noise_model/ + low_noise_model/), noact/ (action-free)."""
    from titan_world.data.loader import prepare_dataset
    from titan_world.model import WanMoE, save_pretrained

    root = tmp_path_factory.mktemp("train_init")
    cfg = _cfg(root, "unused")
    prepare_dataset(cfg, progress=False)
    save_pretrained(_random_net(cfg.model, 1), root / "base")
    save_pretrained(WanMoE(_random_net(cfg.model, 2), _random_net(cfg.model, 3), cfg.model.boundary), root / "moe")
    cfg.model.action.enabled = False
    save_pretrained(_random_net(cfg.model, 4), root / "noact")
    return root


def _metrics(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _exported(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


# ------------------------------------------------------------------------------------------------
# the 2-rank runs (one spawn)
# ------------------------------------------------------------------------------------------------
def _watch_reads(log: list) -> None:
    """Record every tensor read from a checkpoint (name, full rows, rows read) and make reading a
    whole checkpoint (load_pretrained) or materialising an unsharded model fail."""
    from torch.distributed.tensor import DTensor

    import parallel.meta_init as meta_init
    import titan_world.model.io as io

    read = io.WeightFolder.read

    def tracked(self, name, region=None):
        out = read(self, name, region)
        log.append((name, self.shapes()[name][0] if self.shapes()[name] else 1, out.shape[0] if out.ndim else 1))
        return out

    def refuse(*args, **kwargs):
        raise AssertionError("a full checkpoint was read on a rank of a sharded run")

    materialize = meta_init.materialize

    def sharded_only(module, device, read):
        for name, p in module.named_parameters():
            assert p.is_meta and isinstance(p, DTensor), f"{name} is not a sharded meta tensor before materialisation"
        return materialize(module, device, read)

    io.WeightFolder.read = tracked
    io.load_pretrained = refuse
    meta_init.materialize = sharded_only


def _two_rank_jobs(root: Path) -> dict:
    from parallel import init_distributed
    from titan_world.train.loop import Trainer
    from titan_world.train.state import full_state_dict

    rank, _, _ = init_distributed()
    reads: list = []
    _watch_reads(reads)
    out: dict = {"rank": rank}

    def fit(run: str, *extra: str) -> None:
        assert Trainer(_cfg(root, run, *extra)).fit() == 0

    def initial_state(run: str, *extra: str) -> dict:
        trainer = Trainer(_cfg(root, run, *extra))
        try:
            return full_state_dict(trainer.model)
        finally:
            trainer.loader.close()

    fit("two_base", f"train.base_checkpoint={root / 'base'}")
    out["base_reads"] = list(reads)
    fit("two_high", f"train.base_checkpoint={root / 'moe'}", "model.num_experts=2", "train.expert=high")
    reads.clear()
    out["random_init"] = initial_state("two_random", "train.seed=7")
    out["random_reads"] = list(reads)
    out["action_init"] = initial_state(
        "two_action", "train.task=action_finetune", f"train.base_checkpoint={root / 'base'}"
    )
    return out


@pytest.fixture(scope="module")
def two_ranks(root) -> list[dict]:
    return run_distributed(_two_rank_jobs, 2, root, timeout=400)


# ------------------------------------------------------------------------------------------------
# pretraining from a base checkpoint
# ------------------------------------------------------------------------------------------------
def _first_step_matches_checkpoint(root: Path, run: str, reference, *extra: str) -> None:
    """The trainer's weights are the checkpoint's, and its first loss is the one the checkpoint
    model (loaded independently with load_pretrained) gives on the same batch and noise."""
    from parallel import destroy
    from titan_world.train.loop import Trainer

    trainer = Trainer(_cfg(root, run, *extra))
    try:
        got = _state(trainer.model)
        want = _state(reference)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
        batches = [next(trainer.batches) for _ in range(trainer.accum)]
        lo, hi = trainer._sigma_range(None)
        with torch.no_grad():
            expected = sum(float(trainer._micro_loss(reference, b, 0, lo, hi)) for b in batches) / len(batches)
        loss = trainer.train_step(0, batches)["loss"]
        assert loss == pytest.approx(expected, rel=1e-6, abs=0)
    finally:
        trainer.loader.close()
        destroy()


def test_pretrain_starts_from_a_wan_folder(root):
    from titan_world.model import load_pretrained

    _first_step_matches_checkpoint(
        root, "one_step", load_pretrained(root / "base"), f"train.base_checkpoint={root / 'base'}"
    )


def test_pretrain_expert_high_reads_high_noise_model(root):
    from titan_world.model import load_pretrained

    moe = load_pretrained(root / "moe")
    _first_step_matches_checkpoint(
        root,
        "one_step_high",
        moe.high,
        f"train.base_checkpoint={root / 'moe'}",
        "model.num_experts=2",
        "train.expert=high",
    )


def _assert_same_training(got: torch.Tensor, want: torch.Tensor, lr: float, steps: int, what: str) -> None:
    """Equal to 1e-5 except for a handful of elements. AdamW divides each update by its gradient's
    running magnitude, so an element whose gradient is ~0 (and differs in the 7th digit between
    the two reduction orders) can move by up to lr per step differently: measured 1-6 such
    elements per tensor of 16k-98k after 3 steps. A wrong shard would break whole rows
    (>= 128 elements) by the weights' own scale (~0.05)."""
    off = (got - want).abs() > 1e-5 * want.abs() + 1e-6
    assert int(off.sum()) <= max(1, want.numel() // 1000), f"{what}: {int(off.sum())} of {want.numel()} elements differ"
    assert float((got - want).abs().max()) <= 2 * lr * steps, what


def test_one_rank_matches_two_ranks_from_a_base_checkpoint(root, two_ranks):
    """1 process vs 2 FSDP ranks built on meta and shard-loaded: same losses (1e-5) and the same
    exported model (see `_assert_same_training`)."""
    from titan_world.train.loop import train

    for run, extra in (
        ("base", [f"train.base_checkpoint={root / 'base'}"]),
        ("high", [f"train.base_checkpoint={root / 'moe'}", "model.num_experts=2", "train.expert=high"]),
    ):
        assert train(_cfg(root, f"one_{run}", *extra)) == 0
        one, two = _metrics(root / f"one_{run}"), _metrics(root / f"two_{run}")
        assert len(one) == len(two) == 3
        for a, b in zip(one, two):
            assert abs(a - b) <= 1e-5 * abs(a), (run, one, two)
        got, want = _exported(root / f"two_{run}" / "model"), _exported(root / f"one_{run}" / "model")
        assert got.keys() == want.keys()
        for k in want:
            _assert_same_training(got[k], want[k], lr=1e-3, steps=3, what=f"{run}: {k}")


def test_two_ranks_read_only_their_rows(two_ranks):
    """No rank of a sharded run holds a full replica: the model is a sharded meta model when its
    storage is allocated (asserted inside the run), no whole checkpoint is read
    (load_pretrained raises there), and every tensor with more than one row is
    read from the safetensors file as this rank's rows only, adding up to that rank's share."""
    for res in two_ranks:
        reads = res["base_reads"]
        assert reads, "the base checkpoint was not read"
        for name, rows, got in reads:
            if rows > 1:
                assert got <= -(-rows // 2), (name, rows, got)
        assert not res["random_reads"]  # random init reads no checkpoint
    total = {name: rows for name, rows, _ in two_ranks[0]["base_reads"]}
    for name, rows in total.items():  # the two ranks' rows add up to the tensor
        assert sum(got for res in two_ranks for n, _, got in res["base_reads"] if n == name) == rows, name


def test_resume_does_not_read_the_base_checkpoint(root, tmp_path):
    """The run's own checkpoint holds the weights: resuming works after the base folder is gone."""
    import shutil

    from launch.torchrun import EXIT_PREEMPTED
    from titan_world.train.loop import train

    base = shutil.copytree(root / "base", tmp_path / "base")
    args = (f"train.base_checkpoint={base}", "train.export=false")
    run = str(tmp_path / "run")  # (an absolute run name: root / run is run)
    assert train(_cfg(root, run, *args, "train.preempt_at_step=1")) == EXIT_PREEMPTED
    shutil.rmtree(base)
    assert train(_cfg(root, run, *args), resume=True) == 0
    assert len(_metrics(tmp_path / "run")) == 3


# ------------------------------------------------------------------------------------------------
# random initialisation
# ------------------------------------------------------------------------------------------------
def test_random_init_is_identical_on_one_and_two_ranks(root, two_ranks):
    from parallel import destroy
    from titan_world.train.loop import Trainer

    trainer = Trainer(_cfg(root, "one_random", "train.seed=7"))
    try:
        want = _state(trainer.model)
    finally:
        trainer.loader.close()
        destroy()
    got = two_ranks[0]["random_init"]
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert want["blocks.0.ffn.0.weight"].std() > 0 and not want["head.head.weight"].any()  # Wan's init: zero head


# ------------------------------------------------------------------------------------------------
# action finetuning through the same path
# ------------------------------------------------------------------------------------------------
def test_action_finetune_on_two_ranks_starts_at_the_base(root, two_ranks):
    from titan_world.model import load_pretrained
    from titan_world.train.adapter import build_action_model, is_adapter_name

    base = _state(load_pretrained(root / "base"))
    got = two_ranks[0]["action_init"]
    assert any(is_adapter_name(k) for k in base)  # the base has an adapter (the tiny default's)
    for k, v in base.items():
        assert torch.equal(got[k], v), k  # backbone and adapter: the base's weights, continued
    one = _state(build_action_model(_cfg(root, "x").model, str(root / "base")))  # the 1-process path, same seed
    for k in one:
        assert torch.equal(got[k], one[k]), k


def test_pretrain_adds_a_fresh_adapter_to_an_action_free_base(root):
    from parallel import destroy
    from titan_world.model import load_pretrained
    from titan_world.train.loop import Trainer

    trainer = Trainer(_cfg(root, "noact", f"train.base_checkpoint={root / 'noact'}"))  # the tiny default has actions on
    try:
        assert "action adapter" in trainer.weights_note
        state, base = _state(trainer.model), _state(load_pretrained(root / "noact"))
        assert all(torch.equal(state[k], v) for k, v in base.items())
        assert not any(state[k].any() for k in state if ".action_proj." in k)
    finally:
        trainer.loader.close()
        destroy()


# ------------------------------------------------------------------------------------------------
# bad base checkpoints: one clear line, exit 2
# ------------------------------------------------------------------------------------------------
def _edit(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    f = dst / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f))
    return dst


def test_bad_base_checkpoints_name_the_key_and_file(root, tmp_path, capsys):
    from launch.cli import main

    def cli(base: Path, *extra: str) -> str:
        rc = main(
            [
                "train",
                *BASE,
                f"data.path=synthetic:{root / 'data'}",
                f"run.dir={tmp_path / 'run'}",
                f"train.base_checkpoint={base}",
                *extra,
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2, err
        return err

    missing = _edit(root / "base", tmp_path / "missing", lambda s: s.pop("blocks.1.ffn.0.weight"))
    err = cli(missing)
    assert "missing keys: blocks.1.ffn.0.weight" in err and str(missing) in err

    def reshape(s):
        s["blocks.0.self_attn.q.weight"] = s["blocks.0.self_attn.q.weight"][:, :64].contiguous()

    wrong = _edit(root / "base", tmp_path / "wrong", reshape)
    err = cli(wrong)
    assert (
        "blocks.0.self_attn.q.weight: checkpoint (128, 64) in diffusion_pytorch_model.safetensors vs model (128, 128)"
        in err
    )

    err = cli(root / "base", "model.ffn_dim=256")  # config.json disagrees with model.*: before any tensor is read
    assert "train.base_checkpoint=" in err and "config.json: ffn_dim=384 but model.ffn_dim=256" in err
    err = cli(root / "moe")  # a two-expert folder for a dense run with train.expert=all
    assert "train.expert=high|low" in err
    err = cli(root / "base", "model.num_experts=2")  # all experts from a one-network folder
    assert "two-expert folder" in err
    err = cli(tmp_path / "nowhere")
    assert "no such folder" in err
