"""The WebSocket server under the faults a demanding client brings (issue 17, server items):
a refused client costs the active stream nothing, messages sent right after `start` are kept,
a reconnect right after a disconnect is admitted, an oversized message closes with 1009.

Real server (ServerThread), real aiohttp client, the FakeEngine test double.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time

import aiohttp
import numpy as np
import pytest
from test_serving_server import FPS, connect, frames, next_json, png_b64, run, serve

import serving.server as server_module
from serving.fake_engine import FakeEngine


@pytest.fixture
def decodes(monkeypatch):
    """Every start image the server decodes: (thread name, image shape), recorded around the real decoder."""
    seen: list[tuple[str, tuple]] = []
    real = server_module.decode_image

    def recording(data, max_pixels):
        image = real(data, max_pixels)
        seen.append((threading.current_thread().name, image.shape))
        return image

    monkeypatch.setattr(server_module, "decode_image", recording)
    return seen


async def messages_until(ws, kind: str, **match) -> list[dict]:
    """Every JSON message up to and including the first of `kind` with the given fields."""
    out = []
    while True:
        msg = await next_json(ws)
        out.append(msg)
        if msg["type"] == kind and all(msg.get(k) == v for k, v in match.items()):
            return out


def test_busy_client_is_refused_before_its_image_is_decoded(decodes):
    image = png_b64(np.full((48, 40, 3), 200, np.uint8))
    undecodable = "data:image/png;base64,R0lGODlhZ2FyYmFnZQ=="  # valid base64, not an image

    async def main(st):
        async with aiohttp.ClientSession() as s:
            a = await connect(s, st)
            await a.send_json({"type": "start"})
            await next_json(a, "started")
            b = await connect(s, st)
            for img in (image, undecodable, image):
                await b.send_json({"type": "start", "image": img})
                assert "server busy" in (await next_json(b, "error"))["message"]
            assert decodes == []  # refused before any decode (the loop never paid for b's images)
            await frames(a, 4)  # the active stream went on
            await a.close()
            await b.send_json({"type": "start", "image": image})  # now admitted: decoded, off the event loop
            await next_json(b, "started")
            await b.close()

    with serve(queue_size=0) as st:
        run(main(st))
    assert decodes == [("titan-image_0", (48, 40, 3))]
    assert all(name != "titan-serve" for name, _ in decodes)  # the event loop's thread


def test_queued_client_image_is_decoded_while_it_waits_and_errors_free_its_place(decodes):
    async def main(st):
        async with aiohttp.ClientSession() as s:
            a = await connect(s, st)
            await a.send_json({"type": "start"})
            await next_json(a, "started")
            b = await connect(s, st)
            await b.send_json({"type": "start", "image": "R0lGODlhZ2FyYmFnZQ=="})
            assert (await next_json(b, "status", state="queued"))["position"] == 1
            assert "could not be decoded" in (await next_json(b, "error"))["message"]
            c = await connect(s, st)  # b's bad image gave its place in line back
            await c.send_json({"type": "start", "image": png_b64(np.zeros((8, 8, 3), np.uint8))})
            assert (await next_json(c, "status", state="queued"))["position"] == 1
            await a.close()
            await next_json(c, "started")
            await c.close()
            await b.close()

    with serve(queue_size=1) as st:
        run(main(st))
    assert [shape for _, shape in decodes] == [(8, 8, 3)]


def hold_event_loop(st, seconds: float) -> None:
    """Keep the server's event loop busy for `seconds` (returns once it is held): messages sent
    meanwhile reach the server together, as a browser's back-to-back sends do."""
    held = threading.Event()

    def hold():
        held.set()
        time.sleep(seconds)

    st.loop.call_soon_threadsafe(hold)
    assert held.wait(10)


async def send_together(st, ws, *msgs: dict) -> None:
    hold_event_loop(st, 0.3)
    for m in msgs:
        await ws.send_str(json.dumps(m))


def test_action_prompt_and_reset_sent_right_after_start_are_applied_in_order():
    engine = FakeEngine(fps=FPS)
    start = {"type": "start", "prompt": "a blue lake"}

    async def main(st):
        async with aiohttp.ClientSession() as s:
            ws = await connect(s, st)
            # no wait for "started": a browser sends its held keys and prompt at once
            action, prompt = {"type": "action", "keys": ["w"]}, {"type": "prompt", "text": "a snowy mountain"}
            await send_together(st, ws, start, action, prompt)
            got = await messages_until(ws, "status", chunk=0)  # commands are applied before a chunk is made
            assert [m for m in got if m["type"] == "error"] == []
            assert [m.get("prompt") for m in got if m.get("event")] == ["a snowy mountain"]
            assert engine.received[0][:, 0].tolist() == [1.0] * 4  # the first chunk already holds "w"
            # a prompt then a reset: the reset wins (it restores the session's first prompt) ...
            await send_together(st, ws, start, {"type": "prompt", "text": "a desert"}, {"type": "reset"})
            got = await messages_until(ws, "status", chunk=0)
            assert [m.get("event") for m in got if m.get("event")] == ["reset"]
            # ... a reset then a prompt applies both
            await send_together(st, ws, start, {"type": "reset"}, {"type": "prompt", "text": "a desert"})
            got = await messages_until(ws, "status", chunk=0)
            assert [m.get("event") for m in got if m.get("event")] == ["reset", "prompt"]
            assert [m for m in got if m["type"] == "error"] == []
            await ws.close()

    with serve(engine) as st:
        run(main(st))


def test_reconnect_right_after_close_is_admitted():
    engine = FakeEngine(fps=FPS, delay_s=0.3)  # a chunk is always in flight when the client leaves

    async def main(st):
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                ws = await connect(s, st)
                await ws.send_json({"type": "start"})
                await next_json(ws, "started")
                await ws.close()
                ws = await connect(s, st)  # at once: no retry loop, no sleep
                await ws.send_json({"type": "start"})
                msg = await next_json(ws)
                assert msg["type"] == "started", msg
                await frames(ws, 2)
                await ws.close()
            async with s.get(st.url + "/health") as r:
                health = await r.json()
            assert health["busy"] is False and health["sessions_total"] == 6

    with serve(engine, queue_size=0) as st:
        run(main(st))


def raw_client_streaming(port: int) -> socket.socket:
    """A bare-socket WebSocket client that has started a session (to vanish without a close frame,
    as a killed browser does)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    payload, mask = b'{"type": "start"}', os.urandom(4)
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    got = b""
    while b'"started"' not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    assert b" 101 " in got.split(b"\r\n", 1)[0]
    return sock


def test_reconnect_right_after_a_client_vanished_is_admitted():
    engine = FakeEngine(fps=FPS, delay_s=0.3)

    async def reconnect(st):
        async with aiohttp.ClientSession() as s:
            ws = await connect(s, st)
            await ws.send_json({"type": "start"})
            msg = await next_json(ws)
            assert msg["type"] == "started", msg
            await ws.close()

    with serve(engine, queue_size=0) as st:
        for _ in range(3):
            raw_client_streaming(st.port).close()  # no close frame: the socket just goes
            run(reconnect(st))


def test_oversized_message_closes_with_1009_and_a_reason():
    async def main(st):
        async with aiohttp.ClientSession() as s:
            ws = await connect(s, st)
            await ws.send_json({"type": "start"})
            await next_json(ws, "started")
            await ws.send_str(json.dumps({"type": "prompt", "text": "x" * 10_000_000}))  # 10 MB
            while True:
                msg = await ws.receive(timeout=20)
                if msg.type != aiohttp.WSMsgType.BINARY and msg.type != aiohttp.WSMsgType.TEXT:
                    break
            assert msg.type == aiohttp.WSMsgType.CLOSE, msg
            assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            assert "message too big" in msg.extra and "4000000 bytes" in msg.extra
            ws2 = await connect(s, st)  # the slot was released with that client
            await ws2.send_json({"type": "start"})
            await next_json(ws2, "started")
            await ws2.close()

    with serve(queue_size=0) as st:
        run(main(st))
