"""`titan-world serve` of a model trained on the synthetic world starts in that world: the start
image (shown by the page before Start, served at /start) is a held-out episode's first frame and
the default prompt its caption. A model trained on real data keeps the configured defaults."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import aiohttp
import numpy as np
from PIL import Image

from serving.cli import SYNTHETIC_START_SEED, start_defaults, start_image, synthetic_start
from serving.config import ServingConfig
from serving.fake_engine import FakeEngine
from serving.server import ServerThread, StreamServer
from titan_world.config import load_config, save_config
from titan_world.data.synth import make_episode


class RecordingEngine(FakeEngine):
    """The fake engine, remembering what each session was started from."""

    def __init__(self):
        super().__init__(fps=50.0)
        self.starts: list[tuple[np.ndarray | None, str]] = []

    def start(self, image, prompt, seed=None):
        self.starts.append((image, prompt))
        return super().start(image, prompt, seed)


def run_dir(tmp_path, data_path: str):
    cfg = load_config(None, ["data.height=32", "data.width=32", f"data.path={data_path}", "data.synth_seconds=1.0"])
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    return run


async def fetch_start_and_start_a_session(url: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/start") as r:
            assert r.status == 200
            defaults = await r.json()
        async with s.ws_connect(url + "/ws") as ws:
            await ws.send_json({"type": "start"})  # no image, no prompt: the server's defaults
            while True:
                msg = await ws.receive(timeout=10)
                if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "started":
                    break
    return defaults


def test_synthetic_world_model_starts_in_its_world(tmp_path):
    run = run_dir(tmp_path, "synthetic")
    sc, start = start_defaults(load_config(), ServingConfig(), str(run / "model"))
    ep = make_episode(SYNTHETIC_START_SEED, 32, 32, seconds=1.0, fps=16)
    np.testing.assert_array_equal(start.c2w[0], ep.c2w[0])  # sessions start at its camera, in its level
    assert start.world is not None
    engine = RecordingEngine()
    with ServerThread(StreamServer(engine, sc, start_image(engine, start))) as st:
        defaults = asyncio.run(fetch_start_and_start_a_session(st.url))
    png = base64.b64decode(defaults["image"].removeprefix("data:image/png;base64,"))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), ep.frames[0])
    assert defaults["prompt"] == ep.captions["narrative"] != ServingConfig.default_prompt
    started_image, started_prompt = engine.starts[0]
    np.testing.assert_array_equal(started_image, ep.frames[0])
    assert started_prompt == ep.captions["narrative"]


def test_dataset_marker_says_synthetic_and_real_data_keeps_the_defaults(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "titan_dataset.json").write_text(json.dumps({"source": "synthetic", "episodes": 4}))
    run = run_dir(tmp_path, str(data))
    _, start = start_defaults(load_config(), ServingConfig(), str(run))  # a run dir, not its model/
    assert start is not None

    (data / "titan_dataset.json").write_text(json.dumps({"source": "video", "episodes": 4}))
    sc, start = start_defaults(load_config(), ServingConfig(), str(run))
    assert start is None and sc.default_prompt == ServingConfig.default_prompt
    engine = RecordingEngine()
    with ServerThread(StreamServer(engine, sc, start_image(engine, start))) as st:
        defaults = asyncio.run(fetch_start_and_start_a_session(st.url))
    assert defaults == {"prompt": ServingConfig.default_prompt, "image": None}
    assert engine.starts[0][0] is None and engine.starts[0][1] == ServingConfig.default_prompt


def test_start_image_is_rendered_at_the_stream_size(tmp_path):
    run = run_dir(tmp_path, "synthetic")
    _, start = start_defaults(load_config(), ServingConfig(height=48, width=40), str(run / "model"))
    np.testing.assert_array_equal(
        start.frames[0], make_episode(SYNTHETIC_START_SEED, 48, 40, seconds=1.0, fps=16).frames[0]
    )


def test_an_explicit_default_prompt_is_kept(tmp_path):
    run = run_dir(tmp_path, "synthetic")
    sc, start = start_defaults(load_config(), ServingConfig(default_prompt="a brick maze"), str(run / "model"))
    assert start is not None and sc.default_prompt == "a brick maze"


def test_start_episode_is_held_out_of_training():
    cfg = load_config(
        None,
        [
            "data.height=32",
            "data.width=32",
            "data.synth_seconds=1.0",
            "data.synth_seed=5000",
            "data.synth_episodes=6000",
        ],
    )  # training used seeds 5000..10999, the default among them
    start = synthetic_start(cfg)
    ep = make_episode(11_000, 32, 32, seconds=1.0, fps=16)
    np.testing.assert_array_equal(start.frames[0], ep.frames[0])
    assert start.captions["narrative"] == ep.captions["narrative"]
