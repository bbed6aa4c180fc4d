"""`titan-world eval vbench|compare|report` on a folder of small mp4 files; files written."""

from __future__ import annotations

import json

import numpy as np

from launch.cli import main
from titan_world.eval.report import write_action_report
from titan_world.eval.video_io import write_video


def _videos(d, n=2, t=48, fps=8):
    rng = np.random.default_rng(0)
    for i in range(n):
        v = np.clip(128 + np.cumsum(rng.integers(-3, 4, (t, 16, 24, 3)), 0), 0, 255).astype(np.uint8)
        write_video(d / f"clip{i}.mp4", v, fps)


def test_cli_vbench_compare_report(tmp_path, capsys):
    vids = tmp_path / "vids"
    _videos(vids)
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "vbench",
            "--videos",
            str(vids),
            "--out",
            str(out),
            "--window-seconds",
            "2",
            "--dimensions",
            "temporal_flickering,dynamic_degree",
            "--raft-path",
            str(tmp_path / "raft.pt"),
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["videos"]) == {"clip0.mp4", "clip1.mp4"}
    tf = res["dimensions"]["temporal_flickering"]
    assert tf["status"] == "ok" and 0 < tf["mean"] < 1 and len(tf["window_mean"]["mean"]) == 3
    assert res["dimensions"]["dynamic_degree"]["status"] == "skipped"
    assert res["settings"]["window_seconds"] == 2.0
    for f in ("report.md", "report.html", "plots/filmstrip.png", "plots/windows_temporal_flickering.png"):
        assert (out / f).is_file(), f
    assert "skipped" in capsys.readouterr().out

    rc = main(
        ["eval", "compare", str(out), str(out / "results.json"), "--names", "a", "b", "--out", str(tmp_path / "cmp")]
    )
    assert rc == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "0.6683" in md and "| a |" in md and "| b |" in md
    assert "| vbench |" in md and "clip-averaged" in md and "not directly comparable" in md
    assert (tmp_path / "cmp" / "plots" / "compare.png").is_file()
    assert main(["eval", "report", "--results", str(out / "results.json"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()


def test_cli_errors(tmp_path, capsys):
    assert main(["eval", "vbench", "--videos", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "vbench", "--videos", str(tmp_path), "--dimensions", "bogus"]) == 2
    _videos(tmp_path, n=1)
    assert main(["eval", "vbench", "--videos", str(tmp_path), "--generate", str(tmp_path / "no_ckpt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_generate_then_score(tmp_path, capsys):
    from titan_world.config import load_config
    from titan_world.model import build_model, save_pretrained

    save_pretrained(build_model(load_config().model), tmp_path / "ckpt")
    out = tmp_path / "gen"
    assert (
        main(
            [
                "eval",
                "vbench",
                "--videos",
                str(out),
                "--generate",
                str(tmp_path / "ckpt"),
                "--dimensions",
                "temporal_flickering",
            ]
        )
        == 0
    )
    assert len(list(out.glob("*.mp4"))) == 4
    assert "temporal_flickering" in capsys.readouterr().out
    # --prompts for generation: a JSON table keeps its file names, a text file one prompt per line;
    # either way the clips' prompts land in VIDEOS/prompts.json, which scoring reads
    table = tmp_path / "prompts.json"
    table.write_text(json.dumps({"car.mp4": "a red car", "sea.mp4": "a calm sea"}))
    lines = tmp_path / "prompts.txt"
    lines.write_text("a red car\n\na calm sea\n")
    for prompts, names in ((table, ["car.mp4", "sea.mp4"]), (lines, ["sample_000.mp4", "sample_001.mp4"])):
        gen = tmp_path / prompts.suffix[1:]
        args = [
            "eval",
            "vbench",
            "--videos",
            str(gen),
            "--generate",
            str(tmp_path / "ckpt"),
            "--prompts",
            str(prompts),
            "--dimensions",
            "temporal_flickering",
        ]
        assert main(args) == 0, capsys.readouterr().err
        assert sorted(p.name for p in gen.glob("*.mp4")) == names
        assert json.loads((gen / "prompts.json").read_text()) == dict(zip(names, ["a red car", "a calm sea"]))
    # scoring alone needs the JSON table: a text file is refused with the format spelled out
    assert (
        main(
            [
                "eval",
                "vbench",
                "--videos",
                str(tmp_path / "txt"),
                "--prompts",
                str(lines),
                "--dimensions",
                "temporal_flickering",
            ]
        )
        == 2
    )
    assert 'expected {"name.mp4": "prompt"}' in capsys.readouterr().err


def test_action_report_files(tmp_path):
    from titan_world.eval.action_following import action_following_report

    rng = np.random.default_rng(0)
    sim = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    rep = action_following_report(sim, sim, context_frames=2)
    files = write_action_report(rep, tmp_path, frames={"simulator": sim, "generated": sim})
    data = json.loads(files["json"].read_text())
    assert data["frame_error"]["model"]["psnr"] == 100.0  # capped, JSON-safe
    assert (tmp_path / "plots" / "psnr_over_time.png").is_file()
    assert (tmp_path / "plots" / "action_filmstrip.png").is_file()
    assert main(["eval", "report", "--results", str(files["json"]), "--out", str(tmp_path / "r2")]) == 0


def test_truncated_video_is_reported_and_the_rest_scored(tmp_path, capsys):
    """Issue 17 T2: one truncated mp4 used to abort the run after the others were scored, writing nothing."""
    vids = tmp_path / "vids"
    _videos(vids, n=3)
    bad = vids / "clip1.mp4"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # cut mid-file: the moov atom is lost
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "vbench",
            "--videos",
            str(vids),
            "--out",
            str(out),
            "--window-seconds",
            "0",
            "--dimensions",
            "temporal_flickering",
        ]
    )
    assert rc == 1  # results written, but a partial evaluation does not exit 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["videos"]) == {"clip0.mp4", "clip2.mp4"}
    assert set(res["failed_videos"]) == {"clip1.mp4"}
    assert "cannot decode" in res["failed_videos"]["clip1.mp4"]["reason"]
    assert res["dimensions"]["temporal_flickering"]["num_videos"] == 2
    err = capsys.readouterr().err
    assert "clip1.mp4 not scored" in err and "cannot decode" in err
    assert "clip1.mp4" in (out / "report.md").read_text()
