"""StreamingEngine on a very tiny causal DiT: determinism, prompts, actions, flat memory."""

from __future__ import annotations

import asyncio
import gc
import io
import math
import warnings

import aiohttp
import numpy as np
import pytest
import torch
from PIL import Image

from serving.actions import ActionAccumulator, ParsedAction
from serving.config import ServingConfig
from serving.engine import EngineError
from serving.server import ServerThread, StreamServer
from serving.streaming import StreamingEngine
from titan_world.config import load_config
from titan_world.data.actions import WALK_SPEED
from titan_world.model import build_model
from titan_world.model.codec import TinyCodec
from titan_world.model.text_encoder import TinyTextEncoder

TINY = ["model.dim=16", "model.ffn_dim=32", "model.num_heads=2", "model.num_layers=2", "model.action.enabled=true"]


def make_engine(**serving) -> StreamingEngine:
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # a fresh model predicts v = 0 (zero head) and ignores actions: wake both up
        torch.nn.init.normal_(model.head.head.weight, std=0.2)
        for block in model.blocks:
            torch.nn.init.normal_(block.action_proj.proj.weight, std=0.2)
    sc = ServingConfig(**{"height": 16, "width": 16, "fps": 16.0, "sink_frames": 1, "window_frames": 2, **serving})
    return StreamingEngine(
        model, TinyCodec(4, cfg.data.codec.channels), TinyTextEncoder(cfg.model.text_dim, cfg.model.text_len), sc
    )


def keys(*names: str, n: int = 4) -> torch.Tensor:
    a = torch.zeros(n, 8)
    for k in names:
        a[:, ["w", "a", "s", "d", "space", "shift"].index(k)] = 1
    return a


def roll(session, actions, chunks: int) -> np.ndarray:
    return np.concatenate([session.step(actions) for _ in range(chunks)])


def test_deterministic_with_seed_and_reset():
    eng = make_engine()
    a = roll(eng.start(None, "a red house", seed=3), keys("w"), 4)
    b_session = eng.start(None, "a red house", seed=3)
    b = roll(b_session, keys("w"), 4)
    assert a.shape == (16, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, roll(eng.start(None, "a red house", seed=4), keys("w"), 4))
    b_session.reset()
    np.testing.assert_array_equal(a, roll(b_session, keys("w"), 4))


def test_set_prompt_changes_the_stream():
    eng = make_engine()
    s1, s2 = eng.start(None, "a red house", 1), eng.start(None, "a red house", 1)
    np.testing.assert_array_equal(s1.step(keys()), s2.step(keys()))
    s2.set_prompt("a snowy mountain at night")
    assert not np.array_equal(s1.step(keys()), s2.step(keys()))


def test_actions_change_the_stream_and_move_the_camera():
    eng = make_engine()
    s1, s2 = eng.start(None, "p", 1), eng.start(None, "p", 1)
    assert not np.array_equal(s1.step(keys("w")), s2.step(keys()))
    z = s1.pose.state.z
    s1.step(keys("w"))
    assert s1.pose.state.z - z == pytest.approx(4 * WALK_SPEED / 16.0)  # the synthetic world's kinematics
    yaw = s1.pose.state.yaw
    turn = torch.zeros(4, 8)
    turn[:, 6] = 1.0
    s1.step(turn)
    assert s1.pose.state.yaw - yaw == pytest.approx(4 * math.radians(120.0) / 16.0)


def test_start_from_image_and_video():
    eng = make_engine()
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    s = eng.start(img, "p", 0)
    np.testing.assert_allclose(s.first_frames()[0].astype(int), img.astype(int), atol=1)  # shown as given
    assert s.cache.committed_frames == 1
    video = np.stack([img] * 5)  # 1 + 4 frames -> 2 latent frames written clean
    s = eng.start(video, "p", 0)
    assert s.cache.committed_frames == 2 and s.first_frames().shape == (5, 16, 16, 3)
    assert s.step(keys()).shape == (4, 16, 16, 3)
    with pytest.raises(EngineError):
        eng.start(np.zeros((16, 16), np.uint8), "p", 0)


@pytest.mark.parametrize(
    "opts", [{"chunk_frames": 2}, {"kv_refresh": "last_step"}, {"sampler": "euler", "denoise_steps": 2}]
)
def test_options(opts):
    eng = make_engine(**opts)
    frames = eng.start(None, "p", 0).step(keys("d"))
    assert frames.shape == (eng.frames_per_chunk, 16, 16, 3)


def test_bad_options_are_refused():
    with pytest.raises(EngineError, match="sigmas"):
        make_engine(sigmas=[0.5, 0.9])
    with pytest.raises(EngineError, match="height"):
        make_engine(height=20)


def _live_tensors() -> tuple[int, int]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        ts = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(ts), sum(t.numel() * t.element_size() for t in ts)


def test_memory_is_flat_over_1000_chunks():
    eng = make_engine(window_frames=2, denoise_steps=2)
    s = eng.start(None, "p", 0)
    a = keys("w")
    for _ in range(10):
        s.step(a)
    k_ptr, v_ptr, k_obj = s.cache.k.data_ptr(), s.cache.v.data_ptr(), s.cache.k
    state_10, live_10 = s.state_bytes(), _live_tensors()
    for i in range(990):
        s.step(a if i % 3 else keys("a"))
    assert s.cache.committed_frames == 1 + 1000  # the image frame + one latent frame per chunk
    assert s.cache.k is k_obj and (s.cache.k.data_ptr(), s.cache.v.data_ptr()) == (k_ptr, v_ptr)
    assert s.state_bytes() == state_10
    assert _live_tensors() == live_10  # same number of live tensors, same total bytes


def test_real_engine_behind_the_server():
    """End to end: the StreamingEngine streams JPEG frames through the WebSocket server."""
    eng = make_engine()

    async def main(url):
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(url + "/ws") as ws:
                await ws.send_json({"type": "start", "prompt": "a red house", "seed": 1})
                await ws.send_json({"type": "action", "keys": ["w"], "mouse": [0.5, 0]})
                got, statuses = [], []
                while len(got) < 9 or not statuses:
                    msg = await ws.receive(timeout=20)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        got.append(msg.data)
                    elif '"status"' in msg.data:
                        statuses.append(msg.json())
                return got, statuses

    with ServerThread(StreamServer(eng, eng.cfg)) as st:
        got, statuses = asyncio.run(asyncio.wait_for(main(st.url), 60))
    assert all(Image.open(io.BytesIO(b)).size == (16, 16) for b in got)
    assert statuses[0]["stages_ms"]["denoise_ms"] > 0


def test_action_accumulator_spreads_and_caps_mouse():
    acc = ActionAccumulator()
    acc.update(ParsedAction(["w"], (1.0, 0.5)))
    acc.update(ParsedAction(["w", "shift"], (1.0, 0.0)))
    a = acc.take(4)
    assert a[:, 0].tolist() == [1] * 4 and a[:, 5].tolist() == [1] * 4 and a[:, 1].sum() == 0
    assert a[:, 6].sum().item() == pytest.approx(2.0) and a[:, 7].sum().item() == pytest.approx(0.5)
    assert acc.take(4)[:, 6].sum() == 0  # mouse consumed, keys still held
    acc.update(ParsedAction([], (1e9, 0)))
    assert acc.take(4)[:, 6].max().item() == 1.0  # at most one max-turn per frame


def test_stream_decode_equals_one_decode_of_the_session_with_the_wan_vae(tmp_path):
    """With a (tiny, random) Wan VAE the session's frames are those of one decode of all its
    latents: the causal decoder's memory is carried from chunk to chunk. A chunk after a gap (an
    earlier one never decoded) restarts the decoder from the latent before it."""
    from test_model_codec import tiny_wan_vae

    from titan_world.model.codec import ContextStreamDecoder, WanVAECodec, video_to_frames

    tiny_wan_vae(tmp_path / "vae")
    vae = WanVAECodec(str(tmp_path / "vae"))
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.nn.init.normal_(model.head.head.weight, std=0.2)
    sc = ServingConfig(height=32, width=32, fps=16.0, chunk_frames=2, sink_frames=1, window_frames=2)
    eng = StreamingEngine(model, vae, TinyTextEncoder(cfg.model.text_dim, cfg.model.text_len), sc)
    session = eng.start(None, "a red house", seed=1)
    chunks = [session.denoise(keys("w", n=8)) for _ in range(3)]
    frames = np.concatenate([session.decode(c) for c in chunks])
    assert frames.shape == (24, 32, 32, 3)
    latents = torch.cat([session.start_latents] + [c.payload.latents for c in chunks], dim=2)
    whole = video_to_frames(vae.decode(latents))[0][1:]  # frame 0: the start image's latent
    assert np.abs(frames.astype(int) - whole.astype(int)).max() <= 1
    gap = [session.denoise(keys("w", n=8)) for _ in range(2)]
    after_gap = session.decode(gap[1])  # gap[0] is never decoded
    restart = ContextStreamDecoder(vae)
    restart.decode(gap[0].payload.latents[:, :, -1:])
    expected = video_to_frames(restart.decode(gap[1].payload.latents))[0]
    assert np.abs(after_gap.astype(int) - expected.astype(int)).max() <= 1
