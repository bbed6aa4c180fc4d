"""`make demo` walks through one level: the default data is the demo level, the demo scores held-out
walks through it, and its browser check says when it could not run instead of passing silently."""

from __future__ import annotations

from titan_world.config import load_config
from titan_world.data.synth import make_episode
from titan_world.demo import EVAL_EPISODES, EVAL_SEED, browser_check


def test_the_demo_scores_held_out_walks_through_the_level_it_trains_on():
    d = load_config().data
    assert d.path == "synthetic" and d.synth_level == "demo"
    training = set(range(d.synth_seed, d.synth_seed + d.synth_episodes))
    assert training.isdisjoint(range(EVAL_SEED, EVAL_SEED + EVAL_EPISODES))
    held_out, trained = make_episode(EVAL_SEED, 16, 16, 1.0), make_episode(d.synth_seed, 16, 16, 1.0)
    assert held_out.meta["world"] == trained.meta["world"]


def test_browser_check_without_chromium_is_reported_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium on it
    row = browser_check(tmp_path / "student", tmp_path / "commands.txt")
    assert row["passed"] is None and row["target"].startswith("skipped")
    assert not (tmp_path / "commands.txt").exists()
