"""Without --checkpoint, serving finds the demo's causal student, never a bidirectional model."""

from __future__ import annotations

import dataclasses

from serving.loading import find_demo_student
from titan_world.config import load_config
from titan_world.model import build_model, save_pretrained


def test_find_demo_student_picks_the_causal_export(tmp_path):
    cfg = load_config().model
    assert find_demo_student(tmp_path / "missing") is None
    save_pretrained(build_model(cfg), tmp_path / "train" / "model")
    assert find_demo_student(tmp_path) is None
    student_cfg = dataclasses.replace(cfg, causal_chunk_frames=1)
    save_pretrained(build_model(student_cfg), tmp_path / "dmd" / "model")
    assert find_demo_student(tmp_path) == tmp_path / "dmd" / "model"
