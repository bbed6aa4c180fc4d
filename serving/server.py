"""The WebSocket server: `/` (browser page), `/ws` (the stream), `/health`, `/start` (the default start).

One engine = one GPU set = one active session; other clients wait in a bounded line or are
refused (`Admission`) before any expensive work is done for them. Generation runs on a single
worker thread (the GPU set), decode + JPEG on a second one, start images are decoded on a third,
so the event loop only moves bytes: chunk N is decoded and sent while chunk N+1 is denoised. At
most `send_buffer_chunks` chunks exist between "denoise started" and "fully sent", which bounds
both memory and the action-to-screen latency. Frames go out paced at the model frame
rate. No client message, engine error or disconnect can stop the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures as cf
import io
import itertools
import json
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web
from PIL import Image

from serving.actions import ActionAccumulator, ActionError, parse_action
from serving.admission import Admission, Busy
from serving.config import ServingConfig
from serving.engine import Chunk, Engine, EngineError, Session

log = logging.getLogger("titan_world.serving")
PROTOCOL_VERSION = 1
MAX_PROMPT_CHARS = 2000
STATIC_DIR = resources.files("serving") / "static"


# After closing an oversized message with 1009, the socket stays open (reading and discarding) until
# the client closes it, at most this long: see `WebSocket`.
OVERSIZE_LINGER_S = 3.0


class ClientError(ValueError):
    """A bad client message; answered with {"type": "error"} and the connection stays open."""


class WebSocket(web.WebSocketResponse):
    """aiohttp's WebSocketResponse, except for a message over `max_msg_size`: aiohttp sends 1009
    and closes the socket at once, with the rest of the message unread, so the kernel resets the
    connection and the client sees 1006 instead of the close frame. Here the close frame carries a
    reason, and the socket is closed by `linger` once the client has closed it (aiohttp discards
    what still arrives) or after OVERSIZE_LINGER_S."""

    def __init__(self, *, max_msg_size: int, **kwargs: Any):
        super().__init__(max_msg_size=max_msg_size, **kwargs)
        self.limit = max_msg_size
        self.too_big = False

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG:  # aiohttp's reader found a message over the limit
            self.too_big = True
            message = message or f"message too big: at most {self.limit} bytes".encode()
        return await super().close(code=code, message=message, drain=drain)

    def _close_transport(self) -> None:  # aiohttp's (private) hook; pinned by test_serving_server_faults
        if not self.too_big:
            super()._close_transport()

    async def linger(self, request: web.Request, seconds: float = OVERSIZE_LINGER_S) -> None:
        """After a 1009: wait (at most `seconds`) for the client to close the socket."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while request.transport is not None and not request.transport.is_closing() and loop.time() < deadline:
            await asyncio.sleep(0.02)


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: Any, max_pixels: int) -> np.ndarray:
    """base64 (optionally a data: URL) PNG/JPEG/WebP -> uint8 [H, W, 3]; ClientError when bad."""
    if not isinstance(data, str):
        raise ClientError('"image" must be a base64 string (PNG or JPEG), optionally a data: URL')
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError('"image" is not valid base64') from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > max_pixels:
                raise ClientError(f"image is {im.width}x{im.height}; at most {max_pixels} pixels are accepted")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except ClientError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise ClientError(f"image could not be decoded ({type(e).__name__}); send a PNG or JPEG") from None


@dataclass
class StartRequest:
    prompt: str
    image: str | None  # still encoded: decoded off the event loop once the client is admitted or in line
    seed: int | None


def parse_start(msg: dict, cfg: ServingConfig) -> StartRequest:
    """The cheap checks only; the image is decoded later (`StreamServer.decode_start_image`)."""
    prompt = msg.get("prompt", cfg.default_prompt)
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        raise ClientError(f'"prompt" must be a string of at most {MAX_PROMPT_CHARS} characters')
    seed = msg.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ClientError('"seed" must be a non-negative integer')
    image = msg.get("image")
    if image is not None and not isinstance(image, str):
        raise ClientError('"image" must be a base64 string (PNG or JPEG), optionally a data: URL')
    return StartRequest(prompt or cfg.default_prompt, image or None, seed)


class Connection:
    """One WebSocket client: parses its messages and, once admitted, streams its session."""

    _ids = itertools.count(1)

    def __init__(self, server: StreamServer, ws: web.WebSocketResponse):
        self.server, self.ws, self.cfg = server, ws, server.cfg
        self.id = next(self._ids)
        self.actions = ActionAccumulator()
        self.task: asyncio.Task | None = None
        # idle | starting (accepted, not yet admitted) | queued | running; actions, prompts and
        # resets are kept from "starting" on, so those sent right after a start are not lost
        self.state = "idle"
        self.pending_prompt: str | None = None
        self.pending_reset = False
        self._send_lock = asyncio.Lock()
        self._sent_times: deque[float] = deque(maxlen=64)

    # ---- sending -------------------------------------------------------------------------
    async def send_json(self, obj: dict) -> None:
        if self.ws.closed:
            return
        try:
            async with self._send_lock:
                await self.ws.send_str(json.dumps(obj))
        except (ConnectionError, RuntimeError):
            pass  # the client went away; the reader loop ends the connection

    async def send_error(self, message: str) -> None:
        await self.send_json({"type": "error", "message": message})

    async def send_frame(self, jpeg: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(jpeg)
        self._sent_times.append(time.perf_counter())

    def measured_fps(self) -> float:
        t = self._sent_times
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0

    # ---- receiving -----------------------------------------------------------------------
    async def handle_text(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ClientError("message is not valid JSON") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ClientError('message must be a JSON object with a string "type"')
        kind = msg["type"]
        if kind == "start":
            await self.on_start(parse_start(msg, self.cfg))
        elif kind == "action":
            if self.state == "idle":
                raise ClientError('no session: send {"type": "start"} before actions')
            self.actions.update(parse_action(msg))
        elif kind == "prompt":
            text_ = msg.get("text")
            if not isinstance(text_, str) or not text_ or len(text_) > MAX_PROMPT_CHARS:
                raise ClientError(f'"text" must be a non-empty string of at most {MAX_PROMPT_CHARS} characters')
            if self.state == "idle":
                raise ClientError('no session: send {"type": "start"} before a prompt change')
            self.pending_prompt = text_
        elif kind == "reset":
            if self.state == "idle":
                raise ClientError('no session: send {"type": "start"} first')
            self.pending_reset = True
            self.pending_prompt = None  # the reset restores the first prompt: an earlier change is undone
        elif kind == "stop":
            await self.stop()
            await self.send_json({"type": "status", "state": "idle"})
        elif kind == "ping":
            await self.send_json({"type": "pong", "t": msg.get("t")})
        else:
            raise ClientError(f"unknown message type {kind!r}; expected start, action, prompt, reset, stop or ping")

    async def on_start(self, req: StartRequest) -> None:
        await self.stop()  # a new start replaces this client's session (and keeps no slot)
        self.actions.clear()
        self.pending_prompt, self.pending_reset = None, False
        self.state = "starting"  # before the task runs: the next message may already be an action
        self.task = asyncio.create_task(self._run(req), name=f"session-{self.id}")

    async def stop(self) -> None:
        """End this client's session (if any), wait for the GPU worker, release the GPU set."""
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
            except Exception:  # already reported by _run
                pass

    # ---- the session ---------------------------------------------------------------------
    async def _run(self, req: StartRequest) -> None:
        srv = self.server
        started: cf.Future | None = None  # engine.start on the GPU worker; its session is closed on release
        error: str | None = None
        try:
            try:
                admitted = srv.admission.request(self)  # first: a refused client costs nothing
            except Busy as e:
                await self.send_error(str(e))
                return
            if not admitted.done():
                self.state = "queued"
                await self.send_queued()
            image = await srv.decode_start_image(req.image) if req.image else srv.start_image  # off the loop, in line
            await admitted
            self.state = "starting"
            t0 = time.perf_counter()
            started = srv.submit_gpu(srv.engine.start, image, req.prompt, req.seed)
            session = await asyncio.wrap_future(started)
            srv.sessions_total += 1
            first = await srv.on_decoder(self._encode, session.first_frames())
            e = srv.engine
            await self.send_json(
                {
                    "type": "started",
                    "session": self.id,
                    "width": e.width,
                    "height": e.height,
                    "fps": e.fps,
                    "frames_per_chunk": session.frames_per_chunk,
                    "engine": e.name,
                    "prompt": req.prompt,
                }
            )
            self.state = "running"
            for jpeg in first:
                await self.send_frame(jpeg)
            await self._stream(session, t0)
        except asyncio.CancelledError:
            raise
        except ConnectionError:  # the client went away mid-stream: nothing to report
            pass
        except ClientError as e:  # its start image
            error = str(e)
        except EngineError as e:
            error = f"session stopped: {e}"
        except Exception as e:  # a generation failure ends this session, never the server
            log.exception("session %d failed", self.id)
            error = f"session stopped: generation failed ({type(e).__name__}: {e}); send start to begin again"
        finally:
            self.state = "idle"
            srv.release(self, started)
        if error:  # after the release, so a client that retries at once is admitted
            srv.errors_total += 1
            await self.send_error(error)

    async def send_queued(self) -> None:
        await self.send_json(
            {
                "type": "status",
                "state": "queued",
                "position": self.server.admission.position(self),
                "queue": self.server.admission.waiting,
            }
        )

    def _encode(self, frames: np.ndarray) -> list[bytes]:
        return [encode_jpeg(f, self.cfg.jpeg_quality) for f in frames]

    def _decode_and_encode(self, session: Session, chunk: Chunk) -> tuple[list[bytes], float, float, float]:
        """-> JPEG frames, decode seconds, JPEG seconds, completion time (perf_counter)."""
        t0 = time.perf_counter()
        frames = session.decode(chunk)
        t1 = time.perf_counter()
        jpegs = self._encode(frames)
        t2 = time.perf_counter()
        return jpegs, t1 - t0, t2 - t1, t2

    async def _stream(self, session: Session, t_start: float) -> None:
        """denoise (GPU thread) -> decode + JPEG (decoder thread) -> paced send, bounded by credits."""
        srv, n = self.server, session.frames_per_chunk
        credits = asyncio.Semaphore(max(1, self.cfg.send_buffer_chunks))
        ready: asyncio.Queue = asyncio.Queue(maxsize=max(1, self.cfg.send_buffer_chunks))

        period = 1.0 / srv.engine.fps
        clock = {"next_t": 0.0, "queued_frames": 0, "cost": None}

        async def produce() -> None:
            while True:
                await credits.acquire()
                # Just in time: start the chunk so it is ready when the frames queued before it have
                # played, so it is made from the freshest input (lower action-to-screen latency).
                if clock["cost"] is not None:
                    now = time.perf_counter()
                    due = max(clock["next_t"], now) + clock["queued_frames"] * period  # this chunk's first frame
                    slack = due - now - 1.5 * clock["cost"] - 0.005
                    if slack > 0:
                        await asyncio.sleep(min(slack, 2.0))
                await self._apply_commands(session)
                taken = time.perf_counter()
                chunk = await srv.on_gpu(session.denoise, self.actions.take(n))
                times = session.times
                stage = {"denoise_ms": 1e3 * times.denoise, "kv_refresh_ms": 1e3 * times.kv_refresh}
                decoded = asyncio.ensure_future(srv.on_decoder(self._decode_and_encode, session, chunk))
                clock["queued_frames"] += chunk.num_frames
                await ready.put((chunk, decoded, taken, stage))

        async def send() -> None:
            next_t, first = None, True
            while True:
                chunk, decoded, taken, stage = await ready.get()
                jpegs, dec_s, jpeg_s, done_at = await decoded
                cost = done_at - taken
                clock["cost"] = cost if clock["cost"] is None else 0.7 * clock["cost"] + 0.3 * cost
                stage.update(decode_ms=1e3 * dec_s, jpeg_ms=1e3 * jpeg_s)
                latency = None
                for i, jpeg in enumerate(jpegs):
                    now = time.perf_counter()
                    if next_t is None or now > next_t + period:
                        next_t = now  # behind real time: send now, never burst to catch up
                    elif next_t > now:
                        await asyncio.sleep(next_t - now)
                    await self.send_frame(jpeg)
                    clock["queued_frames"] -= 1
                    next_t += period
                    clock["next_t"] = next_t
                    if i == 0:
                        latency = time.perf_counter() - (t_start if first else taken)
                first = False
                credits.release()
                await self.send_json(
                    {
                        "type": "status",
                        "state": "running",
                        "chunk": chunk.index,
                        "fps": round(self.measured_fps(), 2),
                        "latency_ms": round(1e3 * (latency or 0.0), 1),
                        "queue": srv.admission.waiting,
                        "stages_ms": {k: round(v, 2) for k, v in stage.items()},
                        "input": self.actions.snapshot()["keys"],
                    }
                )

        producer, sender = asyncio.create_task(produce()), asyncio.create_task(send())
        try:
            done, _ = await asyncio.wait({producer, sender}, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()  # re-raise the failure
        finally:
            for t in (producer, sender):
                t.cancel()
            await asyncio.gather(producer, sender, return_exceptions=True)
            while not ready.empty():  # let in-flight decodes finish before the session is closed
                _, decoded, _, _ = ready.get_nowait()
                await asyncio.gather(decoded, return_exceptions=True)

    async def _apply_commands(self, session: Session) -> None:
        if self.pending_reset:
            self.pending_reset = False
            self.actions.clear()
            await self.server.on_gpu(session.reset)
            await self.send_json({"type": "status", "state": "running", "event": "reset"})
        if self.pending_prompt is not None:
            text, self.pending_prompt = self.pending_prompt, None
            try:
                await self.server.on_gpu(session.set_prompt, text)
                await self.send_json({"type": "status", "state": "running", "event": "prompt", "prompt": text})
            except EngineError as e:  # keep streaming with the previous prompt
                await self.send_error(f"prompt not applied: {e}")


class StreamServer:
    """Owns the engine, the two worker threads, admission and the open connections."""

    def __init__(self, engine: Engine, cfg: ServingConfig, start_image: np.ndarray | None = None):
        """`start_image`: uint8 [H, W, 3] a session starts from when its client sends none (e.g. the
        synthetic world's first frame for a model trained there); None: the engine's default."""
        self.engine, self.cfg, self.start_image = engine, cfg, start_image
        self._start_png = None
        if start_image is not None:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(start_image)).save(buf, format="PNG")
            self._start_png = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        self.connections: set[Connection] = set()
        self.admission = Admission(cfg.queue_size, on_change=self._queue_changed)
        self._gpu = cf.ThreadPoolExecutor(1, thread_name_prefix="titan-gpu")
        self._decoder = cf.ThreadPoolExecutor(1, thread_name_prefix="titan-decode")
        # Start images (up to max_image_pixels: ~0.7 s for 16 MP) are decoded here, never on the
        # event loop (it would freeze the active stream) nor on the decoder (the active stream's).
        self._images = cf.ThreadPoolExecutor(1, thread_name_prefix="titan-image")
        self._background: set[asyncio.Future] = set()
        self.started_at = time.time()
        self.sessions_total = 0
        self.errors_total = 0

    # ---- workers -------------------------------------------------------------------------
    def submit_gpu(self, fn, *args) -> cf.Future:
        """Queue a job on the GPU worker. Jobs run one at a time in order, which is what lets
        `release` free the slot at once: whatever the next session submits runs after this one's."""
        return self._gpu.submit(fn, *args)

    async def on_gpu(self, fn, *args):
        return await asyncio.wrap_future(self.submit_gpu(fn, *args))

    async def on_decoder(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._decoder, fn, *args)

    async def decode_start_image(self, data: str) -> np.ndarray:
        """A start image, decoded on the image worker (ClientError when bad)."""
        return await asyncio.wrap_future(self._images.submit(decode_image, data, self.cfg.max_image_pixels))

    def release(self, conn: Connection, started: cf.Future | None) -> None:
        """Free the GPU set now; close the session on the GPU worker, behind its in-flight chunk.

        Synchronous, so the slot is free before the client's close handshake completes (a client
        that reconnects at once is admitted); the next session's start queues behind the close.
        """
        if started is not None:
            try:
                self._gpu.submit(self._close_session, conn.id, started)
            except RuntimeError:  # the workers are shut down: the server is exiting
                pass
        self.admission.leave(conn)

    def _close_session(self, conn_id: int, started: cf.Future) -> None:
        """On the GPU worker: close the session `started` made, once its last decode is done."""
        if started.cancelled() or started.exception() is not None:
            return  # never ran (cancelled in line) or failed: there is no session
        try:
            self._decoder.submit(lambda: None).result()  # decodes run in order: this session's are done
        except RuntimeError:  # the decoder is shut down: no decode can be running
            pass
        try:
            started.result().close()
        except Exception:
            log.exception("closing session %d failed", conn_id)

    def _queue_changed(self) -> None:
        for conn in list(self.connections):
            if conn.state == "queued":
                task = asyncio.ensure_future(conn.send_queued())
                self._background.add(task)  # keep a reference until it is done
                task.add_done_callback(self._background.discard)

    # ---- HTTP ----------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_message_bytes)
        app.router.add_get("/", self.index)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/start", self.start_defaults)
        app.router.add_get("/static/{name}", self.static)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=(STATIC_DIR / "index.html").read_bytes(), content_type="text/html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        types = {".js": "application/javascript", ".css": "text/css", ".html": "text/html"}
        ext = name[name.rfind(".") :] if "." in name else ""
        entry = STATIC_DIR / name
        if "/" in name or ".." in name or ext not in types or not entry.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=entry.read_bytes(), content_type=types[ext])

    async def start_defaults(self, request: web.Request) -> web.Response:
        """What a start without image or prompt begins from, for the page to show before Start."""
        return web.json_response({"prompt": self.cfg.default_prompt, "image": self._start_png})

    async def health(self, request: web.Request) -> web.Response:
        e = self.engine
        return web.json_response(
            {
                "status": "ok",
                "engine": e.name,
                "protocol": PROTOCOL_VERSION,
                "busy": self.admission.holder is not None,
                "queued": self.admission.waiting,
                "queue_size": self.cfg.queue_size,
                "connections": len(self.connections),
                "sessions_total": self.sessions_total,
                "uptime_s": round(time.time() - self.started_at, 1),
                "width": e.width,
                "height": e.height,
                "fps": e.fps,
                "frames_per_chunk": e.frames_per_chunk,
            }
        )

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        # autoclose=False: a client's close is answered after its session is released (below), so a
        # client whose close handshake has completed finds the slot free when it reconnects.
        ws = WebSocket(max_msg_size=self.cfg.max_message_bytes, heartbeat=30.0, autoclose=False)
        await ws.prepare(request)
        conn = Connection(self, ws)
        self.connections.add(conn)
        try:
            await conn.send_json(
                {
                    "type": "hello",
                    "protocol": PROTOCOL_VERSION,
                    "engine": self.engine.name,
                    "max_message_bytes": self.cfg.max_message_bytes,
                }
            )
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        await conn.handle_text(msg.data)
                    except (ClientError, ActionError) as e:
                        self.errors_total += 1
                        await conn.send_error(str(e))
                elif msg.type == WSMsgType.BINARY:
                    await conn.send_error("binary messages are not accepted; send JSON text messages")
                elif msg.type == WSMsgType.ERROR:
                    log.info("connection %d: %s", conn.id, ws.exception())
                    break
        finally:
            await conn.stop()
            self.connections.discard(conn)
            self.admission.leave(conn)
            if ws.too_big:
                await ws.linger(request)
            else:
                await ws.close()  # answers the client's close (no-op when already closed)
        return ws

    async def _on_shutdown(self, app: web.Application) -> None:
        for conn in list(self.connections):
            await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    async def _on_cleanup(self, app: web.Application) -> None:
        self._images.shutdown(wait=True, cancel_futures=True)
        self._gpu.shutdown(wait=True, cancel_futures=True)
        self._decoder.shutdown(wait=True, cancel_futures=True)


async def start_site(server: StreamServer, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start listening; returns the runner and the bound port (port 0 picks a free one)."""
    runner = web.AppRunner(server.make_app(), handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, bound


async def serve_forever(server: StreamServer, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then close clients (1001 going away) and stop the workers."""
    runner, bound = await start_site(server, host, port)
    log.warning("titan-world serve: http://%s:%d/  (engine %s)", host, bound, server.engine.name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform
            pass
    try:
        await stop.wait()
    finally:
        log.warning("titan-world serve: shutting down")
        await runner.cleanup()


class ServerThread:
    """Run a server on its own event loop in a background thread (tests, benchmarks, notebooks)."""

    def __init__(self, server: StreamServer, host: str = "127.0.0.1", port: int = 0):
        self.server, self.host = server, host
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self.port = port
        self._thread = threading.Thread(target=self._main, name="titan-serve", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._runner, self.port = self.loop.run_until_complete(start_site(self.server, self.host, self.port))
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("server thread did not start within 30 s")
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
            self._runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    def __exit__(self, *exc) -> None:
        self.stop()
