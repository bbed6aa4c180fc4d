"""Side by side with the official `vbench` 0.1.5 code (issue 19): the same videos, the same seeded
random networks of the official architectures, the official per-dimension functions and ours in
one process; per-video values must agree (docs/eval.md, "Parity with the official code")."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import vbench_official as vo

from titan_world.eval import dimensions as D
from titan_world.eval import official_models
from titan_world.eval.config import EvalConfig
from titan_world.eval.vbench import colour_for, run_vbench
from titan_world.eval.video_io import read_video

# name -> (frames, fps, kind, H, W). RAFT's and AMT-S's 4-level correlation pyramids need >= 128 px
# (padded) per side (a 1-px level divides by zero in their samplers); 128x150 also exercises both padders.
SPECS = {
    "untagged-0.mp4": (10, 24, "yuv420p", 128, 150),  # dynamic degree samples every 3rd frame at 24 fps,
    "bt709-0.mp4": (13, 30, "bt709", 128, 150),  # every 4th at 30 fps
    "rgb-0.mp4": (9, 24, "rgb", 128, 150),
    "two-0.mp4": (2, 8, "yuv420p", 128, 150),  # 8 fps: both frames sampled, one pair, count needed 0
    "three-0.mp4": (3, 30, "bt709", 128, 150),
}
FACTORIES = "titan_world.eval.official_models:"
WIDE = {"wide-0.mp4": (3, 24, "bt709", 360, 640)}  # imaging quality's resize (longer side 640 > 512)


@pytest.fixture(scope="module")
def official():
    return vo.official()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("parity_videos")
    out = {}
    for i, (name, (t, fps, kind, h, w)) in enumerate({**SPECS, **WIDE}.items()):
        out[name] = vo.make_video(d / name, vo.moving_frames(t, h, w, shift=1 + i % 3, seed=i), fps, kind)
    return out


def _ours(paths, dims, **cfg_fields):
    cfg = dataclasses.replace(EvalConfig(), dimensions=dims, window_seconds=0, **cfg_fields)
    res = run_vbench(list(paths), cfg)
    assert not res["failed_videos"]
    return {n: r["scores"] for n, r in res["videos"].items()}


def _by_name(video_results):
    return {Path(r["video_path"]).name: r["video_results"] for r in video_results}


def test_decoders_match_opencv_and_decord(official, videos):
    """bt601 = OpenCV's VideoCapture frames, tagged = decord's, on untagged, BT.709 and RGB files."""
    import cv2
    import decord

    for name, path in videos.items():
        cap, cv_frames = cv2.VideoCapture(str(path)), []
        while (got := cap.read())[0]:
            cv_frames.append(cv2.cvtColor(got[1], cv2.COLOR_BGR2RGB))
        ours601, fps = read_video(path, "bt601")
        np.testing.assert_array_equal(ours601, np.stack(cv_frames), err_msg=name)
        assert fps == cap.get(cv2.CAP_PROP_FPS)
        vr = decord.VideoReader(str(path), num_threads=1)
        np.testing.assert_array_equal(
            read_video(path, "tagged")[0], vr.get_batch(range(len(vr))).asnumpy(), err_msg=name
        )
    bt709_601, bt709_tag = read_video(videos["bt709-0.mp4"], "bt601")[0], read_video(videos["bt709-0.mp4"])[0]
    assert np.abs(bt709_601.astype(int) - bt709_tag).max() > 5  # the two conversions really differ there


def test_temporal_flickering(official, videos):
    want = _by_name(official.tf.temporal_flickering([str(p) for p in videos.values()])[1])
    got = _ours(videos.values(), ["temporal_flickering"])
    for name in videos:
        assert got[name]["temporal_flickering"] == pytest.approx(want[name], abs=1e-6), name


def test_dynamic_degree(official, videos, tmp_path):
    raft = vo.write_raft(tmp_path / "raft-things.pth")
    paths = {n: p for n, p in videos.items() if n in SPECS}
    from easydict import EasyDict

    dd = official.dd.DynamicDegree(EasyDict({"model": str(raft), **vo.RAFT_ARGS}), "cpu")
    recorded: dict[str, list[float]] = {name: [] for name in paths}  # each pair's magnitude, official run
    want = _by_name(official.dd.dynamic_degree(_Recorder(dd, recorded), [str(p) for p in paths.values()])[1])
    factory = official_models.raft(str(raft))
    for name, path in paths.items():
        frames, fps = read_video(path, colour_for("dynamic_degree"))
        mags = D.dynamic_degree_magnitudes(frames, fps, factory, batch_size=4)
        assert np.isfinite(mags).all() and len(mags) == len(recorded[name]), name
        np.testing.assert_allclose(mags, recorded[name], atol=1e-5, rtol=0, err_msg=name)
    assert [len(recorded[n]) for n in paths] == [3, 3, 2, 1, 0]
    assert want["two-0.mp4"] and not want["three-0.mp4"]  # VBench's quirks: 1 pair moves, 0 pairs static
    got = _ours(paths.values(), ["dynamic_degree"], raft_path=str(raft), raft_factory=FACTORIES + "raft")
    assert {n: s["dynamic_degree"] for n, s in got.items()} == {n: float(v) for n, v in want.items()}


class _Recorder:
    """Passes the official DynamicDegree.infer through, recording what its get_score returns per video."""

    def __init__(self, dd, recorded):
        self.dd, self.recorded = dd, recorded

    def infer(self, video_path):
        scores, official_get_score = self.recorded[Path(video_path).name], type(self.dd).get_score

        def get_score(img, flo):
            scores.append(official_get_score(self.dd, img, flo))
            return scores[-1]

        self.dd.get_score = get_score
        return self.dd.infer(video_path)


def test_motion_smoothness(official, videos, tmp_path):
    amt = vo.write_amt(tmp_path / "amt-s.pth")
    paths = {n: p for n, p in videos.items() if n in SPECS}
    ms = official.ms.MotionSmoothness(vo.amt_config(), str(amt), "cpu")
    with pytest.raises(AssertionError, match="more than one"):
        ms.motion_score(str(paths.pop("two-0.mp4")))
    want = _by_name(official.ms.motion_smoothness(ms, [str(p) for p in paths.values()])[1])
    got = _ours(paths.values(), ["motion_smoothness"], amt_path=str(amt), amt_factory=FACTORIES + "amt")
    assert (
        "motion_smoothness"
        not in _ours([videos["two-0.mp4"]], ["motion_smoothness"], amt_path=str(amt), amt_factory=FACTORIES + "amt")[
            "two-0.mp4"
        ]
    )
    for name in paths:
        assert 0.3 < want[name] < 1.0, (name, want[name])  # a real interpolation, not NaN frames
        assert got[name]["motion_smoothness"] == pytest.approx(want[name], abs=1e-6), name


def test_overall_consistency(official, videos, tmp_path):
    """Includes the BT.709 file (decord follows its tag), uint8 resize, test=True, the 640x360 clip."""
    ckpt = vo.write_viclip(tmp_path / "ViClip-InternVid-10M-FLT.pth")
    model = vo.viclip_factory(str(ckpt)).eval()
    prompts = {name: f"a scene number {i} panning right" for i, name in enumerate(videos)}
    info = [{"prompt": prompts[n], "video_list": [str(p)]} for n, p in videos.items()]
    want = _by_name(official.oc.overall_consistency(model, info, vo.viclip_tokenizer(), "cpu")[1])
    table = tmp_path / "prompts.json"
    table.write_text(__import__("json").dumps(prompts))
    got = _ours(
        videos.values(),
        ["overall_consistency"],
        viclip_path=str(ckpt),
        prompts=str(table),
        viclip_factory="vbench_official:viclip_factory",
    )
    for name in videos:  # exact here; the 1e-4 would let a float (not uint8) resize pass (~7e-5 off)
        assert got[name]["overall_consistency"] == pytest.approx(want[name], abs=1e-6), name
    # deterministic: the official path with test=False drops 90 % of tokens at random
    frames = torch.zeros(1, 8, 3, 224, 224)
    assert torch.equal(model.encode_vision(frames, test=True), model.encode_vision(frames, test=True))
    # the shipped factory builds VBench's class from the same file (here at the tiny size the test can afford)
    # with the BPE vocabulary found beside the checkpoint
    shutil.copy(official.cache_dir / "ViCLIP" / "bpe_simple_vocab_16e6.txt.gz", tmp_path)
    official_class, tiny = sys.modules["vbench.third_party.ViCLIP.viclip"].ViCLIP, vo.tiny_viclip_class()
    full_size = official_class.build_vision_encoder, official_class.build_text_encoder
    official_class.build_vision_encoder = tiny.build_vision_encoder
    official_class.build_text_encoder = tiny.build_text_encoder
    try:
        shipped = official_models.viclip(str(ckpt))
    finally:
        official_class.build_vision_encoder, official_class.build_text_encoder = full_size
    frames = torch.rand(1, 8, 3, 224, 224)
    assert torch.equal(shipped.encode_vision(frames, test=True), model.encode_vision(frames, test=True))
    assert torch.equal(shipped.encode_text("a red house"), model.encode_text("a red house"))


def test_imaging_quality(official, videos, tmp_path):
    """MUSIQ (SPAQ head layout) on every frame; the 640x360 clip takes VBench's 'longer' resize to 512x288."""
    ckpt = vo.write_musiq(tmp_path / "musiq_spaq_ckpt-358bb6af.pth")
    model = official.musiq.MUSIQ(pretrained_model_path=str(ckpt), **vo.TINY_MUSIQ)
    model.training = False  # exactly what VBench's compute_imaging_quality sets
    videos = {n: videos[n] for n in ("bt709-0.mp4", "rgb-0.mp4", "two-0.mp4", "wide-0.mp4")}  # time: a subset
    want = _by_name(official.iq.technical_quality(model, [str(p) for p in videos.values()], "cpu")[1])
    got = _ours(videos.values(), ["imaging_quality"], musiq_path=str(ckpt), musiq_factory=FACTORIES + "musiq")
    for name in videos:  # VBench stores per-video MOS 0..100 and divides only the mean; we store /100
        assert got[name]["imaging_quality"] == pytest.approx(want[name] / 100, abs=1e-6), name


def test_aesthetic_quality(official, videos, tmp_path):
    """The official compute_aesthetic_quality end to end (clip.load of an OpenAI-format file, LAION head)
    against ours reading the same two files (OpenAI CLIP -> transformers conversion)."""
    clip_file = vo.write_openai_clip(tmp_path / "ViT-L-14.pt")
    head = vo.write_aesthetic_head(tmp_path / "aesthetic_model" / "emb_reader")
    info = vo.info_json(tmp_path / "info.json", videos.values(), "aesthetic_quality")
    _, results = official.aq.compute_aesthetic_quality(info, "cpu", [str(clip_file), str(head.parent)])
    want = _by_name(results)
    got = _ours(videos.values(), ["aesthetic_quality"], clip_path=str(clip_file), aesthetic_head_path=str(head))
    for name in videos:
        assert got[name]["aesthetic_quality"] == pytest.approx(want[name], abs=1e-6), name


def test_aesthetic_quality_fp16(official, videos, tmp_path):
    """aesthetic_dtype=float16 = VBench's CLIP on a GPU (clip.load keeps convert_weights' fp16 there);
    run here on CPU with the official fp16 model: agreement to fp16 rounding."""
    clip_file = vo.write_openai_clip(tmp_path / "ViT-L-14.pt")
    head = vo.write_aesthetic_head(tmp_path / "emb_reader")
    model = official.clip_model.build_model(torch.jit.load(str(clip_file)).state_dict()).eval()  # fp16, as on GPU
    assert model.dtype == torch.float16
    name, path = "untagged-0.mp4", videos["untagged-0.mp4"]
    _, res = official.aq.laion_aesthetic(official.aq.get_aesthetic_model(str(head.parent)), model, [str(path)], "cpu")
    half = _ours(
        [path],
        ["aesthetic_quality"],
        clip_path=str(clip_file),
        aesthetic_head_path=str(head),
        aesthetic_dtype="float16",
    )[name]["aesthetic_quality"]
    full = _ours([path], ["aesthetic_quality"], clip_path=str(clip_file), aesthetic_head_path=str(head))[name]
    assert half == pytest.approx(res[0]["video_results"], abs=2e-3)
    assert half != full["aesthetic_quality"]  # really ran in fp16


def test_vbench_long_custom_mode(official, tmp_path):
    """The official split (int(fps) * 2 frames, last clip extended backwards, short video whole,
    decord read, torchvision re-encode) and the clip-averaged temporal flickering.

    The re-encode (libx264 with its default frame threads) is not bit-reproducible from run to run
    — the official code's own clips differ by a level here and there between two runs — so clips
    are compared to x264 noise and the clip-averaged score to 1e-3 (measured: up to ~5e-5)."""
    from titan_world.eval.long_video import clip_ranges, split_long_video

    assert clip_ranges(70, 26) == [(0, 26), (26, 52), (44, 70)] and clip_ranges(20, 48) == [(0, 20)]
    long = {  # 13.6 fps: int() gives 13 (26-frame clips), round() would give 14
        "long-0.mp4": vo.make_video(tmp_path / "long-0.mp4", vo.moving_frames(70, 64, 96, seed=7), 13.6),
        "long709-0.mp4": vo.make_video(tmp_path / "long709-0.mp4", vo.moving_frames(55, 64, 96, seed=8), 24, "bt709"),
        "short-0.mp4": vo.make_video(tmp_path / "short-0.mp4", vo.moving_frames(20, 64, 96, seed=9), 24),
    }
    want = {}
    for name, path in long.items():
        clip_dir = Path(official.long_utils.split_video_into_clips(str(path), str(tmp_path / "official"), duration=2))
        theirs = sorted(clip_dir.glob("*.mp4"))
        ours, _, _ = split_long_video(path, tmp_path / "ours" / name)
        assert len(ours) == len(theirs), name
        for a, b in zip(ours, theirs):
            fa, fb = read_video(a)[0], read_video(b)[0]
            assert fa.shape == fb.shape and np.abs(fa.astype(int) - fb).mean() < 2, f"{name} {a.name}"
        clip_scores = _by_name(official.tf.temporal_flickering([str(c) for c in theirs])[1])
        want[name] = float(np.mean(list(clip_scores.values())))
    assert [len(list((tmp_path / "ours" / n).glob("*.mp4"))) for n in long] == [3, 2, 1]
    got = _ours(long.values(), ["temporal_flickering"], protocol="vbench-long")
    for name in long:
        assert got[name]["temporal_flickering"] == pytest.approx(want[name], abs=1e-3), name
