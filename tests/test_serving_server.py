"""The WebSocket server against real clients on 127.0.0.1: protocol and robustness.

The engine is the FakeEngine test double (fast, deterministic, can be told to be slow or fail);
the real engine behind the same server is exercised in test_serving_engine.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import aiohttp
import numpy as np
import pytest
from PIL import Image
from slurm_cluster import free_port

from serving.config import ServingConfig
from serving.fake_engine import FakeEngine
from serving.server import ServerThread, StreamServer

FPS = 50.0


@contextmanager
def serve(engine: FakeEngine | None = None, **cfg):
    engine = engine or FakeEngine(fps=FPS)
    with ServerThread(StreamServer(engine, ServingConfig(**cfg))) as st:
        yield st


async def next_json(ws, kind: str | None = None, timeout: float = 10.0, **match) -> dict:
    """The next JSON message (of `kind`, with the given fields), skipping frames and others."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        if msg.type == aiohttp.WSMsgType.TEXT:
            data = json.loads(msg.data)
            if (kind is None or data["type"] == kind) and all(data.get(k) == v for k, v in match.items()):
                return data
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            raise AssertionError(f"connection closed while waiting for {kind}: {msg}")


async def frames(ws, n: int, timeout: float = 10.0) -> list[bytes]:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n:
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        if msg.type == aiohttp.WSMsgType.BINARY:
            out.append(msg.data)
        elif msg.type not in (aiohttp.WSMsgType.TEXT,):
            raise AssertionError(f"connection ended: {msg}")
    return out


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def connect(session: aiohttp.ClientSession, st: ServerThread, **kw):
    ws = await session.ws_connect(st.url + "/ws", **kw)
    hello = await next_json(ws, "hello")
    assert hello["protocol"] == 1
    return ws


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_health_page_and_static():
    async def main(st):
        async with aiohttp.ClientSession() as s:
            async with s.get(st.url + "/health") as r:
                h = await r.json()
                assert r.status == 200 and h["status"] == "ok" and h["busy"] is False and h["engine"] == "fake"
            async with s.get(st.url + "/") as r:
                assert r.status == 200 and "<canvas" in await r.text()
            async with s.get(st.url + "/static/app.js") as r:
                assert r.status == 200 and "WebSocket" in await r.text()
            for bad in ("/static/../server.py", "/static/nope.js", "/static/config.py"):
                async with s.get(st.url + bad) as r:
                    assert r.status == 404

    with serve() as st:
        run(main(st))


def test_start_stream_pacing_actions_prompt_reset():
    engine = FakeEngine(fps=FPS)

    async def main(st):
        async with aiohttp.ClientSession() as s:
            ws = await connect(s, st)
            await ws.send_json({"type": "start", "prompt": "a blue lake", "seed": 7})
            started = await next_json(ws, "started")
            assert (started["width"], started["height"], started["frames_per_chunk"]) == (64, 64, 4)
            first = await frames(ws, 1)
            assert Image.open(io.BytesIO(first[0])).size == (64, 64)
            status = await next_json(ws, "status", state="running")
            for key in ("fps", "latency_ms", "queue", "chunk", "stages_ms"):
                assert key in status
            assert set(status["stages_ms"]) >= {"denoise_ms", "kv_refresh_ms", "decode_ms", "jpeg_ms"}
            # paced at the model frame rate (never faster)
            t0 = time.monotonic()
            await frames(ws, 20)
            assert time.monotonic() - t0 >= 19 / FPS * 0.9
            # actions reach the engine
            await ws.send_json({"type": "action", "keys": ["w", "shift"], "mouse": [2.0, 0.0]})
            for _ in range(50):
                await frames(ws, 1)
                if any(a[0, 0] == 1 and a[0, 5] == 1 for a in list(engine.received)):
                    break
            else:
                raise AssertionError("the held keys never reached the engine")
            got = next(a for a in engine.received if a[0, 0] == 1)
            assert got.shape == (4, 8) and float(got[:, 6].sum()) == pytest.approx(2.0)  # mouse spread over the chunk
            # prompt change and reset are applied between chunks and acknowledged
            await ws.send_json({"type": "prompt", "text": "a snowy mountain"})
            ev = await next_json(ws, "status", event="prompt")
            assert ev["prompt"] == "a snowy mountain"
            await ws.send_json({"type": "reset"})
            await next_json(ws, "status", event="reset")
            await ws.send_json({"type": "ping", "t": 5})
            assert (await next_json(ws, "pong"))["t"] == 5
            await ws.close()

    with serve(engine) as st:
        run(main(st))


def test_start_with_image_sends_it_first():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, :32] = (250, 10, 10)

    async def main(st):
        async with aiohttp.ClientSession() as s:
            ws = await connect(s, st)
            await ws.send_json({"type": "start", "prompt": "x", "image": "data:image/png;base64," + png_b64(img)})
            await next_json(ws, "started")
            got = np.asarray(Image.open(io.BytesIO((await frames(ws, 1))[0])))
            assert np.abs(got.astype(int) - img).mean() < 8
            await ws.close()

    with serve() as st:
        run(main(st))


def test_bad_messages_never_close_the_connection():
    huge_dims = io.BytesIO()
    Image.new("L", (5000, 5000)).save(huge_dims, format="PNG")  # small file, 25 MP: a decompression bomb
    cases = [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"no_type": 1}', '"type"'),
        ('{"type": "teleport"}', "unknown message type"),
        ('{"type": "action", "keys": ["w"]}', "before actions"),
        ('{"type": "prompt", "text": "x"}', "no session"),
        ('{"type": "reset"}', "no session"),
        ('{"type": "start", "prompt": 5}', '"prompt" must be'),
        ('{"type": "start", "seed": -1}', '"seed"'),
        ('{"type": "start", "image": "%%%not base64"}', "not valid base64"),
        (json.dumps({"type": "start", "image": base64.b64encode(b"GIF89a garbage").decode()}), "could not be decoded"),
        (
            json.dumps({"type": "start", "image": base64.b64encode(huge_dims.getvalue()).decode()}),
            "pixels are accepted",
        ),
    ]

    async def main(st):
        async with aiohttp.ClientSession() as s:
            ws = await connect(s, st)
            for text, expected in cases:
                await ws.send_str(text)
                err = await next_json(ws, "error")
                assert expected in err["message"], (text, err)
            await ws.send_bytes(b"\x00\x01")
            assert "binary" in (await next_json(ws, "error"))["message"]
            # after all that, the connection still works, and bad actions mid-session too
            await ws.send_json({"type": "start"})
            await next_json(ws, "started")
            for bad in (
                {"type": "action", "keys": "w"},
                {"type": "action", "mouse": [1]},
                {"type": "action", "mouse": [float("nan"), 0]},
            ):
                await ws.send_str(json.dumps(bad))
                await next_json(ws, "error")
            await frames(ws, 3)
            await ws.close()

    with serve() as st:
        run(main(st))


def test_huge_message_closes_that_client_only():
    async def main(st):
        async with aiohttp.ClientSession() as s:
            ws = await connect(s, st)
            await ws.send_str(json.dumps({"type": "start", "prompt": "x" * 20_000}))
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            async with s.get(st.url + "/health") as r:
                assert (await r.json())["status"] == "ok"
            ws2 = await connect(s, st)
            await ws2.send_json({"type": "start"})
            await next_json(ws2, "started")
            await ws2.close()

    with serve(max_message_bytes=10_000) as st:
        run(main(st))


def test_second_client_refused_when_busy_then_served_after():
    async def main(st):
        async with aiohttp.ClientSession() as s:
            a = await connect(s, st)
            await a.send_json({"type": "start"})
            await next_json(a, "started")
            b = await connect(s, st)
            await b.send_json({"type": "start"})
            err = await next_json(b, "error")
            assert "server busy" in err["message"]
            async with s.get(st.url + "/health") as r:
                assert (await r.json())["busy"] is True
            await a.close()
            for _ in range(100):  # the slot is freed once a's in-flight chunk is done
                await b.send_json({"type": "start"})
                msg = await next_json(b)
                if msg["type"] == "started":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the GPU set was never released")
            await b.close()

    with serve(queue_size=0) as st:
        run(main(st))


def test_queued_client_gets_position_and_is_admitted():
    async def main(st):
        async with aiohttp.ClientSession() as s:
            a = await connect(s, st)
            await a.send_json({"type": "start"})
            await next_json(a, "started")
            b = await connect(s, st)
            await b.send_json({"type": "start"})
            q = await next_json(b, "status", state="queued")
            assert q["position"] == 1
            c = await connect(s, st)
            await c.send_json({"type": "start"})
            assert "server busy" in (await next_json(c, "error"))["message"]  # the line holds 1
            status = await next_json(a, "status", state="running")
            assert status["queue"] == 1
            await a.close()
            await next_json(b, "started")
            await frames(b, 2)
            await b.close()
            await c.close()

    with serve(queue_size=1) as st:
        run(main(st))


def test_disconnect_mid_chunk_releases_the_gpu_set():
    engine = FakeEngine(fps=FPS, delay_s=0.3)

    async def main(st):
        async with aiohttp.ClientSession() as s:
            a = await connect(s, st)
            await a.send_json({"type": "start"})
            await next_json(a, "started")
            await asyncio.sleep(0.1)  # a chunk is being generated
            await a.close()
            b = await connect(s, st)
            for _ in range(100):
                await b.send_json({"type": "start"})
                if (await next_json(b))["type"] == "started":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("slot not released after a disconnect")
            await frames(b, 5)
            await b.close()

    with serve(engine) as st:
        run(main(st))


def test_generation_error_stops_only_that_session():
    engine = FakeEngine(fps=FPS, fail_on_chunk=2)

    async def main(st):
        async with aiohttp.ClientSession() as s:
            ws = await connect(s, st)
            await ws.send_json({"type": "start"})
            err = await next_json(ws, "error")
            assert "generation failed" in err["message"] and "RuntimeError" in err["message"]
            await ws.send_json({"type": "start", "prompt": "explode"})  # fails in engine.start
            assert "session stopped" in (await next_json(ws, "error"))["message"]
            await ws.send_json({"type": "start"})  # the same connection can start again
            await next_json(ws, "started")
            await ws.send_json({"type": "prompt", "text": "explode now"})  # a failing prompt keeps streaming
            assert "prompt not applied" in (await next_json(ws, "error"))["message"]
            async with s.get(st.url + "/health") as r:
                assert (await r.json())["status"] == "ok"
            await ws.close()

    with serve(engine) as st:
        run(main(st))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_graceful_shutdown(sig):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "--engine", "fake", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    async def main():
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 45  # the child imports torch: slow on a loaded 2-core box
            while True:
                try:
                    async with s.get(f"http://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
                    await asyncio.sleep(0.05)
            ws = await s.ws_connect(f"http://127.0.0.1:{port}/ws")
            await ws.send_json({"type": "start"})
            await next_json(ws, "started")
            proc.send_signal(sig)
            while True:
                msg = await ws.receive(timeout=10)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    return msg

    try:
        msg = run(main())
        assert msg.type == aiohttp.WSMsgType.CLOSED or msg.data == aiohttp.WSCloseCode.GOING_AWAY
        assert proc.wait(timeout=15) == 0, proc.stdout.read().decode()
        assert b"shutting down" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
