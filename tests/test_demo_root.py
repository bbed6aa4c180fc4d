"""`python -m titan_world.demo --fresh` deletes only a folder the demo created (it once removed any --root)."""

from __future__ import annotations

import pytest

from titan_world.demo import DEMO_MARKER, main


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_a_folder_the_demo_did_not_create_is_refused_and_untouched(tmp_path, fresh):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(SystemExit, match="did not create"):
        main(["--root", str(tmp_path), *fresh])
    assert (tmp_path / "mine.txt").read_text() == "user data" and not (tmp_path / DEMO_MARKER).exists()
