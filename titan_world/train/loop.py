"""Training (`titan-world train`): flow matching over curriculum stages, on any mesh, resumable
exactly; a `titan_world.job.Job` (setup, signals, non-finite guard, checkpoints, export live there).

One step = pick the expert (same on every rank), noise each sample (its own generator, seeded by
the step and the sample's identity, so losses do not depend on how the global batch is split
over ranks), forward/backward over micro-batches, clip, one collective + one host sync for
(loss, non-finite flag, stop flag), then the optimizer step (skipped on a non-finite loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.mesh import resolve_dims
from parallel.meta_init import materialize
from parallel.parallelize import parallelize
from titan_world.conditioning import actions_from_batch, training_batch_inputs
from titan_world.config import ConfigError, TitanConfig
from titan_world.data.loader import build_train_loader
from titan_world.diffusion.flow import sample_sigma, unshift_sigma
from titan_world.job import Job, noise_seed, run_job
from titan_world.model import WanMoE, build_model
from titan_world.model.flops import device_peak_tflops, train_step_flops
from titan_world.train import adapter as adapter_mod
from titan_world.train.action_check import action_following_check, format_check
from titan_world.train.metrics import MetricsLogger, peak_memory_gb
from titan_world.train.optim import EMA, build_optimizer, clip_grad_norm, lr_factor, set_lr
from titan_world.train.state import export_model, full_state_dict, peek_trainer_state
from titan_world.train.weights import base_folders, fill_weights, networks, train_model_config


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    frames: int
    shift: float
    start: int  # first global step of the stage
    end: int  # one past its last step
    global_batch: int
    lr: float


def plan_stages(cfg: TitanConfig) -> list[Stage]:
    """Stages laid out on the global step axis; `train.steps` truncates (or extends the last)."""
    t = cfg.train
    stages, start = [], 0
    total = t.steps if t.steps is not None else sum(s.steps for s in t.stages)
    for i, s in enumerate(t.stages):
        end = min(start + s.steps, total) if i < len(t.stages) - 1 else total
        if end <= start and i < len(t.stages) - 1:
            continue
        stages.append(Stage(i, s.name, s.frames, s.shift, start, end, s.global_batch or t.global_batch, s.lr or t.lr))
        start = end
        if start >= total:
            break
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    for s in stages:
        if step < s.end:
            return s
    return stages[-1]


def check_train_config(cfg: TitanConfig, world_size: int, resuming: bool = False) -> None:
    """Checks that need the world size or the file system; raised before any work starts (names
    the key). `train.base_checkpoint` is checked (folder layout, config.json vs model.*) unless
    the run resumes from its own checkpoint, which holds the weights."""
    try:
        r, s, c = resolve_dims(cfg.parallel, world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = r * s
    t = cfg.train
    for i, st in enumerate(t.stages):
        gb = st.global_batch or t.global_batch
        key = f"train.stages[{i}].global_batch" if st.global_batch else "train.global_batch"
        if gb % dp:
            raise ConfigError(
                f"{key}={gb}: expected a multiple of the data-parallel size {dp} (world {world_size} / cp {c})"
            )
        if t.micro_batch and (gb // dp) % t.micro_batch:
            raise ConfigError(f"train.micro_batch={t.micro_batch}: expected a divisor of the per-rank batch {gb // dp}")
        if st.cp is not None and st.cp != c:
            raise ConfigError(
                f"train.stages[{i}].cp={st.cp}: this job runs cp={c}; run stages with another CP degree as their "
                "own job (launch.stages=chain)"
            )
    if t.steps is not None and t.steps < 1:
        raise ConfigError(f"train.steps={t.steps}: expected >= 1")
    if t.task == "action_finetune" and not t.base_checkpoint:
        raise ConfigError(
            "train.base_checkpoint=None: action_finetune needs a base model (a Wan folder or a run dir with model/)"
        )
    if t.base_checkpoint and not resuming:
        base_folders(t.base_checkpoint, train_model_config(cfg), t.expert)
    if t.profile_steps and len(t.profile_steps) != 2:
        raise ConfigError(f"train.profile_steps={t.profile_steps}: expected [start, end]")
    if t.ckpt_every < 0:
        raise ConfigError(f"train.ckpt_every={t.ckpt_every}: expected >= 0 (0: only at the end and on preemption)")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={t.ema_decay}: expected 0 (off) or a decay in (0, 1)")
    if t.mixed_precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.mixed_precision={t.mixed_precision!r}: expected auto, bf16 or fp32")


class Trainer(Job):
    """Flow matching over curriculum stages (pretraining, action finetuning)."""

    tag = "train"

    def check_config(self, resume: bool) -> None:
        check_train_config(self.cfg, self.world, resuming=resume)

    def build(self, resume_from: Path | None) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.stages = plan_stages(cfg)
        self.total = self.stages[-1].end
        self.amp = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and self.device.type == "cuda")
        # -- model: built on the meta device, parallelized, then each rank fills only its shards ------
        self.model_cfg = train_model_config(cfg)
        with torch.device("meta"):
            model = build_model(self.model_cfg)
        if t.task == "action_finetune":
            self.trainable_names = adapter_mod.freeze_backbone(model, t.train_modulation)
        else:
            self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.float8_layers = parallelize(
            model, self.fsdp_mesh, cfg.parallel, "train", device=self.device, cp=self.cp
        ).float8_layers
        self.weights_note = self._fill_weights(model, resuming=resume_from is not None)
        self.model = model
        names = set(self.trainable_names)
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if n in names]
        self.params = [p for _, p in self.named_trainable]
        self.optimizer = build_optimizer(self.params, t, self.device)
        self.ema = EMA(self.named_trainable, t.ema_decay) if t.ema_decay > 0 else None
        self.position.update({"skipped": 0, "bad_streak": 0, "stage": 0})
        if resume_from is not None:  # the loader is built for the checkpoint's stage (its clip length)
            self.position.update(peek_trainer_state(resume_from))
        self.peak = device_peak_tflops(self.device, t.peak_tflops)
        self.stage = stage_at(self.stages, self.position["step"])
        self.loader = self._build_loader(self.stage)

    def load(self, path: Path) -> None:
        self.ckpt.load(path, self.state())
        if self.ckpt.loaded_from != path and stage_at(self.stages, self.position["step"]) is not self.stage:
            # The newest failed to load and the older one that did is in an earlier stage: the
            # loader was built for the newer one's clip length; rebuild it and restore its state.
            self._enter_stage(stage_at(self.stages, self.position["step"]))
            self.ckpt.load(self.ckpt.loaded_from, self.state())

    # -- setup helpers ------------------------------------------------------------------------
    def _fill_weights(self, model: nn.Module, resuming: bool) -> str:
        """Materialise the meta-built model's local shards: from `train.base_checkpoint`, or Wan's
        random initialisation (seeded by train.seed); left to the checkpoint load when resuming
        (the base weights are not read). Returns a line for the log."""
        t = self.cfg.train
        if resuming:
            for _, net in networks(model):
                materialize(net, self.device, None)  # Checkpointer.load sets every tensor (strict)
            return "weights from the checkpoint"
        folders = base_folders(t.base_checkpoint, self.model_cfg, t.expert) if t.base_checkpoint else None
        fresh = fill_weights(model, folders, device=self.device, seed=t.seed, fresh=adapter_mod.adapter_starts_fresh)
        if not folders:
            return f"weights: Wan's random initialisation (train.seed={t.seed})"
        note = "weights from " + ", ".join(str(f) for f in folders)
        return note + (
            f"; the action adapter ({len(fresh)} tensors) starts fresh, a no-op until trained" if fresh else ""
        )

    def _build_loader(self, stage: Stage):
        per_rank = stage.global_batch // self.dp_size
        self.micro = self.cfg.train.micro_batch or per_rank
        self.accum = per_rank // self.micro
        key = (
            f"train.stages[{stage.index}].global_batch"
            if self.cfg.train.stages[stage.index].global_batch
            else "train.global_batch"
        )
        return build_train_loader(
            self.cfg,
            stage.frames,
            self.dp_rank,
            self.dp_size,
            self.cfg.train.seed,
            self.micro,
            global_batch=(key, stage.global_batch),
        )

    def state(self) -> dict:
        state = {"model": self.model, "optimizer": self.optimizer, "trainer": self.position, "dataloader": self.loader}
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    def _enter_stage(self, stage: Stage) -> None:
        self.loader.close()
        self.stage = stage
        self.position["stage"] = stage.index
        self.loader = self._build_loader(stage)
        self.batches = self.loader.batches()

    def next_batch(self, step: int) -> list[dict]:
        return [next(self.batches) for _ in range(self.accum)]

    def log_due(self, step: int) -> bool:
        return step % self.cfg.run.log_every == 0 or step + 1 == self.total

    def announce(self, log: MetricsLogger) -> None:
        if self.resumed_from is None:
            log.message(f"[train] {self.weights_note}")
        log.message(
            f"[train] run dir {self.run_dir}; {self.total} steps over stages "
            + ", ".join(f"{s.name} ({s.frames} frames, shift {s.shift}, steps {s.start}-{s.end})" for s in self.stages)
            + f"; {self.world} rank(s), mesh {self.mesh}"
            + (
                f"; FP8 GEMMs ({self.cfg.parallel.float8}) in {self.float8_layers} linear layers"
                if self.float8_layers
                else ""
            )
        )

    def after_step(self, log: MetricsLogger) -> None:
        step = self.position["step"]
        if step == self.stage.end and step < self.total:
            nxt = stage_at(self.stages, step)
            log.message(
                f"[train] step {step}: stage {self.stage.name} done -> stage {nxt.name} "
                f"({nxt.frames} frames, shift {nxt.shift})"
            )
            self._enter_stage(nxt)

    # -- one step -----------------------------------------------------------------------------
    def _expert(self, step: int) -> str | None:
        """Which MoE expert runs this step: drawn from a (seed, step) generator, so every rank agrees
        without communication; P(high) = the shifted-sigma mass above the boundary."""
        if not isinstance(self.model, WanMoE):
            return None
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step)
        p_high = 1.0 - float(unshift_sigma(self.model.boundary, self.stage.shift))
        return "high" if torch.rand((), generator=g).item() < p_high else "low"

    def _sigma_range(self, expert: str | None) -> tuple[float, float]:
        boundary = self.cfg.model.boundary
        which = expert or (self.cfg.train.expert if self.cfg.train.expert != "all" else None)
        if which == "high":
            return boundary, 1.0
        if which == "low":
            return 0.0, boundary
        return 0.0, 1.0

    def _micro_loss(self, net: nn.Module, batch: dict, step: int, lo: float, hi: float) -> torch.Tensor:
        latents = batch["latents"].to(self.device, non_blocking=True)
        cond_mask = batch["cond_mask"].to(self.device, non_blocking=True)
        b = latents.shape[0]
        sigma = torch.empty(b, device=self.device)
        noise = torch.empty_like(latents)
        for i in range(b):  # per-sample streams: invariant to how the global batch is split
            g = torch.Generator(self.device).manual_seed(
                noise_seed(self.cfg.train.seed, step, batch["episode_ids"][i], int(batch["start_frames"][i]))
            )
            sigma[i] = sample_sigma((1,), self.stage.shift, lo, hi, generator=g, device=self.device)[0]
            noise[i] = torch.randn(latents.shape[1:], generator=g, device=self.device)
        nb = training_batch_inputs(self.model_cfg, batch, latents, cond_mask, sigma, noise, self.cfg.data.codec)
        actions = actions_from_batch(
            {k: batch[k].to(self.device) for k in ("actions", "c2w", "intrinsics")}, self.model_cfg.action.enabled
        )
        context = batch["text"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            pred = net(nb.x_t, nb.t, context, cond=nb.cond, actions=actions)
        # per-sample mean over generated frames, then mean over samples: equal sample weights, so
        # the data-parallel mean of rank losses is exactly the global-batch loss
        err = (pred.float() - nb.target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
        per_sample = (err * nb.loss_mask).sum(1) / nb.loss_mask.sum(1).clamp_min(1.0)
        return per_sample.mean()

    def _set_grad_sync(self, enabled: bool) -> None:
        if self.world > 1:
            for _, net in networks(self.model):
                if hasattr(net, "set_requires_gradient_sync"):
                    net.set_requires_gradient_sync(enabled)

    def train_step(self, step: int, batches: list[dict]) -> dict:
        expert = self._expert(step)
        net = self.model.expert(expert) if expert else self.model
        lo, hi = self._sigma_range(expert)
        set_lr(
            self.optimizer,
            self.stage.lr
            * lr_factor(
                step,
                self.total,
                self.cfg.train.warmup_steps,
                self.cfg.train.schedule,
                self.cfg.train.min_lr_ratio,
            ),
        )
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            self._set_grad_sync(i == len(batches) - 1)
            loss = self._micro_loss(net, batch, step, lo, hi) / len(batches)
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norm(self.params, self.cfg.train.grad_clip).to(self.device)
        bad = (~torch.isfinite(loss_sum)) | (~torch.isfinite(grad_norm))
        flags = torch.tensor(self.stop_flags(step), device=self.device)
        packed = torch.cat([torch.stack([loss_sum, grad_norm.float(), bad.float()]), flags])
        if self.world > 1:
            dist.all_reduce(packed)
            packed[:2] /= self.world  # CP ranks hold replicas of their group's loss: the mean is the DP mean
        loss_v, norm_v, bad_v, preempt_v, interrupt_v = packed.tolist()  # the one host sync per step
        skipped = bad_v > 0
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.named_trainable)
        return {
            "loss": loss_v,
            "grad_norm": norm_v,
            "skipped": skipped,
            "stop": self.stop_code(preempt_v, interrupt_v),
            "expert": expert,
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def record(self, step: int, out: dict, batches: list[dict], dt: float) -> dict:
        lat = batches[0]["latents"].shape  # [b, C, F, h, w]
        gb = self.stage.global_batch
        flops = train_step_flops(self.model_cfg, gb, lat[2], lat[3], lat[4])
        tflops = flops / dt / 1e12 / self.world
        tokens = gb * lat[2] * (lat[3] // self.model_cfg.patch_size[1]) * (lat[4] // self.model_cfg.patch_size[2])
        rec = {
            "step": step,
            "stage": self.stage.name,
            "stage_index": self.stage.index,
            "loss": out["loss"],
            "lr": out["lr"],
            "grad_norm": out["grad_norm"] if math.isfinite(out["grad_norm"]) else None,
            "tokens_per_s": tokens / dt,
            "model_tflops": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "peak_mem_gb": peak_memory_gb(self.device),
            "step_time_s": dt,
            "skipped_total": self.position["skipped"],
        }
        if not math.isfinite(rec["loss"]):
            rec["loss"] = None
        if out["expert"]:
            rec["expert"] = out["expert"]
        return rec

    # -- outputs ------------------------------------------------------------------------------------
    def export(self, log: MetricsLogger) -> None:
        """RUN_DIR/model/ (Wan format; EMA weights when enabled) and, for action finetuning, RUN_DIR/adapter/."""
        overrides = self.ema.state_for_export() if self.ema is not None else None
        export_model(self.model, self.run_dir / "model", self.rank, overrides)
        log.message(f"[train] exported the model to {self.run_dir / 'model'}")
        if self.cfg.train.task == "action_finetune":
            state = full_state_dict(self.model)
            if overrides:
                state.update(overrides)
            if self.rank == 0:
                cfg = self.model.high.cfg if isinstance(self.model, WanMoE) else self.model.cfg
                adapter = self.run_dir / "adapter"
                adapter_mod.save_adapter(state, self.trainable_names, adapter, cfg)
                log.message(f"[train] saved the action adapter ({len(self.trainable_names)} tensors) to {adapter}")
        if self.cfg.train.task == "action_finetune" and self.cfg.train.action_check_episodes > 0 and self.rank == 0:
            episodes = self.cfg.train.action_check_episodes
            print(format_check(action_following_check(self.run_dir, self.cfg, episodes)), flush=True)


def train(cfg: TitanConfig, resume: bool = False) -> int:
    """Run a training job (`titan-world train`); returns the exit code."""
    return run_job(Trainer, cfg, resume)
