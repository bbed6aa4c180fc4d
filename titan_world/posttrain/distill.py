"""Stage 2 step logic: self-rollout + DMD + GAN head, two time scales (LingBot §3.4.2).

One *step* = `fake_updates` critic updates, then one student update:
  critic update  rollout (no grad) -> x̃ ; L = flow-matching(fake on x̃) + w_gan·L_D(head)
  student update rollout (grad on the last K chunks) -> x̂ ; L = L_DMD(x̂) + w_gan·L_G(x̂)
Separate optimizers and learning rates for the student and the critic (fake score + head).
The frozen teacher has no optimizer and no gradients.

Several ranks: with a mesh (FSDP2, the default) the student, teacher, fake score and GAN
head are sharded and FSDP averages the gradients inside backward; without one every rank holds
full replicas and `sync_grads` all-reduces them after backward. Both give the same updates.

Scores see a *window* of the rollout: the frame just before the last K chunks (given, clean,
as the teacher's I2V/V2V conditioning) followed by those K chunks — the frames that carry
gradient. The real-data window for the discriminator has the same frame indices in the clip.
All randomness of a step comes from generators seeded by (seed, step[, rank]): exit steps and
DMD sigmas are shared by all ranks (same count of passes, same MoE expert), noise is per
data-parallel rank (the CP ranks of a group share it),
and a resumed run replays the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from parallel.config import ParallelConfig
from parallel.fsdp import mixed_precision_policy
from parallel.mesh import ParallelMesh
from parallel.parallelize import parallelize
from titan_world.model.action import ActionInputs
from titan_world.model.moe import experts
from titan_world.posttrain.causal import ChunkLayout
from titan_world.posttrain.config import PostTrainConfig
from titan_world.posttrain.dmd import ScoreInputs, dmd_step_loss, draw_sigma, fake_score_loss, noised, route, velocity
from titan_world.posttrain.gan import FeatureTap, GANHead, approx_r1, d_loss, frozen, g_loss
from titan_world.posttrain.memory import teacher_dtype
from titan_world.posttrain.rollout import Rollout, RolloutInputs, sample_exit_steps, self_rollout, student_sigmas
from titan_world.train.faults import finite_on_all_ranks
from titan_world.train.optim import EMA, clip_grad_norm


class Critic(nn.Module):
    """Fake score + GAN head: one module, one optimizer, one checkpoint entry."""

    def __init__(self, fake: nn.Module, head: GANHead | None):
        super().__init__()
        self.fake, self.head = fake, head


def step_generators(seed: int, step: int, dp_rank: int, sub: int) -> tuple[torch.Generator, torch.Generator]:
    """(shared by all ranks, per data-parallel rank) generators for update `sub` of step `step`.
    The CP ranks of one group share a clip, so they share its noise too."""
    shared = torch.Generator().manual_seed(hash((seed, step, sub, 0)) % 2**63)
    local = torch.Generator().manual_seed(hash((seed, step, sub, dp_rank, 1)) % 2**63)
    return shared, local


def sync_grads(params: Iterable[nn.Parameter]) -> None:
    """Average gradients over all ranks (data parallel without FSDP; no-op on one process). With
    context parallelism too: the mean over the CP ranks of their scaled partial gradients is the
    full gradient (`parallel.ulysses`' convention)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def average_and_clip(opt: torch.optim.Optimizer, max_norm: float, sharded: bool) -> float:
    """Finish a backward for the parameters `opt` updates: gradients averaged over ranks, clipped;
    returns the norm before clipping.

    Sharded (FSDP2): the gradients were already reduce-scattered (averaged) into the shards during
    backward, and their norm needs a reduction over the mesh (`train.optim.clip_grad_norm`).
    Replicas: all-reduce every gradient first, then every rank clips the same full gradients.
    `max_norm` 0 means no clipping on both paths (as `train.grad_clip` in pretraining).
    The optimizer's list, not `module.parameters()`: a sharded module lists the gathered copies
    of the units FSDP keeps gathered after a forward (root, last block), whose .grad is not the one
    the optimizer reads.
    """
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if sharded:
        return float(clip_grad_norm(params, max_norm))
    sync_grads(params)
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))


@dataclass
class Batch:
    """A data batch as post-training uses it (I2V: the first latent frame is given)."""

    latents: torch.Tensor  # [B, C, F, h, w] real clip (ground truth for the GAN and eval)
    context: torch.Tensor
    actions: ActionInputs | None

    @staticmethod
    def from_loader(batch: dict, use_actions: bool, device) -> Batch:
        acts = (
            ActionInputs.from_video_frames(batch["actions"], batch["c2w"], batch["intrinsics"]) if use_actions else None
        )
        if acts is not None:
            acts = ActionInputs(acts.keys.to(device), acts.c2w.to(device), acts.intrinsics.to(device))
        text = batch["text"].to(device)
        return Batch(batch["latents"].to(device), text, acts)


class DMDTrainer:
    """Owns the stage-2 networks and optimizers. The teacher is stored in `posttrain.teacher_dtype`,
    then every network is readied by `parallel.parallelize` in its role (teacher, student, critic:
    CP hook, attention backend, FP8, AC, compile, FSDP over `mesh` when given) before the
    optimizers are built on its parameters; `parallel` None: none of the speed/memory levers,
    `cp` the Ulysses context, `attn_backend` the job's `model.attn_backend`. Networks built on the
    meta device (`loop.network`) are filled by `fill` right after sharding, each rank its shards;
    `device` is then where they live (default: where the fake score's parameters are).

    `uncond_context` [1, text_len, text_dim]: the teacher's unconditional text for guidance != 1,
    the job's encoding of `posttrain.negative_prompt` (`loop.negative_context`), shared by every clip.
    With `posttrain.ema_decay` > 0 the trainer keeps an EMA of the student's weights (`train.optim.EMA`,
    built on the sharded parameters: each rank averages its own shards), updated after every
    student update that was applied: a copy of the student before step `ema_start_step`, an average
    from it on (so a run shorter than that exports the raw student). `codec` (the data's,
    `posttrain.score_cond=reencode`): turns the scores' given frame into a start image's latent when
    it is a mid-rollout one (`window`)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        fake: nn.Module,
        pcfg: PostTrainConfig,
        seed: int = 0,
        dp_rank: int = 0,
        grad_clip: float = 1.0,
        mesh: ParallelMesh | None = None,
        parallel: ParallelConfig | None = None,
        device: torch.device | str | None = None,
        cp=None,
        attn_backend: str | None = None,
        fill: Callable[[], None] | None = None,
        uncond_context: torch.Tensor | None = None,
        codec=None,
    ):
        self.student, self.teacher, self.pcfg, self.seed, self.dp_rank, self.grad_clip = (
            student,
            teacher,
            pcfg,
            seed,
            dp_rank,
            grad_clip,
        )
        self.mesh = mesh
        self.device = device = torch.device(device) if device is not None else next(fake.parameters()).device
        teacher.to(teacher_dtype(pcfg.teacher_dtype, device))
        par = parallel or ParallelConfig()
        where = {"device": device, "cp": cp, "attn_backend": attn_backend}
        parallelize(teacher, mesh, par, "teacher", **where)
        # a checkpointed student is exact: its rollouts snapshot what recorded passes read
        self.student_checkpointed = parallelize(student, mesh, par, "student", **where).checkpointed
        self.fake_checkpointed = parallelize(fake, mesh, par, "critic", **where).checkpointed
        head = (
            GANHead(student.cfg.dim, len(pcfg.gan_blocks), pcfg.gan_queries).to(device) if pcfg.gan_weight > 0 else None
        )
        if mesh is not None and head is not None:
            # One FSDP unit computing in fp32 (the head normalises fp32 features itself): at A14B with
            # 4 tapped blocks it is 0.84B parameters, and sharded its gradients are reduced inside the
            # fake score's backward, with the critic's optimizer seeing one kind of parameter.
            fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
            fully_shard(head, mesh=mesh.fsdp_mesh, mp_policy=fp32)
        if fill is not None:
            fill()
        # the sharded networks compute in the FSDP policy's dtype: the rollout's KV cache must hold it
        self.cache_dtype = (
            (mixed_precision_policy(par, mesh.device_type).param_dtype or torch.float32) if mesh else None
        )
        self.uncond_context = uncond_context
        if pcfg.reencodes_score_cond and codec is None:
            raise ValueError(
                f"posttrain.score_cond=reencode with grad_chunks={pcfg.grad_chunks} < rollout_chunks="
                f"{pcfg.rollout_chunks}: the trainer needs the data's codec "
                "(or posttrain.score_cond=latent)"
            )
        self.codec = codec
        # after sharding and fill: the live (sharded) parameters the optimizer updates
        self.named_student = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        self.ema = EMA(self.named_student, pcfg.ema_decay) if pcfg.ema_decay > 0 else None
        self.critic = Critic(fake, head)
        self.tap = FeatureTap(fake, pcfg.gan_blocks) if head is not None else None
        # DMD practice (DMD2 / Self-Forcing): beta1 = 0 for both players of the min-max game.
        self.opt_student = torch.optim.AdamW(
            student.parameters(), lr=pcfg.student_lr, betas=(0.0, 0.999), weight_decay=0.0
        )
        self.opt_critic = torch.optim.AdamW(
            self.critic.parameters(), lr=pcfg.fake_lr, betas=(0.0, 0.999), weight_decay=0.0
        )
        self.sigmas = student_sigmas(pcfg.denoise_steps)
        self.counts = {"critic_updates": 0, "student_updates": 0}

    # -- pieces ---------------------------------------------------------------------------------
    def layout(self, batch: Batch) -> ChunkLayout:
        return ChunkLayout(1 + self.pcfg.rollout_chunks * self.pcfg.chunk_frames, 1, self.pcfg.chunk_frames)

    def rollout(self, batch: Batch, shared: torch.Generator, local: torch.Generator, grad: bool) -> Rollout:
        lay = self.layout(batch)
        if batch.latents.shape[2] < lay.num_frames:
            raise ValueError(
                f"clip has {batch.latents.shape[2]} latent frames; the rollout needs {lay.num_frames} "
                "(posttrain.rollout_chunks)"
            )
        cp = self.student.cp
        _, h, w = self.student.token_grid(batch.latents.shape)
        if cp is not None and (h * w) % cp.size:
            raise ValueError(
                f"parallel.cp={cp.size}: a latent frame has {h}x{w} = {h * w} tokens; the rollout's cached passes "
                "split every chunk over the CP ranks, so it must be divisible by the CP degree (change "
                "data.height/width or parallel.cp)"
            )
        acts = batch.actions.slice(0, lay.num_frames) if batch.actions is not None else None
        inp = RolloutInputs(batch.latents[:, :, :1], batch.context, acts, lay, self.student.cfg.cond_channels > 0)
        exits = sample_exit_steps(len(lay.chunks()), len(self.sigmas), shared)
        p = self.pcfg
        with torch.set_grad_enabled(grad):
            return self_rollout(
                self.student,
                inp,
                self.sigmas,
                local,
                exit_steps=exits,
                grad_chunks=p.grad_chunks,
                sink_frames=p.sink_frames,
                window_frames=p.window_frames,
                cache_dtype=self.cache_dtype,
                snapshot_recorded=bool(self.student_checkpointed),
            )

    @torch.no_grad()
    def start_latent(self, latents: torch.Tensor, g: int) -> torch.Tensor:
        """Latent frame g − 1 as the teacher's I2V conditioning sees a start image: latents [0, g)
        decoded (a causal codec needs the prefix), their last video frame encoded alone. The
        stream decoder takes one latent at a time (the frames of one whole decode, codec.py), so a
        Wan VAE's peak memory is one latent frame's decode, not the prefix's."""
        decoder = self.codec.stream_decoder()
        for i in range(g):
            frame = decoder.decode(latents[:, :, i : i + 1].detach())[:, :, -1:]
        return self.codec.encode(frame).to(latents.dtype)

    def window(self, batch: Batch, latents: torch.Tensor) -> ScoreInputs:
        """Frames [g − 1, F) of `latents`, g = first frame of the last K chunks; frame g − 1 given
        (re-encoded as a start image when it is a generated mid-rollout latent: `posttrain.score_cond`)."""
        lay = self.layout(batch)
        g = lay.chunks()[-max(1, self.pcfg.grad_chunks)][0]
        lat = latents[:, :, g - 1 : lay.num_frames]
        if self.pcfg.reencodes_score_cond:
            lat = torch.cat([self.start_latent(latents, g), lat[:, :, 1:]], dim=2)
        cond = torch.zeros(lat.shape[0], lat.shape[2], dtype=torch.bool, device=lat.device)
        cond[:, 0] = True
        acts = batch.actions.slice(g - 1, lay.num_frames) if batch.actions is not None else None
        u = self.uncond_context
        uncond = u.expand(lat.shape[0], *u.shape[1:]) if u is not None else None
        return ScoreInputs(lat, cond, batch.context, acts, self.student.cfg.cond_channels > 0, uncond)

    def _sigma(self, shared: torch.Generator) -> float:
        p = self.pcfg
        return draw_sigma(shared, p.dmd_shift, p.dmd_sigma_min, p.dmd_sigma_max)

    def _logits(self, inp: ScoreInputs, sigma: float, noise: torch.Tensor) -> torch.Tensor:
        nb = noised(inp, sigma, noise)
        return self._discriminator(inp, nb, sigma)(nb.x_t)

    def _discriminator(
        self, inp: ScoreInputs, nb, sigma: float, trunk_grad: bool = True
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """D as a function of the noised latents x_σ of `inp` (timesteps and I2V conditioning of `nb`
        fixed): a fake-score pass, tapped, then the head. `trunk_grad=False`: the pass runs without
        gradient (the head-only discriminator: the trunk gets no L_D and keeps no activations)."""

        def d(x_t: torch.Tensor) -> torch.Tensor:
            with self.tap.capture() as feats, torch.set_grad_enabled(trunk_grad and torch.is_grad_enabled()):
                velocity(route(self.critic.fake, sigma), x_t, nb.t, inp, nb.cond)
            return self._discriminate(feats, inp)

        return d

    def _discriminate(self, feats: dict[int, torch.Tensor], inp: ScoreInputs, detach: bool = False) -> torch.Tensor:
        """GAN head logits from the tapped block outputs of a fake-score pass over `inp`. Under
        context parallelism every rank tapped its shard of the sequence: the shards are gathered
        (padding dropped) so the learned queries attend to every token, as on one rank; the
        gather's backward hands each rank its own tokens' gradient (`parallel.ulysses`)."""
        hs = [feats[i].detach() if detach else feats[i] for i in self.tap.blocks]
        cp = experts(self.critic.fake)[0].cp
        if cp is not None:
            tokens = math.prod(self.student.token_grid(inp.latents.shape))
            hs = [cp.gather(h, 1)[:, :tokens] for h in hs]
        return self.critic.head(hs)

    def _step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, ema: EMA | None = None, step: int = 0) -> float:
        """One update; skipped (no step, no EMA update) when the loss or gradient norm is non-finite
        on any rank, as in pretraining (the job loop counts and stops on such steps, train/faults.py)."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = average_and_clip(opt, self.grad_clip, sharded=self.mesh is not None)
        if finite_on_all_ranks([float(loss.detach()), norm], self.device):
            opt.step()
            if ema is not None:
                ema.update(self.named_student, None if step >= self.pcfg.ema_start_step else 0.0)
        return norm

    # -- updates --------------------------------------------------------------------------------
    def critic_update(self, batch: Batch, step: int, sub: int) -> dict[str, float]:
        shared, local = step_generators(self.seed, step, self.dp_rank, sub)
        with torch.no_grad():
            sample = self.rollout(batch, shared, local, grad=False).latents
        inp = self.window(batch, sample)
        sigma = self._sigma(shared)
        noise = torch.randn(inp.latents.shape, generator=local).to(inp.latents.device)
        out: dict[str, float] = {}
        if self.critic.head is None:
            loss = fake_score_loss(self.critic.fake, inp, sigma, noise)
            out["fake_loss"] = float(loss.detach())
        else:
            p = self.pcfg
            with self.tap.capture() as feats:
                loss = fake_score_loss(self.critic.fake, inp, sigma, noise)
            out["fake_loss"] = float(loss.detach())
            logit_fake = self._discriminate(feats, inp, detach=not p.gan_train_trunk)  # head-only: trunk sees no L_D
            real = self.window(batch, batch.latents)
            nb = noised(real, sigma, torch.randn(real.latents.shape, generator=local).to(real.latents.device))
            d_real = self._discriminator(real, nb, sigma, trunk_grad=p.gan_train_trunk)
            logit_real = d_real(nb.x_t)
            ld = d_loss(logit_real, logit_fake)
            out.update(
                d_loss=float(ld.detach()),
                d_real=float(logit_real.detach().mean()),
                d_fake=float(logit_fake.detach().mean()),
            )
            if p.gan_r1_weight > 0:  # APT's approximate R1 on the real inputs' generated frames
                delta = torch.randn(real.latents.shape, generator=local).to(real.latents.device)
                r1 = approx_r1(
                    d_real, nb.x_t, delta * (p.gan_r1_sigma * nb.loss_mask[:, None, :, None, None]), logit_real
                )
                out["r1"] = float(r1.detach())
                ld = ld + p.gan_r1_weight * r1
            loss = loss + p.gan_weight * ld
        out["critic_grad_norm"] = self._step(self.opt_critic, loss)
        self.counts["critic_updates"] += 1
        return out

    def student_update(self, batch: Batch, step: int) -> dict[str, float]:
        shared, local = step_generators(self.seed, step, self.dp_rank, self.pcfg.fake_updates)
        roll = self.rollout(batch, shared, local, grad=True)
        inp = self.window(batch, roll.latents)
        sigma = self._sigma(shared)
        noise = torch.randn(inp.latents.shape, generator=local).to(inp.latents.device)
        terms = dmd_step_loss(inp.latents, inp, self.teacher, self.critic.fake, sigma, noise, self.pcfg.guidance_scale)
        loss = terms.loss
        out = {"dmd_loss": float(terms.loss.detach()), "real_fake_gap": terms.gap, "sigma": sigma}
        if self.critic.head is None:
            out["student_grad_norm"] = self._step(self.opt_student, loss, self.ema, step)
        else:
            # The critic stays frozen through the backward too: the gradient flows through it into
            # x̂, never into it, and a checkpointed fake-score block recomputes its forward during
            # this backward, which must see the same (frozen) parameters as the recorded one.
            with frozen(self.critic):
                lg = g_loss(self._logits(inp, sigma, noise))
                out["g_loss"] = float(lg.detach())
                total = loss + self.pcfg.gan_weight * lg
                out["student_grad_norm"] = self._step(self.opt_student, total, self.ema, step)
        self.counts["student_updates"] += 1
        return out

    def step(self, batch: Batch, step: int) -> dict[str, float]:
        """`fake_updates` critic updates, then one student update (two-time-scale rule)."""
        logs: dict[str, float] = {}
        for sub in range(self.pcfg.fake_updates):
            for k, v in self.critic_update(batch, step, sub).items():
                logs[k] = logs.get(k, 0.0) + v / self.pcfg.fake_updates
        logs.update(self.student_update(batch, step))
        return logs
