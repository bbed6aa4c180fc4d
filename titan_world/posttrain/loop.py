"""Job glue for `titan-world post-train causal|dmd`: models, data, checkpoints, logging, export.

The stage math lives in causal.py / distill.py; this file only wires it to a run directory:
checkpoints with `parallel.Checkpointer` (DCP, atomic, resumable), metrics.jsonl with the
trainer's `MetricsLogger`, the final student exported with `save_pretrained`-compatible
`export_model` to RUN_DIR/model/ (with `causal_chunk_frames` set, so `generate`/`serve` stream
it), SIGUSR1/SIGTERM -> checkpoint -> exit 75, Ctrl-C -> checkpoint -> exit 130, non-finite
updates skipped and a streak of them stopping the job (exit 3), as in pretraining (train/faults.py).

Several ranks form the pretraining mesh (`parallel.dp_replicate x dp_shard x cp`). The
data-parallel ranks read their own clips and draw their own noise; the `parallel.cp` ranks of one
group share a clip and its noise and split every sequence with Ulysses (`sharding.set_context_parallel`).
With `posttrain.fsdp` (default) the networks are FSDP2-sharded over dp_shard x cp (`sharding.py`;
the checkpoint holds DCP shards, the export gathers the full student); `posttrain.fsdp=false`
keeps full replicas and all-reduces gradients (`distill.sync_grads`).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.ulysses import UlyssesContext
from titan_world.config import ConfigError, TitanConfig, resolve_run_dir, save_config
from titan_world.data.loader import check_data_path, prepare_dataset
from titan_world.exit_codes import EXIT_DIVERGED, EXIT_PREEMPTED  # noqa: F401  (EXIT_PREEMPTED: tests compare with it)
from titan_world.model.codec import codec_from_config, latent_frames
from titan_world.posttrain.causal import ChunkLayout, diffusion_forcing_loss, forcing_sigmas
from titan_world.posttrain.distill import Batch, DMDTrainer, average_and_clip
from titan_world.posttrain.memory import teacher_dtype
from titan_world.posttrain.sharding import Sharding, set_context_parallel
from titan_world.train.faults import (
    NonFiniteGuard,
    StopFlag,
    finite_on_all_ranks,
    stop_exit_code,
    stop_message,
)
from titan_world.train.state import resume_point

DEMO_TEACHER = Path("runs/demo/train/model")
DEMO_STUDENT = Path("runs/demo/causal/model")


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[post-train] {msg}", file=sys.stderr, flush=True)


# -- models -----------------------------------------------------------------------------------------
def bootstrap_teacher(cfg: TitanConfig, out: Path) -> Path:
    """A short `titan-world train` run (rank 0, subprocess) when no teacher exists anywhere."""
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file() and (not dist.is_initialized() or dist.get_rank() == 0):
        log(
            f"no teacher given and none at {DEMO_TEACHER}: training a tiny one ({cfg.posttrain.bootstrap_steps} steps) in {out}"
        )
        cmd = [
            sys.executable,
            "-m",
            "launch.cli",
            "train",
            f"run.dir={out}",
            f"train.steps={cfg.posttrain.bootstrap_steps}",
            f"data.path={cfg.data.path}",
            "run.progress=false",
            "run.wandb=disabled",
            "model.action.enabled=true",
        ]
        subprocess.run(cmd, check=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return model_dir


def resolve_teacher(cfg: TitanConfig, run_dir: Path) -> Path:
    p = cfg.posttrain.teacher
    if p:
        return Path(p)
    if DEMO_TEACHER.is_dir():
        return DEMO_TEACHER
    existing = run_dir / "teacher" / "model"
    return existing if (existing / "config.json").is_file() else bootstrap_teacher(cfg, run_dir / "teacher")


def load_net(path: Path, device, dtype: torch.dtype = torch.float32):
    from titan_world.model.io import load_pretrained

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
    from titan_world.model.io import pretrained_on_meta

    net, folders = pretrained_on_meta(path)
    if student:
        net, folders = student_from(net), folders[:1]
    pending.append((net, folders))
    return net.to(dtype)


def fill_pending(pending: list, device) -> None:
    """Materialise the sharded meta networks queued by `network`, each rank its own shards."""
    from titan_world.train.weights import fill_weights

    for net, folders in pending:
        fill_weights(net, folders, device=device, seed=0)


def negative_context(cfg: TitanConfig, text_dim: int, text_len: int, device) -> torch.Tensor:
    """`posttrain.negative_prompt` through `data.text_encoder` (the encoder the dataset's captions
    went through): [1, text_len, text_dim], the real score's unconditional text. Once per job,
    on every rank (a bad encoder setting fails on all of them alike); the encoder is freed after."""
    from titan_world.model.text_encoder import build_text_encoder

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
    from titan_world.model.moe import WanMoE

    return net.high if isinstance(net, WanMoE) else net


def export_student(
    student, run_dir: Path, cfg: TitanConfig, rank: int, overrides: dict[str, torch.Tensor] | None = None
) -> Path:
    """RUN_DIR/model/ + posttrain.json; `overrides` replaces weights by name (the EMA). Collective under FSDP."""
    from titan_world.train.state import export_model

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
    """The loader of `frames`-frame clips (the dataset is prepared by the job, see `PostTrainJob`)."""
    from titan_world.data.loader import build_train_loader

    bs = cfg.posttrain.batch_size
    key = "posttrain.batch_size" + (f" x {world} data-parallel ranks" if world > 1 else "")
    return build_train_loader(cfg, frames, rank, world, seed, bs, global_batch=(key, bs * world))


def eval_batches(
    cfg: TitanConfig, frames: int, use_actions: bool, device, seed: int = 12345
) -> list[tuple[Batch, dict]]:
    """A few fixed clips (own seed) with ground truth, for before/after comparisons."""
    loader = make_loader(cfg, frames, 0, 1, seed)
    out = []
    try:
        for raw in loader:
            out.append((Batch.from_loader(raw, use_actions, device), raw))
            if len(out) * cfg.posttrain.batch_size >= cfg.posttrain.eval_clips:
                break
    finally:
        loader.close()
    return out


# -- the loop ----------------------------------------------------------------------------------------
def check_mesh(cfg: TitanConfig, world: int) -> None:
    """The `parallel` section must factor `world` ranks; the error names the keys. Called by the
    CLI before launching ranks and by every rank."""
    from parallel.mesh import resolve_dims

    if world == 1 and cfg.parallel.cp != 1:
        raise ConfigError(
            f"parallel.cp={cfg.parallel.cp}: one process has no context parallelism; launch with --nproc N (a multiple of it)"
        )
    try:
        resolve_dims(cfg.parallel, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def job_mesh(cfg: TitanConfig, world: int, device: torch.device):
    """The job's `ParallelMesh` (None on one process): data-parallel rank and size for the loader
    and the noise, the CP group for Ulysses, the FSDP mesh."""
    check_mesh(cfg, world)
    if world == 1:
        return None
    from parallel.mesh import build_mesh

    return build_mesh(cfg.parallel, world, device.type)


def sharding_for(cfg: TitanConfig, mesh) -> Sharding | None:
    """FSDP2 sharding when the job has several ranks and `posttrain.fsdp` is on, else None
    (one process, or full replicas with gradient all-reduce)."""
    if mesh is None or not cfg.posttrain.fsdp:
        return None
    return Sharding(mesh, cfg.parallel)


class PostTrainJob:
    """Shared skeleton of both stages: setup, resume, step loop with checkpoints, export."""

    stage = "?"

    def __init__(self, cfg: TitanConfig, resume: bool):
        from parallel.checkpoint import Checkpointer
        from parallel.distributed import init_distributed

        self.cfg, self.resume = cfg, resume
        self.rank, self.world, self.device = init_distributed()
        self.mesh = job_mesh(cfg, self.world, self.device)  # before any work: a bad mesh is a config error
        check_data_path(cfg)
        if resume and not cfg.run.dir:
            raise ConfigError("resume: run.dir is unset; name the run to continue (run.dir=RUN_DIR)")
        torch.manual_seed(cfg.train.seed)  # new modules (GAN head) start identical on every rank and run
        if self.world > 1:  # every rank must use rank 0's run dir
            box = [str(resolve_run_dir(cfg)) if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            cfg.run.dir = box[0]
        self.run_dir = resolve_run_dir(cfg)
        self.ckpt = Checkpointer(self.run_dir, keep_last=cfg.train.keep_last)
        self.resume_from = resume_point(self.ckpt, resume)  # before anything is written into the run dir
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
            prepare_dataset(cfg, progress=False)  # synthetic data when data.path asks for it; the other ranks wait
        if self.world > 1:
            dist.barrier()
        self.total = cfg.train.steps if cfg.train.steps is not None else self.default_steps()
        self.progress = {"step": 0}
        self.dp_rank, self.dp_size = (self.mesh.dp_rank, self.mesh.dp_size) if self.mesh is not None else (0, 1)
        self.cp = UlyssesContext.from_mesh(self.mesh, cfg.parallel.cp_backend) if self.mesh is not None else None
        self.sharding = sharding_for(cfg, self.mesh)
        if self.world > 1:
            how = (
                "networks FSDP2-sharded"
                if self.sharding
                else "full replicas, gradient all-reduce (posttrain.fsdp=false)"
            )
            log(
                f"{self.world} ranks, {self.mesh}: {how}"
                + (f"; Ulysses over {self.mesh.cp} ranks" if self.mesh.cp > 1 else "")
            )

    def spread(self, net: torch.nn.Module) -> torch.nn.Module:
        """Put `net` (every expert of an MoE) on the job's CP group; no-op without CP."""
        if self.cp is not None and self.cp.size > 1:
            heads = net.cfg.num_heads
            if heads % self.cp.size:
                raise ConfigError(
                    f"parallel.cp={self.cp.size}: the network has {heads} attention heads; Ulysses needs them divisible by the CP degree"
                )
        return set_context_parallel(net, self.cp)

    def default_steps(self) -> int:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def train_step(self, step: int, raw: dict) -> dict:
        raise NotImplementedError

    def export_weights(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """Weights that replace the student's in the export (None: its own), and what they are."""
        return None, "the student"

    def finish(self, metrics) -> None:
        overrides, what = self.export_weights()
        export_student(self.student, self.run_dir, self.cfg, self.rank, overrides)
        metrics.message(f"[post-train {self.stage}] exported {what} to {self.run_dir / 'model'}")

    def fit(self) -> int:
        from titan_world.train.metrics import MetricsLogger

        cfg, ckpt, tag = self.cfg, self.ckpt, f"post-train {self.stage}"
        start = 0
        if self.resume_from is not None:
            start = ckpt.load_latest(self.state()) or 0  # falls back to an older checkpoint if the newest fails to load
            log(f"{self.stage}: resumed at step {start} from {ckpt.path_for(start)}")
        self.progress["step"] = start
        metrics = MetricsLogger(
            self.run_dir, cfg, rank=self.rank, total_steps=self.total, initial_step=start, resumed=start > 0
        )
        guard = NonFiniteGuard(self.progress, cfg.train.max_bad_steps, tag, metrics.message, ckpt.latest)
        stop = StopFlag(tag)
        stop.install()
        batches = self.loader.batches()
        step, rc = start, 0
        try:
            while step < self.total:
                t0 = time.perf_counter()
                raw = next(batches)
                if step in cfg.train.inject_nan_steps:  # test hook: a batch that makes every loss non-finite
                    raw = {**raw, "latents": raw["latents"] * float("nan")}
                out = self.train_step(step, raw)
                watched = [v for k, v in out.items() if k.endswith(("loss", "grad_norm"))]
                skipped = not finite_on_all_ranks(watched, self.device)  # the updates skipped themselves (same rule)
                values = {k: v if math.isfinite(v) else None for k, v in out.items()}
                record = {
                    "step": step,
                    "stage": self.stage,
                    **values,
                    "skipped": skipped,
                    "step_time_s": time.perf_counter() - t0,
                }
                metrics.log(record)
                metrics.progress(1, {k: f"{v:.4f}" for k, v in out.items() if k.endswith("loss")})
                step += 1
                self.progress["step"] = step
                if guard.after_step(step - 1, out.get("loss", out.get("dmd_loss", float("nan"))), skipped):
                    rc = EXIT_DIVERGED
                    break
                hook = step == cfg.train.preempt_at_step  # test hook: behave as if SIGUSR1 arrived
                code = max(stop.agreed(self.device), 1.0 if hook else 0.0)
                every = cfg.train.ckpt_every
                periodic = every and step % every == 0 and step < self.total and not guard.in_streak
                if code or periodic:
                    path = ckpt.save(step, self.state())
                if code:
                    metrics.message(stop_message(tag, code, path))
                    rc = stop_exit_code(code)
                    break
            if rc == 0:
                if start < self.total:
                    ckpt.save(step, self.state())
                self.finish(metrics)
            return rc
        finally:
            stop.restore()
            metrics.close()
            self.loader.close()


class CausalJob(PostTrainJob):
    """Stage 1: diffusion forcing with a block-causal mask (see causal.py)."""

    stage = "causal"

    def __init__(self, cfg: TitanConfig, resume: bool = False):
        super().__init__(cfg, resume)
        p = cfg.posttrain
        self.teacher_path = resolve_teacher(cfg, self.run_dir)
        log(
            f"causal: student initialised from {self.teacher_path} (its high-noise expert if it is an MoE); {self.total} steps"
        )
        pending = [] if self.sharding is not None else None
        self.student = self.spread(network(self.teacher_path, self.device, pending, student=True).train())
        from titan_world.posttrain.memory import prepare_network

        prepare_network(self.student, cfg.parallel)  # FP8, AC (exact: stage 1 has no KV cache), compile; then FSDP
        if self.sharding is not None:
            self.sharding.network(self.student)  # before the optimizer: its params become DTensor shards
            fill_pending(pending, self.device)
        self.use_actions = self.student.action_embedding is not None
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=p.causal_lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.loader = make_loader(cfg, p.clip_frames, self.dp_rank, self.dp_size, cfg.train.seed)
        self.layout = ChunkLayout(latent_frames(p.clip_frames), 1, p.chunk_frames)

    def default_steps(self) -> int:
        return self.cfg.posttrain.causal_steps

    def state(self) -> dict:
        return {"student": self.student, "optim": self.opt, "progress": self.progress, "dataloader": self.loader}

    def train_step(self, step: int, raw: dict) -> dict:
        p = self.cfg.posttrain
        b = Batch.from_loader(raw, self.use_actions, self.device)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.cfg.train.seed}/{step}/{self.dp_rank}".encode()))
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
        norm = average_and_clip(self.opt, self.cfg.train.grad_clip, sharded=self.sharding is not None)
        loss = float(out.loss.detach())
        if finite_on_all_ranks([loss, norm], self.device):  # else skipped (no update), as in pretraining
            self.opt.step()
        return {"loss": loss, "grad_norm": norm}


class DMDJob(PostTrainJob):
    """Stage 2: self-rollout + DMD (+ GAN head), two time scales (see distill.py)."""

    stage = "dmd"

    def __init__(self, cfg: TitanConfig, resume: bool = False):
        super().__init__(cfg, resume)
        p = cfg.posttrain
        self.teacher_path = resolve_teacher(cfg, self.run_dir)
        student_path = Path(p.student) if p.student else (DEMO_STUDENT if DEMO_STUDENT.is_dir() else None)
        if student_path is None:
            log("dmd: no causal student given (posttrain.student) and none in runs/demo: starting from the teacher")
            student_path = self.teacher_path
        log(
            f"dmd: teacher {self.teacher_path}, student {student_path}; {self.total} steps x ({p.fake_updates} critic + 1 student) updates"
        )
        pending = [] if self.sharding is not None else None  # sharded: meta-built, filled per shard after sharding
        teacher = self.spread(
            network(self.teacher_path, self.device, pending, teacher_dtype(p.teacher_dtype, self.device))
        )  # stored as it will be used
        self.student = self.spread(network(student_path, self.device, pending, student=True).train())
        fake = self.spread(
            network(self.teacher_path, self.device, pending).train()
        )  # fake score: initialised from the teacher
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
            sharding=self.sharding,
            parallel=cfg.parallel,
            device=self.device,
            fill=(lambda: fill_pending(pending, self.device)) if pending is not None else None,
            uncond_context=uncond,
            codec=codec,
        )
        self.use_actions = self.student.action_embedding is not None
        rollout_latents = 1 + p.rollout_chunks * p.chunk_frames
        self.clip_frames = 1 + 4 * (rollout_latents - 1)
        self.loader = make_loader(cfg, self.clip_frames, self.dp_rank, self.dp_size, cfg.train.seed)
        self.progress.update(self.trainer.counts)
        self.check_memory(teacher)

    def check_memory(self, teacher: torch.nn.Module) -> None:
        """Stage 2's per-GPU memory on this mesh (`posttrain.plan`), logged on GPU with a warning
        when it exceeds the device: a 14B job would otherwise load for minutes and then run out of
        memory in its first rollout. Computed on every device (so CPU runs exercise it)."""
        from titan_world.model.codec import default_vae_stride
        from titan_world.model.moe import experts
        from titan_world.posttrain.plan import posttrain_plan

        if self.world > 1 and self.sharding is None:
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
                gpus=self.mesh.fsdp_size if self.mesh else 1,
                cp=self.mesh.cp if self.mesh else 1,
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
                f"dmd: estimated peak per GPU: student step {plan.student_step_gb:.1f} GB, critic step {plan.critic_step_gb:.1f} GB "
                f"(titan-world inspect CONFIG --posttrain)"
            )
            if not plan.fits:
                log(
                    f"WARNING: that exceeds this GPU's {plan.gpu_mem_gb:.0f} GB: raise parallel.cp (up to 8 in a node), add GPUs, "
                    "or lower posttrain.grad_chunks / window_frames; `titan-world inspect CONFIG --posttrain --gpu-mem N` finds a mesh"
                )

    def default_steps(self) -> int:
        return self.cfg.posttrain.dmd_steps

    def state(self) -> dict:
        t = self.trainer
        state = {
            "student": self.student,
            "critic": t.critic,
            "opt_student": t.opt_student,
            "opt_critic": t.opt_critic,
            "progress": self.progress,
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
        t.counts.update({k: self.progress[k] for k in t.counts if k in self.progress})
        out = t.step(Batch.from_loader(raw, self.use_actions, self.device), step)
        self.progress.update(t.counts)
        return out


def run_stage(stage: str, cfg: TitanConfig, resume: bool = False) -> int:
    from parallel.distributed import destroy

    try:
        job = (CausalJob if stage == "causal" else DMDJob)(cfg, resume)
        return job.fit()
    finally:
        destroy()
