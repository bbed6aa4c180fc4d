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


def test_student_is_served_with_its_trained_chunk_and_timesteps(tmp_path):
    import json

    from serving.config import ServingConfig
    from serving.loading import student_settings

    cfg = dataclasses.replace(load_config().model, causal_chunk_frames=3)
    (tmp_path / "posttrain.json").write_text(json.dumps({"chunk_frames": 3, "denoise_steps": [1000, 600, 300]}))
    sc = student_settings(ServingConfig(chunk_frames=1), cfg, str(tmp_path))
    assert sc.chunk_frames == 3 and sc.sigmas == [1.0, 0.6, 0.3]
    mine = student_settings(ServingConfig(chunk_frames=3, sigmas=[1.0, 0.5]), cfg, str(tmp_path))
    assert mine.sigmas == [1.0, 0.5]  # explicit serving.sigmas win
