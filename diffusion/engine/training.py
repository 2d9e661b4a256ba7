"""The training engine: one function that reads top to bottom, and the one step it repeats.

``train``: processes -> run directory -> data -> task and network -> EMA, optimizer -> resume -> logger -> loop.
``train_step``: one optimizer step over a global batch (micro-batches, DDP, AMP, clipping, EMA), also called by
``benchmarks/bench.py``. ``TrainState``: everything a checkpoint holds, saved and restored by one object.

What is optimised comes from the task (diffusion/tasks.py); everything is built from the composed config with
``hydra.utils.instantiate``. The loop keeps metrics on the device and synchronises with the host only once per
log interval.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from diffusion.config import build
from diffusion.config.build import check_complete, missing_keys
from diffusion.data.build import build_dataset
from diffusion.data.datasets import InfiniteLoader
from diffusion.data.images import save_grid, to_uint8
from diffusion.engine import checkpoint as ckpt
from diffusion.engine.loggers import LossTracker
from diffusion.engine.periodic import Checkpointing, EMASnapshots, Evaluation, LogMetrics, SampleGrids
from diffusion.engine.phema import MAX_STD, PowerFunctionEMA, save_snapshot
from diffusion.engine.tasks import RunContext, Task
from diffusion.errors import ConfigError, UserError
from diffusion.runtime.distributed import (
    DistEnv,
    all_gather_object,
    barrier,
    cleanup_distributed,
    init_distributed,
    quiet_non_main,
    replicas_identical,
)
from diffusion.sampling.auto import AutoSolver

log = logging.getLogger(__name__)


class TrainingError(UserError):
    """Training cannot go on; the message says why and what to change."""


def train(cfg: DictConfig, run_dir: str | os.PathLike, name: str = "train", group: str | None = None) -> dict:
    """Train from a composed ``train.yaml`` config into ``run_dir``; returns the last logged metrics."""
    env = init_distributed(cfg.dist_timeout_s)
    quiet_non_main(env)
    try:
        return _train(cfg, Path(run_dir), env, name, group)
    finally:
        cleanup_distributed()


def _train(cfg: DictConfig, run_dir: Path, env: DistEnv, name: str, group: str | None) -> dict:
    # Checks that need no work: values, batch arithmetic and the output directory.
    validate_config(cfg)
    plan = StepPlan.from_config(cfg, env)
    ckpt_dir, sample_dir = run_dir / "checkpoints", run_dir / "samples"
    if env.is_main:
        check_writable(run_dir)  # checkpoints/ and samples/ appear with their first file
    hw = build(cfg.hardware, local_rank=env.local_rank)
    device = hw.device
    torch.manual_seed(cfg.seed + env.rank)
    log.info("rank %d/%d on %s; run directory %s", env.rank, env.world_size, hw, run_dir)

    # Data: each rank reads its shard of every global batch.
    dataset = build_dataset(cfg.data, cache_dir=run_dir, vae=cfg.vae)
    loader = InfiniteLoader(
        dataset,
        plan.per_rank,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )

    # The task (what is optimised) and its network; EMA copies, optimizer, lr schedule, grad scaler.
    task = build_task(cfg)
    model, model_config = task.build_model(cfg.model, dataset)
    model = hw.prepare_model(model)
    log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    state = TrainState.create(
        cfg,
        model,
        hw,
        task.sampler,
        loader,
        config=OmegaConf.to_yaml(cfg, resolve=True),
        model_config=model_config,
        class_names=list(dataset.class_names),
        extra=task.diffusion.modules(),
    )

    # Resume the run in this directory, or start from given weights.
    resume_path = find_resume(cfg, ckpt_dir)
    if resume_path is not None:
        state.load(resume_path, env)
        # best.pt is written after the step's checkpoint (its evaluation follows the save): its record is newer.
        state.best = ckpt.read_best_record(ckpt_dir) or state.best
        log.info("resumed from %s at step %d", resume_path, state.step)
    elif cfg.init_from:
        state.init_weights(cfg.init_from)
        log.info("initialised the weights from %s", cfg.init_from)
    ddp = None
    if env.distributed:
        # DDP broadcasts rank 0's parameters to every rank when it is built; fresh EMAs start from them.
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if resume_path is None:
            for ema in state.all_emas:
                ema.load_state_dict(model.state_dict())
    net = torch.compile(ddp or model) if hw.compile else (ddp or model)

    # The logger lives on rank 0 only; it is started after the process group is up and always finished.
    logger = None
    if env.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        (run_dir / "class_names.json").write_text(json.dumps(state.class_names))
        logger = build(cfg.logger)
        state.wandb_id = logger.start(
            str(run_dir), OmegaConf.to_container(cfg, resolve=True), name, group, state.wandb_id
        )
    total_steps = cfg.max_steps or cfg.optim.lr_anneal_steps or math.inf
    run = RunContext(hw=hw, env=env, seed=cfg.seed)
    guard = _install_preemption_guard()
    exit_code = 1
    try:
        # The loop: one optimizer step over the global batch per iteration, then the jobs that are due.
        # The formulation bins each example into a quarter of its level density (task.quartile): bins 0..3.
        tracker = LossTracker(4, device, prefix="")
        nonfinite = NonFiniteSteps(device)
        metrics: dict = {}
        batches = iter(loader)
        bar = tqdm(
            total=None if math.isinf(total_steps) else total_steps,
            initial=state.step,
            desc="train",
            disable=not env.is_main,
            dynamic_ncols=True,
        )
        timer = Throughput(cfg.data.batch_size, state.step)
        jobs = [
            LogMetrics(
                cfg.log_every, tracker, nonfinite, timer, state, hw, cfg, ckpt_dir, logger, bar, metrics
            ),
            Checkpointing(
                cfg.save_every,
                lambda: state.save(ckpt_dir, env, cfg.keep_last, cfg.milestone_every),
                guard,
            ),
            SampleGrids(
                cfg.sample_every,
                lambda: write_sample_grid(task, state, cfg, hw, sample_dir, logger),
                env.is_main,
            ),
            Evaluation(
                cfg.eval_every, task, state, run, logger, metrics, lambda: state.save_best(ckpt_dir, env)
            ),
        ]
        if (
            state.phema is not None
        ):  # post-hoc EMA snapshots, first: a resumed run continues from the checkpoint
            jobs.insert(
                0,
                EMASnapshots(
                    cfg.optim.ema_snapshot_every, lambda: save_snapshot(run_dir, state.step, state.phema)
                ),
            )
        model.train()
        while state.step < total_steps:
            x, y = next(batches)
            out = train_step(
                state, task, net, hw.prepare_batch(x), y.to(device, non_blocking=True), plan, hw, ddp
            )
            tracker.add(out.terms, task.quartile(out.t))
            nonfinite.add(out.grad_norm)
            bar.update(1)
            step, done = state.step, state.step >= total_steps
            for job in jobs:
                if job.due(step, done):
                    job(step, out)
        bar.close()
        if env.distributed:  # DDP keeps replicas in step; verify it, a silent divergence would waste the run
            if not replicas_identical(model):
                raise TrainingError(
                    f"parameters differ between ranks at step {state.step}: a DDP synchronisation bug"
                )
            log.info("parameters identical on all %d ranks at step %d", env.world_size, state.step)
        exit_code = 0
        return metrics
    except torch.OutOfMemoryError as e:
        raise TrainingError(
            f"out of memory at step {state.step + 1} with {plan.micro} images per forward pass on {device}: "
            f"lower data.batch_size, set data.microbatch={max(plan.micro // 2, 1)}, or set "
            f"model.use_checkpoint=true; the checkpoints in {ckpt_dir} are intact"
        ) from e
    finally:
        if guard is not None:
            guard.uninstall()
        if logger is not None:
            logger.finish(exit_code)


# --------------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """How one optimizer step splits the global batch, and the settings of the step that never change."""

    global_batch: int
    micro: int  # images per forward pass on this rank
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    max_norm: float = math.inf  # gradient clipping (inf: measure the norm only)
    ema_warmup: bool = True

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world_size

    @classmethod
    def from_config(cls, cfg: DictConfig, env: DistEnv) -> StepPlan:
        per_rank = cfg.data.batch_size // env.world_size
        micro = cfg.data.microbatch if cfg.data.microbatch > 0 else per_rank
        if cfg.data.batch_size % env.world_size or per_rank % micro:
            raise TrainingError(
                f"data.batch_size={cfg.data.batch_size} must be divisible by the world size ({env.world_size}) "
                f"and each rank's share by data.microbatch={cfg.data.microbatch}"
            )
        return cls(
            global_batch=cfg.data.batch_size,
            micro=micro,
            seed=cfg.seed,
            rank=env.rank,
            world_size=env.world_size,
            max_norm=cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf,
            ema_warmup=cfg.optim.ema_warmup,
        )


@dataclass
class StepOutput:
    grad_norm: Tensor  # scalar, on the device; not finite when the step was skipped
    terms: dict[str, Tensor]  # per-example loss terms of this rank's share, [N] each, detached
    t: Tensor  # [N] the timesteps they were computed at


def train_step(
    state: TrainState,
    task: Task,
    net: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    plan: StepPlan,
    hw,
    ddp: DDP | None = None,
) -> StepOutput:
    """
    One optimizer step over this rank's share of a global batch: forward and backward in micro-batches
    (gradients all-reduced by DDP on the last one only), unscale, clip and step (skipped on the device when a
    gradient is not finite), lr schedule, EMA.

    :param net: what the forward pass calls: the model, DDP-wrapped and/or compiled.
    :param x: this rank's [plan.per_rank x C x H x W] images, on the device; y: their [plan.per_rank] labels.
    :param ddp: the DDP wrapper when distributed (for ``no_sync`` on all micro-batches but the last).
    """
    # Timesteps and noise are drawn for the whole global batch; rank r's k-th example is the global batch's
    # example r + k * world_size (the loader's sharding), so each rank takes its slice.
    t_all, w_all, noise_all = draw_for_batch(
        state.sampler, (plan.global_batch, *x.shape[1:]), x.device, plan.seed, state.step
    )
    mine = slice(plan.rank, None, plan.world_size)
    t, w, noise = t_all[mine], w_all[mine], noise_all[mine]
    state.optimizer.zero_grad(set_to_none=True)
    n_micro = len(x) // plan.micro
    parts = []
    for i in range(n_micro):
        part = slice(i * plan.micro, (i + 1) * plan.micro)
        sync = i == n_micro - 1 or ddp is None
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with hw.autocast():
                terms = task.losses(net, x[part], y[part], t[part], noise[part])
            loss = (terms["loss"] * w[part]).mean() / n_micro
            state.scaler.scale(loss).backward()
        state.sampler.update_with_losses(t[part], terms["loss"].detach())
        parts.append({k: v.detach() for k, v in terms.items()})
    if ddp is not None:  # DDP averages the network's gradients; the formulation's own ones are averaged here
        for p in (p for m in state.extra for p in m.parameters() if p.grad is not None):
            torch.distributed.all_reduce(p.grad)
            p.grad /= plan.world_size
    grad_norm = optimizer_step(state.model, state.optimizer, state.scaler, plan.max_norm)
    state.scheduler.step()
    update_ema(state.ema, state.model, state.step, plan.ema_warmup)  # a skipped step leaves params finite
    if state.phema is not None:
        state.phema.update(state.model, state.step + 1)  # steps taken, this one included
    state.step += 1
    return StepOutput(grad_norm, {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, t)


def draw_for_batch(sampler, shape: tuple, device: torch.device, seed: int, step: int):
    """Timesteps, importance weights and noise for a whole global batch of ``shape``, from a generator keyed by
    (seed, step): a run's randomness then depends neither on the number of ranks nor on micro-batching, and
    needs no state to resume. Returns (t [N], weights [N], noise [N x C x H x W])."""
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + step)
    t, weights = sampler.sample(shape[0], device, generator=g)
    return t, weights, torch.randn(shape, generator=g, device=device)


def optimizer_step(model: torch.nn.Module, optimizer, scaler, max_norm: float) -> Tensor:
    """Unscale, clip to ``max_norm`` (inf: measure only) and step; returns the gradient norm, on the device.

    The scaler skips the step on the device when a gradient is not finite (no host synchronisation).
    """
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    return grad_norm


@torch.no_grad()
def update_ema(ema_models: dict, model: torch.nn.Module, step: int, warmup: bool) -> None:
    """EMA <- lerp(EMA, model, 1 - decay) for every rate, with one foreach kernel per rate."""
    params = [p.detach() for p in model.parameters()]
    for rate, ema in ema_models.items():
        decay = min(rate, (1 + step) / (10 + step)) if warmup else rate
        torch._foreach_lerp_(list(ema.parameters()), params, 1.0 - decay)


class NonFiniteSteps:
    """Counts steps the scaler skipped for non-finite gradients, on the device; checked once per log interval."""

    def __init__(self, device: torch.device) -> None:
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # so far
        self._run = torch.zeros((), dtype=torch.long, device=device)  # the current run of consecutive ones
        self._worst = torch.zeros((), dtype=torch.long, device=device)  # the longest run this interval

    def add(self, grad_norm: Tensor) -> None:
        bad = (~torch.isfinite(grad_norm)).long()
        self.skipped += bad
        self._run = (self._run + 1) * bad
        self._worst = torch.maximum(self._worst, self._run)

    def check(self, step: int, limit: int, ckpt_dir: Path) -> None:
        """TrainingError when ``limit`` consecutive steps were skipped within the interval ending at ``step``."""
        worst = self._worst.item()
        if worst >= limit:
            raise TrainingError(
                f"{worst} consecutive steps with non-finite gradients, up to step {step} "
                f"(optim.max_nonfinite_steps={limit}); the last checkpoint in {ckpt_dir} is intact. Lower "
                "optim.lr, set optim.grad_clip, or use bf16/fp32"
            )
        self._worst.zero_()


class Throughput:
    """Steps and images per second between two calls of :meth:`rates`."""

    def __init__(self, global_batch: int, step: int) -> None:
        self.global_batch = global_batch
        self._time, self._step = time.perf_counter(), step

    def rates(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps, elapsed = step - self._step, now - self._time
        self._time, self._step = now, step
        return {"steps_per_s": steps / elapsed, "images_per_s": steps * self.global_batch / elapsed}


# --------------------------------------------------------------------------------------------------------------
# What a checkpoint holds
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a checkpoint holds and a resume restores; :meth:`save` writes it, :meth:`load` reads it back."""

    model: torch.nn.Module
    ema: dict[float, torch.nn.Module]  # a frozen copy per EMA rate
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sampler: object  # the timestep sampler
    loader: InfiniteLoader | None  # None where nothing is loaded (the benchmark)
    config: str = ""  # the run's resolved config, YAML
    model_config: dict = field(default_factory=dict)  # the network's complete constructor config
    class_names: list[str] = field(default_factory=list)
    step: int = 0
    wandb_id: str | None = None
    best: dict = field(default_factory=dict)  # {"key", "value", "step"} of the best evaluation so far
    # Trainable modules of the formulation besides the network (EDM2's loss weighting): optimised and saved too.
    extra: list[torch.nn.Module] = field(default_factory=list)
    phema: PowerFunctionEMA | None = None  # power-function EMAs by sigma_rel (optim.ema_stds)

    @classmethod
    def create(
        cls, cfg: DictConfig, model: torch.nn.Module, hw, sampler, loader=None, extra=(), **info
    ) -> TrainState:
        """A fresh state for ``model`` (on its device): EMA copies, the configured optimizer, lr schedule and grad
        scaler. ``extra``: the formulation's own trainable modules (moved to the model's device and optimised with
        it). ``info``: the run's config, model_config and class_names, as stored in checkpoints."""
        device = next(model.parameters()).device
        extra = [m.to(device) for m in extra]
        optimizer = make_optimizer(cfg, model, hw, extra)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.optim.lr_anneal_steps)
        )
        return cls(
            model,
            make_ema(model, cfg.optim.ema_rates),
            optimizer,
            scheduler,
            hw.grad_scaler(),
            sampler,
            loader,
            **info,
            extra=extra,
            phema=PowerFunctionEMA(model, cfg.optim.ema_stds) if cfg.optim.ema_stds else None,
        )

    @property
    def first_ema(self) -> torch.nn.Module:
        """What grids and evaluations sample: the first constant-rate EMA, else the first power EMA."""
        return next(iter(self.all_emas))

    @property
    def all_emas(self) -> list[torch.nn.Module]:
        """Every EMA copy: the constant-rate ones, then the power-function ones."""
        return [*self.ema.values(), *(self.phema.emas if self.phema is not None else [])]

    def save(self, ckpt_dir: Path, env: DistEnv, keep_last: int = 2, milestone_every: int = 0) -> None:
        """Gather every rank's RNG state and write one checkpoint from rank 0; all ranks wait for it."""
        state = self._gather(env)
        if env.is_main:
            path = ckpt.save_checkpoint(state, ckpt_dir, self.step, keep_last, milestone_every)
            log.info("saved %s", path)
        barrier()

    def save_best(self, ckpt_dir: Path, env: DistEnv) -> None:
        """Write ``best.pt``, a complete checkpoint (as :meth:`save`), from rank 0; all ranks call it."""
        state = self._gather(env)
        if env.is_main:
            path = ckpt.save_best(state, ckpt_dir)
            log.info("saved %s: %s=%.6g at step %d", path, self.best["key"], self.best["value"], self.step)
        barrier()

    def record_if_best(self, metrics: dict, key: str, direction: str) -> bool:
        """Whether ``metrics[key]`` beats the best so far (lower for "minimize"); if so it becomes the best.
        A value that is not finite never does; a best of another key (the objective changed) does not count."""
        if not metrics:
            return False
        if key not in metrics:
            raise TrainingError(f"the task's objective {key} is not among its evaluation's {sorted(metrics)}")
        value = float(metrics[key])
        if not math.isfinite(value):
            return False
        if self.best.get("key") == key:
            better = value < self.best["value"] if direction == "minimize" else value > self.best["value"]
            if not better:
                return False
        self.best = {"key": key, "value": value, "step": self.step}
        return True

    def _gather(self, env: DistEnv) -> dict | None:
        """What a checkpoint holds, with every rank's RNG state (a collective: all ranks call it); None off
        rank 0."""
        rng = {"torch": all_gather_object(torch.get_rng_state())}
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            rng["cuda"] = all_gather_object(torch.cuda.get_rng_state(device))
        if env.is_main:
            return {
                "step": self.step,
                "model": self.model.state_dict(),
                "ema": {str(r): e.state_dict() for r, e in self.ema.items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "data": self.loader.state_dict(),
                "rng": rng,
                "wandb_run_id": self.wandb_id,
                "config": self.config,
                "model_config": OmegaConf.to_yaml(self.model_config),
                "class_names": self.class_names,
                "best": self.best,
                "formulation": [m.state_dict() for m in self.extra],
                **({"phema": self.phema.state_dict()} if self.phema is not None else {}),
            }
        return None

    def load(self, path: Path, env: DistEnv) -> None:
        """Restore a checkpoint of this run: weights, EMAs, optimizer, schedules, data position and this rank's
        RNG state, so that the run continues exactly as if it had not stopped."""
        state = ckpt.load_checkpoint(path, map_location="cpu")
        ckpt.load_weights(self.model, state["model"], f"resume checkpoint {path}")
        for rate, ema in self.ema.items():
            if str(rate) not in state["ema"]:
                raise TrainingError(f"{path} has no EMA with rate {rate} (it has {sorted(state['ema'])})")
            ema.load_state_dict(state["ema"][str(rate)])
        for module, saved in zip(self.extra, state.get("formulation") or []):
            module.load_state_dict(saved)
        if self.phema is not None:
            if "phema" not in state:
                raise TrainingError(
                    f"{path} has no power-function EMAs but optim.ema_stds={list(self.phema.stds)}: resume "
                    "without optim.ema_stds, or start a new run (resume=never)"
                )
            try:
                self.phema.load_state_dict(state["phema"])
            except ValueError as e:
                raise TrainingError(f"{path}: {e}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.loader.load_state_dict(state["data"])
        rng = state["rng"]
        if len(rng["torch"]) != env.world_size:
            raise TrainingError(
                f"{path} was written by {len(rng['torch'])} ranks, this run has {env.world_size}: resume with "
                "the same number of processes"
            )
        torch.set_rng_state(rng["torch"][env.rank])
        device = next(self.model.parameters()).device
        if device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][env.rank], device)
        check_classes(state.get("class_names") or [], self.class_names, path)
        self.step, self.wandb_id = state["step"], state.get("wandb_run_id")
        self.best = dict(state.get("best") or {})

    def init_weights(self, source: str) -> None:
        """Start from the (EMA) weights of another run's checkpoint or of a plain state dict (OpenAI's files)."""
        weights = ckpt.model_weights(ckpt.load_file(source), use_ema=True)
        ckpt.load_weights(self.model, weights, f"init_from={source}")
        for ema in self.all_emas:
            ema.load_state_dict(self.model.state_dict())


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


def build_task(cfg: DictConfig) -> Task:
    """The ``task`` group's task, with the run's diffusion process, timestep sampler and grid solver."""
    diffusion = build(cfg.diffusion)
    if not diffusion.discrete and not OmegaConf.select(cfg, "sampler._target_", default="").endswith(
        "UniformSampler"
    ):
        raise ConfigError(
            f"sampler={cfg.sampler._target_.rsplit('.', 1)[-1]} draws ADM's discrete timesteps; diffusion="
            f"{diffusion.name} draws its own noise levels: drop the sampler override"
        )
    sampler = diffusion.level_sampler(lambda num_timesteps: build(cfg.sampler, num_timesteps=num_timesteps))
    # Discrete solvers' steps are capped at the process's length, so that short test processes can sample.
    cap = diffusion.num_timesteps if diffusion.discrete else None
    steps = cfg.solver.get("steps")
    solver = build(cfg.solver, **({} if steps is None or cap is None else {"steps": min(steps, cap)}))
    if isinstance(solver, AutoSolver):
        solver = solver.resolve(diffusion, max_steps=cap)
    if not getattr(solver, "discrete", False):
        # A continuous sampler's schedule against the trained range: refused now, not at the first grid. (The
        # discrete solvers keep their behaviour: their step counts are checked when they first sample.)
        solver.check(diffusion)
    task = build(cfg.task, diffusion=diffusion, sampler=sampler, solver=solver)
    if task.generates and getattr(solver, "discrete", False) and not diffusion.discrete:
        raise ConfigError(
            f"solver={type(solver).__name__} steps through ADM's discrete timesteps; diffusion={diffusion.name} "
            "has none: use a continuous sampler, e.g. solver=heun (or solver=euler, solver=dpmpp_2m)"
        )
    return task


def make_ema(model: torch.nn.Module, rates) -> dict[float, torch.nn.Module]:
    """A frozen copy of ``model`` per EMA rate, keyed by the rate."""
    return {float(r): copy.deepcopy(model).requires_grad_(False).eval() for r in rates}


def make_optimizer(cfg: DictConfig, model: torch.nn.Module, hw, extra=()) -> torch.optim.Optimizer:
    """The configured optimizer over the model's parameters (and those of ``extra`` modules), fused where the
    hardware group asks for it."""
    params = [*model.parameters(), *(p for m in extra for p in m.parameters())]
    return build(cfg.optim.optimizer)(params, **({"fused": True} if hw.fused_optimizer else {}))


def lr_lambda(warmup_steps: int, anneal_steps: int):
    """Multiplier of the base lr at a step: linear warm-up, then constant or linear decay to 0 (the reference)."""

    def factor(step: int) -> float:
        f = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if anneal_steps > 0:
            f *= max(0.0, 1.0 - step / anneal_steps)
        return f

    return factor


def write_sample_grid(task: Task, state: TrainState, cfg: DictConfig, hw, sample_dir: Path, logger) -> None:
    """The first EMA's progress grid, as PNG and in the logger, when the task generates images."""
    if cfg.num_grid_samples < 1:
        return
    x = task.sample_grid(state.first_ema, cfg.num_grid_samples, cfg.seed, hw)
    if x is None:
        return
    path = sample_dir / f"step_{state.step:08d}.png"
    grid = save_grid(to_uint8(x), path)
    if logger is not None:
        logger.log_image("samples", grid, state.step, caption=f"step {state.step}")
    log.info("sample grid %s", path)


def _install_preemption_guard():
    """Under submitit (SLURM), save before the job is requeued on its pre-emption/time-out signal."""
    if "SUBMITIT_EXECUTOR" not in os.environ and "SUBMITIT_FOLDER" not in os.environ:
        return None
    from diffusion.engine.cluster import PreemptionGuard

    guard = PreemptionGuard()
    guard.install()
    return guard


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------


def validate_config(cfg: DictConfig) -> None:
    """Reject values that types alone cannot catch, before any work; each message names the key."""
    if "data.dir" in missing_keys(cfg):
        raise TrainingError(
            "missing required value data.dir: point it at a folder of images (data.dir=/data/imagenet), or "
            "train on the built-in digits with experiment=digits"
        )
    check_complete(cfg, TrainingError)
    checks = [
        (cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr}: must be > 0"),
        (cfg.data.batch_size > 0, f"data.batch_size={cfg.data.batch_size}: must be > 0"),
        (
            cfg.data.microbatch >= 0,
            f"data.microbatch={cfg.data.microbatch}: must be >= 0 (0 = no micro-batching)",
        ),
        (cfg.max_steps >= 0, f"max_steps={cfg.max_steps}: must be >= 0 (0 = until optim.lr_anneal_steps)"),
        (cfg.optim.lr_anneal_steps >= 0, f"optim.lr_anneal_steps={cfg.optim.lr_anneal_steps}: must be >= 0"),
        (cfg.optim.warmup_steps >= 0, f"optim.warmup_steps={cfg.optim.warmup_steps}: must be >= 0"),
        (cfg.log_every > 0, f"log_every={cfg.log_every}: must be > 0"),
        (cfg.save_every >= 0, f"save_every={cfg.save_every}: must be >= 0 (0 = only at the end)"),
        (cfg.sample_every >= 0, f"sample_every={cfg.sample_every}: must be >= 0 (0 = only at the end)"),
        (cfg.eval_every >= 0, f"eval_every={cfg.eval_every}: must be >= 0 (0 = only at the end)"),
        (cfg.keep_last >= 1, f"keep_last={cfg.keep_last}: must be >= 1"),
        (
            len(cfg.optim.ema_rates) > 0 or len(cfg.optim.ema_stds) > 0,
            "optim.ema_rates is empty: give at least one rate, e.g. [0.9999], or track power-function EMAs "
            "with optim.ema_stds=[0.05,0.10]",
        ),
        (
            cfg.optim.ema_snapshot_every >= 0,
            f"optim.ema_snapshot_every={cfg.optim.ema_snapshot_every}: must be >= 0 (0 = no snapshots)",
        ),
        (
            not cfg.optim.ema_snapshot_every or len(cfg.optim.ema_stds) > 0,
            f"optim.ema_snapshot_every={cfg.optim.ema_snapshot_every} without optim.ema_stds: snapshots are of "
            "power-function EMAs, add e.g. optim.ema_stds=[0.05,0.10]",
        ),
        (
            len(set(cfg.optim.ema_stds)) == len(cfg.optim.ema_stds),
            f"optim.ema_stds={list(cfg.optim.ema_stds)} repeats a value: list each sigma_rel once",
        ),
        (
            cfg.optim.max_nonfinite_steps > 0,
            f"optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps}: must be > 0",
        ),
    ]
    checks += [
        (0 < r < 1, f"optim.ema_rates contains {r}: every rate must be in (0, 1)")
        for r in cfg.optim.ema_rates
    ]
    checks += [
        (
            0 < s < MAX_STD,
            f"optim.ema_stds contains {s}: every sigma_rel must be in (0, {MAX_STD:.4f}), e.g. 0.05-0.15",
        )
        for s in cfg.optim.ema_stds
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainingError(
            f"cannot write to the run directory {run_dir} ({e.strerror}): choose another hydra.run.dir or fix "
            "its permissions"
        ) from e


def find_resume(cfg: DictConfig, ckpt_dir: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        latest = ckpt_dir / ckpt.LATEST
        return latest if latest.exists() else None
    path = Path(cfg.resume)
    if not path.exists():
        raise TrainingError(
            f"resume={cfg.resume}: no such file (use resume=auto, resume=never or a .pt path)"
        )
    return path


def check_classes(known: list[str], current: list[str], source: Path) -> None:
    """A resumed run must see the classes, in the order, that its checkpoint was trained on."""
    if not known or known == current:
        return
    unknown = [c for c in current if c not in known]
    if unknown:
        raise TrainingError(
            f"the data has {len(unknown)} classes that {source} does not know ({', '.join(unknown[:5])}); "
            f"it was trained on {len(known)} classes: point data.dir at the same classes or start a new run"
        )
    raise TrainingError(
        f"the data's classes differ from those {source} was trained on (missing: "
        f"{', '.join([c for c in known if c not in current][:5]) or 'none'}; the label indices would shift): "
        "use the same class folders or start a new run"
    )
