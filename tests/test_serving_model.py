"""The serving fps model (benchmarks/serving_model.py) reproduces the passes it was calibrated on
and behaves as its assumptions say (more GPUs: faster, less than linearly; levers help)."""

from __future__ import annotations

import pytest

from benchmarks.serving_model import MEASURED, SHAPES, Geometry, chunk_seconds, main


@pytest.mark.parametrize("name", ["1.3B", "14B"])
def test_reproduces_the_measured_passes(name):
    seconds, layers = MEASURED[name]
    g = Geometry()
    full = chunk_seconds(name, g, 1)
    assert full / (g.passes * SHAPES[name][3]) == pytest.approx(seconds / layers, rel=1e-9)


def test_scaling_and_levers():
    g = Geometry()
    one, four, eight = (chunk_seconds("14B", g, p) for p in (1, 4, 8))
    assert one > four > eight
    assert one / four < 4 and four / eight < 2  # the host cost and the all-to-alls do not shrink
    assert chunk_seconds("14B", g, 4, graphs=True) < four and chunk_seconds(
        "14B", g, 4, graphs=True, fp8=True
    ) < chunk_seconds("14B", g, 4, graphs=True)
    assert chunk_seconds("14B", Geometry(clean_refresh=True), 1) == pytest.approx(one * 5 / 4)
    with pytest.raises(ValueError, match="12 heads"):
        chunk_seconds("1.3B", g, 8)


def test_cli_prints_the_table(capsys):
    assert main(["--gpus", "1", "4"]) == 0
    out = capsys.readouterr().out
    assert "14B" in out and "a model, not a measurement" in out
