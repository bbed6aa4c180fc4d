"""Post-training jobs (`titan-world post-train causal|dmd`) on the job runtime (titan_world/job.py).

The stage math lives in causal.py / distill.py; a job here loads its networks, readies them with
`parallel.parallelize` (student, critic, frozen teacher) and exports the student with
`export_model` to RUN_DIR/model/ (with `causal_chunk_frames` set, so `generate`/`serve` stream
it). Checkpoints, metrics, signals (SIGUSR1/SIGTERM -> checkpoint -> exit 75, Ctrl-C -> exit 130)
and the non-finite guard (skip; a streak stops with exit 3) are the runtime's, as in pretraining.

Several ranks form the pretraining mesh (`parallel.dp_replicate x dp_shard x cp`). The
data-parallel ranks read their own clips and draw their own noise; the `parallel.cp` ranks of one
group share a clip and its noise and split every sequence with Ulysses. With `posttrain.fsdp`
(default) the networks are FSDP2-sharded over dp_shard x cp (the checkpoint holds DCP shards, the
export gathers the full student); `posttrain.fsdp=false` keeps full replicas and all-reduces
gradients (`distill.sync_grads`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.mesh import resolve_dims
from parallel.parallelize import parallelize
from titan_world.config import ConfigError, TitanConfig
from titan_world.data.loader import build_train_loader
from titan_world.job import Job, noise_seed, run_job
from titan_world.model.codec import codec_from_config, default_vae_stride, latent_frames, pixel_frames
from titan_world.model.io import load_pretrained, pretrained_on_meta
from titan_world.model.moe import WanMoE, experts
from titan_world.model.text_encoder import build_text_encoder
from titan_world.posttrain.causal import ChunkLayout, diffusion_forcing_loss, forcing_sigmas
from titan_world.posttrain.distill import Batch, DMDTrainer, average_and_clip
from titan_world.posttrain.memory import teacher_dtype
from titan_world.posttrain.plan import posttrain_plan
from titan_world.train.metrics import MetricsLogger
from titan_world.train.state import export_model
from titan_world.train.weights import fill_weights


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[post-train] {msg}", file=sys.stderr, flush=True)


# -- models -----------------------------------------------------------------------------------------
def required_path(cfg: TitanConfig, key: str) -> Path:
    """`posttrain.<key>` (teacher, student): a job starts only from the networks it is given."""
    value = getattr(cfg.posttrain, key)
    if not value:
        what = (
            "a trained model to distil from" if key == "teacher" else "the causal student (post-train causal's model/)"
        )
        raise ConfigError(
            f"posttrain.{key} is unset: expected the folder of {what}, e.g. posttrain.{key}=RUN_DIR/model"
        )
    return Path(value)


def load_net(path: Path, device, dtype: torch.dtype = torch.float32):
    return load_pretrained(path, dtype=dtype, device=device)


def network(path: Path, device, pending: list | None, dtype: torch.dtype = torch.float32, student: bool = False):
    """The network(s) of checkpoint `path` (`student`: its high-noise expert, see `student_from`).

    `pending` None (one process, or replicas): loaded whole onto `device` in `dtype`. A list (the
    job shards): built on the meta device and queued there for `fill_pending`, which runs after
    the networks are sharded, so each rank allocates and reads only its own rows of every tensor:
    no rank ever holds a full copy (a 14B network is 57 GB of fp32)."""
    if pending is None:
        net = load_net(path, device, dtype)
        return student_from(net) if student else net
    net, folders = pretrained_on_meta(path)
    if student:
        net, folders = student_from(net), folders[:1]
    pending.append((net, folders))
    return net.to(dtype)


def fill_pending(pending: list, device) -> None:
    """Materialise the sharded meta networks queued by `network`, each rank its own shards."""
    for net, folders in pending:
        fill_weights(net, folders, device=device, seed=0)


def negative_context(cfg: TitanConfig, text_dim: int, text_len: int, device) -> torch.Tensor:
    """`posttrain.negative_prompt` through `data.text_encoder` (the encoder the dataset's captions
    went through): [1, text_len, text_dim], the real score's unconditional text. Once per job,
    on every rank (a bad encoder setting fails on all of them alike); the encoder is freed after."""
    p, te = cfg.posttrain, cfg.data.text_encoder
    try:
        encoder = build_text_encoder(te.kind, text_dim, text_len, te.path, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(
            f"posttrain.guidance_scale={p.guidance_scale} encodes posttrain.negative_prompt="
            f"{p.negative_prompt!r} with data.text_encoder: {e}"
        ) from None
    out = encoder.encode([p.negative_text()]).float().to(device)
    del encoder
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # umT5-XXL is ~11 GB: give it back before the networks fill the GPU
    return out


def student_from(net):
    """LingBot: the causal student starts from the high-noise expert (a dense teacher: itself)."""
    return net.high if isinstance(net, WanMoE) else net


def export_student(
    student, run_dir: Path, cfg: TitanConfig, rank: int, overrides: dict[str, torch.Tensor] | None = None
) -> Path:
    """RUN_DIR/model/ + posttrain.json; `overrides` replaces weights by name (the EMA). Collective under FSDP."""
    p = cfg.posttrain
    student.cfg.causal_chunk_frames = p.chunk_frames
    out = run_dir / "model"
    export_model(student, out, rank, overrides)
    if rank == 0:
        # Serving reads this back and streams the student exactly so (serving/loading.trained_geometry):
        # the horizon is the longest context it saw (stage 1 clips, stage 2 rollouts); past it the sink
        # keeps its trained distance. Clean t = 0 K/V refresh is the only mode post-training trains.
        horizon = max(latent_frames(p.clip_frames), 1 + p.rollout_chunks * p.chunk_frames)
        meta = {
            "chunk_frames": p.chunk_frames,
            "denoise_steps": p.denoise_steps,
            "sink_frames": p.sink_frames,
            "window_frames": p.window_frames,
            "horizon_frames": horizon,
            "kv_refresh": "clean",
        }
        (out / "posttrain.json").write_text(json.dumps(meta, indent=2))
    return out


# -- data --------------------------------------------------------------------------------------------
def make_loader(cfg: TitanConfig, frames: int, rank: int, world: int, seed: int):
    """The loader of `frames`-frame clips (the dataset is prepared by the job runtime)."""
    bs = cfg.posttrain.batch_size
    key = "posttrain.batch_size" + (f" x {world} data-parallel ranks" if world > 1 else "")
    return build_train_loader(cfg, frames, rank, world, seed, bs, global_batch=(key, bs * world))


# -- the jobs ----------------------------------------------------------------------------------------
def check_mesh(cfg: TitanConfig, world: int) -> None:
    """The `parallel` section must factor `world` ranks; the error names the keys. Called by the
    CLI before launching ranks and by every rank."""
    if world == 1 and cfg.parallel.cp != 1:
        raise ConfigError(
            f"parallel.cp={cfg.parallel.cp}: one process has no context parallelism; launch with --nproc N "
            "(a multiple of it)"
        )
    try:
        resolve_dims(cfg.parallel, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class PostTrainJob(Job):
    """What both stages share on top of the runtime: the mesh check, replicas or FSDP, the export."""

    inputs = ("teacher",)  # the posttrain.* networks a stage starts from

    def check_config(self, resume: bool) -> None:
        check_mesh(self.cfg, self.world)
        for key in self.inputs:
            required_path(self.cfg, key)

    @property
    def shards(self) -> bool:
        return self.world > 1 and self.cfg.posttrain.fsdp

    @property
    def placement(self) -> dict:
        """Where `parallelize` puts a loaded network: this device, the CP group, `model.attn_backend`."""
        return {"device": self.device, "cp": self.cp, "attn_backend": self.cfg.model.attn_backend}

    def announce(self, log: MetricsLogger) -> None:
        if self.world > 1:
            how = (
                "networks FSDP2-sharded" if self.shards else "full replicas, gradient all-reduce (posttrain.fsdp=false)"
            )
            cp = f"; Ulysses over {self.mesh.cp} ranks" if self.mesh.cp > 1 else ""
            log.message(f"[{self.tag}] {self.world} ranks, {self.mesh}: {how}{cp}")

    def export_weights(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """Weights that replace the student's in the export (None: its own), and what they are."""
        return None, "the student"

    def export(self, log: MetricsLogger) -> None:
        overrides, what = self.export_weights()
        export_student(self.student, self.run_dir, self.cfg, self.rank, overrides)
        log.message(f"[{self.tag}] exported {what} to {self.run_dir / 'model'}")


class CausalJob(PostTrainJob):
    """Stage 1: diffusion forcing with a block-causal mask (see causal.py)."""

    tag = "post-train causal"

    def build(self, resume_from: Path | None) -> None:
        cfg, p = self.cfg, self.cfg.posttrain
        self.total = cfg.train.steps if cfg.train.steps is not None else p.causal_steps
        self.teacher_path = required_path(cfg, "teacher")
        log(
            f"causal: student initialised from {self.teacher_path} (its high-noise expert if it is an MoE); "
            f"{self.total} steps"
        )
        pending = [] if self.shards else None
        # FP8, AC (exact: stage 1 has no KV cache), compile, then FSDP: before the optimizer
        self.student = network(self.teacher_path, self.device, pending, student=True).train()
        parallelize(self.student, self.fsdp_mesh, cfg.parallel, "student", **self.placement)
        if pending is not None:
            fill_pending(pending, self.device)
        self.use_actions = self.student.action_embedding is not None
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=p.causal_lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.loader = make_loader(cfg, p.clip_frames, self.dp_rank, self.dp_size, cfg.train.seed)
        self.layout = ChunkLayout(latent_frames(p.clip_frames), 1, p.chunk_frames)

    def state(self) -> dict:
        return {"student": self.student, "optim": self.opt, "progress": self.position, "dataloader": self.loader}

    def train_step(self, step: int, raw: dict) -> dict:
        p = self.cfg.posttrain
        b = Batch.from_loader(raw, self.use_actions, self.device)
        gen = torch.Generator().manual_seed(noise_seed(self.cfg.train.seed, step, self.dp_rank))
        sigma = forcing_sigmas(b.latents.shape[0], self.layout, p.forcing_timesteps, gen)
        noise = torch.randn(b.latents.shape, generator=gen).to(self.device)
        out = diffusion_forcing_loss(
            self.student,
            b.latents,
            b.context,
            sigma,
            noise,
            self.layout,
            actions=b.actions,
            with_i2v_channels=self.student.cfg.cond_channels > 0,
            sink_frames=p.sink_frames,
            window_frames=p.window_frames,
        )
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        norm = average_and_clip(self.opt, self.cfg.train.grad_clip, sharded=self.shards)
        loss = float(out.loss.detach())
        skipped, stop = self.agree(step, [loss, norm])
        if not skipped:  # else no update, as in pretraining
            self.opt.step()
        return {"loss": loss, "grad_norm": norm, "skipped": skipped, "stop": stop}


class DMDJob(PostTrainJob):
    """Stage 2: self-rollout + DMD (+ GAN head), two time scales (see distill.py)."""

    tag = "post-train dmd"
    loss_key = "dmd_loss"
    inputs = ("teacher", "student")

    def build(self, resume_from: Path | None) -> None:
        cfg, p = self.cfg, self.cfg.posttrain
        self.total = cfg.train.steps if cfg.train.steps is not None else p.dmd_steps
        self.teacher_path = required_path(cfg, "teacher")
        student_path = required_path(cfg, "student")
        log(
            f"dmd: teacher {self.teacher_path}, student {student_path}; {self.total} steps x "
            f"({p.fake_updates} critic + 1 student) updates"
        )
        pending = [] if self.shards else None  # sharded: meta-built, filled per shard after sharding
        # the teacher is stored as it will be used; the fake score starts from the teacher
        teacher = network(self.teacher_path, self.device, pending, teacher_dtype(p.teacher_dtype, self.device))
        self.student = network(student_path, self.device, pending, student=True).train()
        fake = network(self.teacher_path, self.device, pending).train()
        sc = self.student.cfg
        # the real score's negative text, encoded once (unused, so not encoded, at guidance 1)
        uncond = negative_context(cfg, sc.text_dim, sc.text_len, self.device) if p.guidance_scale != 1.0 else None
        # the scores' given frame re-encoded as a start image (posttrain.score_cond): the data's codec
        try:
            codec = codec_from_config(cfg.data.codec, device=self.device) if p.reencodes_score_cond else None
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(
                f"posttrain.score_cond=reencode (grad_chunks {p.grad_chunks} < rollout_chunks "
                f"{p.rollout_chunks}) decodes and re-encodes the scores' given frame with data.codec: "
                f"{e}"
            ) from None
        self.trainer = DMDTrainer(
            self.student,
            teacher,
            fake,
            p,
            seed=cfg.train.seed,
            dp_rank=self.dp_rank,
            grad_clip=cfg.train.grad_clip,
            mesh=self.fsdp_mesh,
            parallel=cfg.parallel,
            **self.placement,
            fill=(lambda: fill_pending(pending, self.device)) if pending is not None else None,
            uncond_context=uncond,
            codec=codec,
        )
        self.use_actions = self.student.action_embedding is not None
        self.clip_frames = pixel_frames(1 + p.rollout_chunks * p.chunk_frames)
        self.loader = make_loader(cfg, self.clip_frames, self.dp_rank, self.dp_size, cfg.train.seed)
        self.position.update(self.trainer.counts)
        self.check_memory(teacher)

    def check_memory(self, teacher: torch.nn.Module) -> None:
        """Stage 2's per-GPU memory on this mesh (`posttrain.plan`), logged on GPU with a warning
        when it exceeds the device: a 14B job would otherwise load for minutes and then run out of
        memory in its first rollout. Computed on every device (so CPU runs exercise it)."""
        if self.world > 1 and not self.shards:
            return  # full replicas: the plan models FSDP
        cfg, data = self.cfg, self.cfg.data
        stride = default_vae_stride(self.student.cfg) if data.codec.kind == "wan_vae" else data.codec.spatial_stride
        cuda = self.device.type == "cuda"
        try:
            plan = posttrain_plan(
                self.student.cfg,
                cfg.posttrain,
                data.height,
                data.width,
                gpus=self.mesh.fsdp_size,
                cp=self.mesh.cp,
                teacher_experts=len(experts(teacher)),
                teacher_bytes=next(teacher.parameters()).dtype.itemsize,
                ac=cfg.parallel.activation_checkpoint,
                ac_every=cfg.parallel.ac_every,
                gpu_mem_gb=torch.cuda.get_device_properties(self.device).total_memory / 1e9 if cuda else float("inf"),
                vae_stride=stride,
            )
        except ValueError:
            return  # a geometry the plan does not cover; the job itself names what is wrong
        if cuda:
            log(
                f"dmd: estimated peak per GPU: student step {plan.student_step_gb:.1f} GB, critic step "
                f"{plan.critic_step_gb:.1f} GB (titan-world inspect CONFIG --posttrain)"
            )
            if not plan.fits:
                log(
                    f"WARNING: that exceeds this GPU's {plan.gpu_mem_gb:.0f} GB: raise parallel.cp (up to 8 in a "
                    "node), add GPUs, or lower posttrain.grad_chunks / window_frames; `titan-world inspect CONFIG "
                    "--posttrain --gpu-mem N` finds a mesh"
                )

    def state(self) -> dict:
        t = self.trainer
        state = {
            "student": self.student,
            "critic": t.critic,
            "opt_student": t.opt_student,
            "opt_critic": t.opt_critic,
            "progress": self.position,
            "dataloader": self.loader,
        }
        if t.ema is not None:
            state["ema"] = t.ema
        return state

    def export_weights(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        ema = self.trainer.ema
        if ema is None or not self.cfg.posttrain.export_ema:
            return None, "the student (raw weights)"
        return ema.state_for_export(), f"the student's EMA (decay {ema.decay})"

    def train_step(self, step: int, raw: dict) -> dict:
        t = self.trainer
        t.counts.update({k: self.position[k] for k in t.counts if k in self.position})
        out = t.step(Batch.from_loader(raw, self.use_actions, self.device), step)
        self.position.update(t.counts)
        watched = [v for k, v in out.items() if k.endswith(("loss", "grad_norm"))]
        skipped, stop = self.agree(step, watched)  # the updates skipped themselves (same rule)
        return {**out, "skipped": skipped, "stop": stop}


def run_stage(stage: str, cfg: TitanConfig, resume: bool = False) -> int:
    """Run post-training stage `causal` or `dmd`; returns the exit code."""
    return run_job(CausalJob if stage == "causal" else DMDJob, cfg, resume)
