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

    import pytest

    from serving.config import ServingConfig
    from serving.engine import EngineError
    from serving.loading import student_settings

    cfg = dataclasses.replace(load_config().model, causal_chunk_frames=3)
    (tmp_path / "posttrain.json").write_text(json.dumps({"chunk_frames": 3, "denoise_steps": [1000, 600, 300]}))
    sc = student_settings(ServingConfig(), cfg, str(tmp_path))
    assert sc.chunk_frames == 3 and sc.sigmas == [1.0, 0.6, 0.3]
    with pytest.raises(EngineError, match=r"serving.sigmas=\[1.0, 0.5\]"):  # not what it was trained for
        student_settings(ServingConfig(sigmas=[1.0, 0.5]), cfg, str(tmp_path))
    mine = student_settings(ServingConfig(sigmas=[1.0, 0.5], force_geometry=True), cfg, str(tmp_path))
    assert mine.sigmas == [1.0, 0.5] and mine.chunk_frames == 3  # forced serving.sigmas win


def test_serve_refuses_a_bidirectional_checkpoint_unless_allowed(tmp_path):
    """`titan-world serve --checkpoint` of a `train` export (bidirectional) is an error naming the
    checkpoint and what is expected, before any weight is read; --allow-bidirectional streams it."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    import pytest

    from serving.engine import EngineError
    from serving.loading import build_engine

    cfg = load_config().model
    save_pretrained(build_model(cfg), tmp_path / "run" / "model")
    save_pretrained(build_model(dataclasses.replace(cfg, causal_chunk_frames=1)), tmp_path / "dmd" / "model")
    small = ["serving.height=32", "serving.width=32"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    serve = [sys.executable, "-m", "serving.cli", "--port", "0"]

    refused = subprocess.run(
        [*serve, "--checkpoint", str(tmp_path / "run"), *small], capture_output=True, text=True, timeout=120, env=env
    )
    assert refused.returncode == 2, refused.stderr
    for expected in (
        str(tmp_path / "run" / "model"),
        "bidirectional",
        "causal_chunk_frames",
        "post-train",
        "runs/demo/dmd/model",
        "--allow-bidirectional",
    ):
        assert expected in refused.stderr, (expected, refused.stderr)

    with pytest.raises(EngineError, match="bidirectional"):
        build_engine(load_config(None, [f"serving.checkpoint={tmp_path / 'run'}", *small]), require_causal=True)
    build_engine(load_config(None, [f"serving.checkpoint={tmp_path / 'dmd'}", *small]), require_causal=True)

    proc = subprocess.Popen(
        [*serve, "--allow-bidirectional", "--checkpoint", str(tmp_path / "run"), *small],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url, lines = None, []
        while url is None:
            line = proc.stderr.readline()
            assert line, "".join(lines)  # the server exited
            lines.append(line)
            url = (m := re.search(r"serve: (http://\S+/)", line)) and m.group(1)
        assert any("streaming it block-causally" in line for line in lines), "".join(lines)
        with urllib.request.urlopen(url + "health", timeout=30) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
