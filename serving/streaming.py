"""The real engine: a block-causal few-step student streamed through a rolling KV cache.

Per chunk of `chunk_frames` latent frames (4 video frames each):
  1. `denoise_steps` passes (no CFG) from fresh noise, each reading the cache (sink + window),
     re-noising the x0 estimate to the next sigma (Self-Forcing) or taking an Euler step;
  2. one pass at t = 0 on the clean x0 that writes the chunk's K/V into the cache (`kv_refresh`;
     `kv_refresh="last_step"` instead writes during the last denoising step: one pass cheaper);
  3. `decode` (another thread, another CUDA stream) turns latents into uint8 frames with the
     codec's stream decoder (`_DecodeStream`): the Wan VAE's causal memory is carried from chunk
     to chunk, so the frames are those of one decode of the whole session (no seams, no context
     latents decoded twice); a chunk that finds a gap restarts it from the latent before it.
What never changes within a prompt is computed once: the text embedding and every block's
cross-attention K/V (`WanDiT.prepare_context`), updated in place on a new prompt. Every tensor a
session holds is allocated at start (cache, conditioning buffers, prompt K/V), so memory is flat
for any session length. With `serving.cuda_graphs`, full-cache passes replay the blocks from a
CUDA graph (serving/graphs.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from serving.config import ServingConfig, check_geometry, with_fallback_geometry
from serving.engine import BaseSession, Chunk, EngineError, image_to_tensor
from serving.graphs import GraphedBackbone
from serving.pose import PoseTracker
from titan_world.conditioning import i2v_condition
from titan_world.data.actions import Level
from titan_world.model.action import ActionInputs, WarpSource
from titan_world.model.codec import TEMPORAL_STRIDE, encodable_frames, video_to_frames
from titan_world.model.dit import PreparedContext, WanDiT
from titan_world.model.kv_cache import KVCache, horizon_shift
from titan_world.posttrain.rollout import denoise_chunk

log = logging.getLogger("titan_world.serving")


def default_sigmas(steps: int) -> list[float]:
    """1.0, 1 - 1/steps, ..., 1/steps: the student's timesteps (posttrain.denoise_steps / 1000)."""
    return [1.0 - i / steps for i in range(steps)]


def default_start_image(height: int, width: int) -> np.ndarray:
    """A neutral horizon (sky over ground) for sessions started without an image."""
    img = np.empty((height, width, 3), np.uint8)
    rows = np.linspace(0, 1, height)[:, None]
    sky = np.array([110, 160, 220]) * (1 - 0.4 * rows) + 40 * rows
    ground = np.array([70, 120, 60]) * (0.7 + 0.3 * rows)
    img[:] = np.where(rows[..., None] < 0.5, sky[:, None, :], ground[:, None, :]).astype(np.uint8)
    return img


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a host sync: a plain `.to(cuda)` waits for every queued kernel
    (pageable memory); a pinned copy is queued behind them (the host allocator keeps the pinned
    buffer alive until the copy has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class _Payload:
    latents: torch.Tensor  # [1, C, n, h, w] clean latents of the chunk
    context: torch.Tensor  # [1, C, 1, h, w] the latent frame before it (to restart the decoder after a gap)
    ready: torch.cuda.Event | None
    stream: _DecodeStream  # the session's decoder when the chunk was made (a reset makes a new one)
    index: int  # chunk number since that reset


class _DecodeStream:
    """A session's stream decoder and the next chunk it expects; used on the decode thread only.

    Created (cheaply) by `reset`; its first use decodes the start latents to fill the decoder's
    causal memory (their frames were sent as the start image). Chunks normally arrive in order;
    one that does not (an earlier chunk was never decoded: its client left) restarts the decoder
    from the latent frame before it, as a stateless decode would.
    """

    def __init__(self, codec, start_latents: torch.Tensor) -> None:
        self.codec, self.decoder, self.prime, self.next = codec, codec.stream_decoder(), start_latents, 0

    def decode(self, p: _Payload) -> torch.Tensor:
        if p.index != self.next:
            self.decoder, self.prime = self.codec.stream_decoder(), p.context
        if self.prime is not None:
            self.decoder.decode(self.prime.to(torch.float32))
            self.prime = None
        self.next = p.index + 1
        return self.decoder.decode(p.latents.to(torch.float32))

    def nbytes(self) -> int:
        return self.decoder.nbytes()


class StreamingEngine:
    """`StreamingEngine(model, codec, text_encoder, cfg)`; `start(...)` returns a session.

    `cp`: a ContextParallel (Ulysses) already set on the model; the KV cache then holds this
    rank's heads only.
    """

    name = "titan-world"

    def __init__(self, model: WanDiT, codec, text_encoder, cfg: ServingConfig, *, cp=None):
        if not isinstance(model, WanDiT):
            raise EngineError(f"serving needs a dense causal student (WanDiT); got {type(model).__name__}")
        cfg = with_fallback_geometry(cfg)  # serving/loading.py fills them from the student first
        try:
            check_geometry(cfg)
        except ValueError as e:
            raise EngineError(str(e)) from None
        self.model, self.codec, self.text_encoder, self.cfg = model.eval(), codec, text_encoder, cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cp_size = cp.size if cp is not None else 1
        mc = model.cfg
        s = codec.stride[1]
        if cfg.height % (s * mc.patch_size[1]) or cfg.width % (s * mc.patch_size[2]):
            raise EngineError(
                f"serving.height/width={cfg.height}x{cfg.width}: expected multiples of {s * mc.patch_size[1]}"
            )
        if codec.latent_channels != mc.out_dim:
            raise EngineError(
                f"codec gives {codec.latent_channels} latent channels; the model expects out_dim={mc.out_dim}"
            )
        if mc.num_heads % self.cp_size:
            raise EngineError(f"--gpus {self.cp_size}: model.num_heads={mc.num_heads} must be divisible by it")
        self.height, self.width, self.fps = cfg.height, cfg.width, cfg.fps
        self.latent_hw = (cfg.height // s, cfg.width // s)
        self.tokens_per_frame = (self.latent_hw[0] // mc.patch_size[1]) * (self.latent_hw[1] // mc.patch_size[2])
        if (self.tokens_per_frame * cfg.chunk_frames) % self.cp_size:
            raise EngineError(
                f"--gpus {self.cp_size}: chunk tokens {self.tokens_per_frame * cfg.chunk_frames} must divide by it"
            )
        self.frames_per_chunk = TEMPORAL_STRIDE * cfg.chunk_frames
        self.sigmas = list(cfg.sigmas) or default_sigmas(cfg.denoise_steps)
        if (
            not self.sigmas
            or any(not 0 < x <= 1 for x in self.sigmas)
            or sorted(self.sigmas, reverse=True) != self.sigmas
        ):
            raise EngineError(f"serving.sigmas={self.sigmas}: expected decreasing values in (0, 1]")
        if cfg.sampler not in ("renoise", "euler"):
            raise EngineError(f"serving.sampler={cfg.sampler!r}: expected renoise or euler")
        if cfg.kv_refresh == "last_step":
            log.warning(
                "serving.kv_refresh=last_step: a speed/quality trade-off: one pass per chunk fewer, but the "
                "cache holds the last denoising step's (noisy) K/V, which the student never saw in training"
            )
        self.cuda_graphs = cfg.cuda_graphs
        if cfg.cuda_graphs and self.cp_size > 1:
            log.warning("serving.cuda_graphs is not supported with --gpus %d yet; serving without graphs", self.cp_size)
            self.cuda_graphs = False
        self.start_pose: np.ndarray | None = None  # `place`: where sessions start (default the origin)
        self.level: Level | None = None

    def place(self, c2w: np.ndarray | None, level: Level | None = None) -> None:
        """Where the start image was taken (c2w [4, 4] in its world's frame) and the level it shows,
        whose blocks the camera keeps clear of; every later session starts there. A model of relative
        poses does not depend on the start pose; one of world-frame poses (model.action.pose_frame=world)
        needs it, and the level keeps a user from walking where the data never went."""
        self.start_pose, self.level = (None if c2w is None else np.asarray(c2w, np.float64)), level

    @torch.no_grad()
    def encode_prompt(self, text: str) -> PreparedContext:
        ctx = self.text_encoder.encode([text]).to(self.device, self.dtype)
        return self.model.prepare_context(ctx)

    def start(self, image: np.ndarray | None, prompt: str, seed: int | None = None) -> StreamingSession:
        return StreamingSession(self, image, prompt, 0 if seed is None else seed)


class StreamingSession(BaseSession):
    def __init__(self, engine: StreamingEngine, image: np.ndarray | None, prompt: str, seed: int):
        super().__init__()
        e, mc, cfg = engine, engine.model.cfg, engine.cfg
        self.engine, self.cfg, self.seed, self.start_prompt = e, cfg, seed, prompt
        self.frames_per_chunk = e.frames_per_chunk
        self.chunk_frames = cfg.chunk_frames
        dev = e.device
        self.cache = KVCache(
            mc.num_layers,
            1,
            mc.num_heads // e.cp_size,
            mc.head_dim,
            e.tokens_per_frame,
            sink_frames=cfg.sink_frames,
            window_frames=cfg.window_frames,
            chunk_frames=cfg.chunk_frames,
            dtype=e.dtype,
            device=dev,
            horizon_frames=cfg.horizon_frames,
            rope_theta=mc.rope_theta,
        )
        self.graphs = GraphedBackbone(e.model, self.cache) if e.cuda_graphs else None
        self.context: PreparedContext | None = None
        self.horizon = cfg.horizon_frames
        self.pose = PoseTracker(
            cfg.fps, cfg.height, cfg.width, cfg.horizon_frames + cfg.chunk_frames, e.start_pose, e.level
        )
        self.generator = torch.Generator(dev)
        self.decode_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        h, w = e.latent_hw
        self._noise = torch.empty(1, mc.out_dim, cfg.chunk_frames, h, w, device=dev, dtype=torch.float32)
        self._cond_chunk = (
            torch.zeros(1, mc.cond_channels, cfg.chunk_frames, h, w, device=dev, dtype=e.dtype)
            if mc.cond_channels
            else None
        )
        self._use_actions = e.model.action_embedding is not None
        self._intrinsics = _to_device(self.pose.intrinsics, dev)  # [4], fixed for the session
        video = image_to_tensor(
            image if image is not None else default_start_image(cfg.height, cfg.width), cfg.height, cfg.width
        )
        t = video.shape[2]
        video = video[:, :, : encodable_frames(t)]
        self._start_video = video
        with torch.no_grad():
            self.start_latents = e.codec.encode(video.to(dev)).to(torch.float32)  # [1, C, F0, h, w]
        self.reset()

    # ---- session API ---------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self) -> None:
        """Back to the state right after start (same seed, prompt and first frames)."""
        self.generator.manual_seed(self.seed)
        self.cache.reset()
        self.pose.reset()
        # action poses are relative to it: the session's start, re-anchored past the horizon (_chunk_actions)
        self._origin = _to_device(self.pose.origin[None], self.engine.device)
        self._load_prompt(self.start_prompt)
        self.prompt = self.start_prompt
        self.chunk_index = 0
        self.frame = 0
        self._stream = _DecodeStream(self.engine.codec, self.start_latents)
        lat = self.start_latents
        self.pose.record(0, self.pose.origin.expand(lat.shape[2], 4, 4))  # the given frames: the start pose
        for start in range(0, lat.shape[2], self.chunk_frames):  # write the given frames, clean
            part = lat[:, :, start : start + self.chunk_frames]
            self._forward(part, 0.0, self._cond(start, part.shape[2]), self._still_actions(part.shape[2]), write=True)
            self.frame += part.shape[2]
        self._last_latent = lat[:, :, -1:].clone()

    @torch.no_grad()
    def set_prompt(self, text: str) -> None:
        self._load_prompt(text)
        self.prompt = text

    def first_frames(self) -> np.ndarray:
        return video_to_frames(self._start_video)[0]

    @torch.no_grad()
    def denoise(self, actions: torch.Tensor) -> Chunk:
        a = self.check_actions(actions)
        dev, n = self.engine.device, self.chunk_frames
        t0 = time.perf_counter()
        act = self._chunk_actions(a)
        cond = self._cond(self.frame, n)
        ws = self._warp_source(act, n)
        x = self._noise.normal_(generator=self.generator).clone()
        last_writes = self.cfg.kv_refresh == "last_step"

        def predict(x: torch.Tensor, sigma: float, final: bool) -> torch.Tensor:
            return self._forward(x, sigma, cond, act, write=final and last_writes, warp_source=ws).float()

        x = denoise_chunk(
            predict, x, self.engine.sigmas, lambda: self._noise.normal_(generator=self.generator), self.cfg.sampler
        )
        _sync(dev)
        t1 = time.perf_counter()
        if not last_writes:
            self._forward(x, 0.0, cond, act, write=True, warp_source=ws)
        _sync(dev)
        self.times.denoise, self.times.kv_refresh = t1 - t0, time.perf_counter() - t1
        ready = None
        if dev.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        payload = _Payload(x, self._last_latent, ready, self._stream, self.chunk_index)
        self._last_latent = x[:, :, -1:]
        self.frame += n
        chunk = Chunk(self.chunk_index, payload, self.frames_per_chunk)
        self.chunk_index += 1
        return chunk

    @torch.no_grad()
    def decode(self, chunk: Chunk) -> np.ndarray:
        p: _Payload = chunk.payload
        t0 = time.perf_counter()
        if self.decode_stream is not None:
            with torch.cuda.stream(self.decode_stream):
                self.decode_stream.wait_event(p.ready)
                for tns in (p.latents, p.context):
                    tns.record_stream(self.decode_stream)
                frames = self._decode(p)
        else:
            frames = self._decode(p)
        self.times.decode = time.perf_counter() - t0
        return frames

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.close()
        self.cache = None  # type: ignore[assignment]
        self.context = None

    def state_bytes(self) -> int:
        """Bytes of every tensor this session holds (flat for any session length)."""
        tensors = [self._noise, self.start_latents, self._start_video, self._last_latent]
        tensors += [t for kv in self.context.kv for t in kv]
        if self._cond_chunk is not None:
            tensors.append(self._cond_chunk)
        graph_bytes = self.graphs.state_bytes() if self.graphs is not None else 0
        own = sum(t.numel() * t.element_size() for t in tensors)
        return own + self.cache.nbytes() + graph_bytes + self._stream.nbytes()

    # ---- internals -----------------------------------------------------------------------------
    def _decode(self, p: _Payload) -> np.ndarray:
        return video_to_frames(p.stream.decode(p))[0]  # [4n, H, W, 3]

    def _load_prompt(self, text: str) -> None:
        """Encode `text` into the session's prompt K/V, in place after the first time (the CUDA
        graphs read those buffers)."""
        new = self.engine.encode_prompt(text)
        if self.context is None:
            self.context = new
            return
        for (k, v), (nk, nv) in zip(self.context.kv, new.kv):
            k.copy_(nk)
            v.copy_(nv)

    def _warp_source(self, actions: ActionInputs | None, n: int) -> WarpSource | None:
        """The chunk's frames re-project the last start frame from the start pose, for the whole session,
        as the student was trained (the given frame; `posttrain.rollout._given_frame`)."""
        if actions is None:
            return None
        dev = self.engine.device
        valid = torch.ones(1, n, dtype=torch.bool, device=dev)
        start = self.start_latents[:, :, -1:].expand(-1, -1, n, -1, -1)
        return WarpSource(start, _to_device(self.pose.origin, dev).expand(1, n, 4, 4), valid)

    def _forward(
        self, x: torch.Tensor, sigma: float, cond, actions, *, write: bool, warp_source: WarpSource | None = None
    ) -> torch.Tensor:
        """One pass of the student over the chunk, reading (and with `write`, extending) the cache."""
        e = self.engine
        t = torch.full((1,), sigma * 1000.0, device=e.device)
        tokens = e.model.embed(
            x.to(e.dtype),
            t,
            self.context,
            cond=cond,
            actions=actions,
            action_reference=self._origin,
            frame_offset=self.frame,
            warp_source=warp_source,
        )
        if self.graphs is not None and self.graphs.ready(tokens):
            out = self.graphs(tokens, write)
        else:
            out = e.model.backbone(tokens, self.cache, write)
        if write:
            self.cache.advance(tokens.grid[0])
        return out

    def _cond(self, start: int, n: int) -> torch.Tensor | None:
        """i2v conditioning as in training (`titan_world.conditioning.i2v_condition`): 4 mask
        channels (1 on given frames) + the given latents; the start image/video frames are given,
        every generated frame is unconditioned (zeros)."""
        if self._cond_chunk is None:
            return None
        given = self.start_latents[:, :, start : start + n].to(self.engine.dtype)  # start frames in this window
        if given.shape[2] == 0 and n == self.chunk_frames:
            return self._cond_chunk  # preallocated zeros
        latents = given.new_zeros(*given.shape[:2], n, *given.shape[3:])
        latents[:, :, : given.shape[2]] = given
        return i2v_condition(latents, torch.arange(n, device=latents.device)[None] < given.shape[2])

    def _still_actions(self, n: int) -> ActionInputs | None:
        if not self._use_actions:
            return None
        dev = self.engine.device
        c2w = _to_device(self.pose.current(), dev)
        return ActionInputs(torch.zeros(1, n, 8, device=dev), c2w.expand(1, n, 4, 4), self._intrinsics.expand(1, n, 4))

    def _chunk_actions(self, a: torch.Tensor) -> ActionInputs | None:
        """Per video frame [4n, 8] -> per latent frame: keys averaged, pose after the group's last frame."""
        poses = self.pose.advance(a)  # integrate always, so the pose is right if actions matter later
        dev, n = self.engine.device, self.chunk_frames
        c2w = poses[TEMPORAL_STRIDE - 1 :: TEMPORAL_STRIDE]
        self.pose.record(self.frame, c2w)
        if not self._use_actions:
            return None
        anchor = horizon_shift(self.frame + n, self.horizon)  # 0 within the trained horizon: the start
        if anchor:
            self._origin = _to_device(self.pose.at(anchor)[None], dev)
        keys = a.view(n, TEMPORAL_STRIDE, -1).mean(1)
        return ActionInputs(_to_device(keys[None], dev), _to_device(c2w[None], dev), self._intrinsics.expand(1, n, 4))
