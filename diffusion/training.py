"""The training engine: one function that reads top to bottom.

set up processes -> run directory -> data -> diffusion, model, EMA -> optimizer -> resume -> logger -> loop.
Everything is built from the composed config with ``hydra.utils.instantiate``; the loop keeps metrics on the
device and synchronises with the host only once per log interval.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from diffusion import checkpoint as ckpt
from diffusion.config import LOADER_KEYS
from diffusion.data import InfiniteLoader
from diffusion.distributed import (
    DistEnv,
    all_gather_object,
    barrier,
    cleanup_distributed,
    init_distributed,
    quiet_non_main,
    replicas_identical,
)
from diffusion.images import save_grid, to_uint8
from diffusion.loggers import LossTracker
from diffusion.solvers import generate

log = logging.getLogger(__name__)


class TrainingError(ValueError):
    """Training cannot go on; the message says why and what to change."""


def train(cfg: DictConfig, run_dir: str | os.PathLike, name: str = "train", group: str | None = None) -> dict:
    """Train from a composed ``train.yaml`` config into ``run_dir``; returns the last logged metrics."""
    env = init_distributed(cfg.dist_timeout_s)
    quiet_non_main(env)
    try:
        return _train(cfg, Path(run_dir), env, name, group)
    finally:
        cleanup_distributed()


def build_model(cfg: DictConfig, dataset, diffusion) -> tuple[torch.nn.Module, dict]:
    """The configured network with the run-time values the data and the diffusion decide.

    Returns the model and its complete constructor config (stored in checkpoints, so that sampling needs no flags).
    """
    if cfg.model.image_size != dataset.image_size:
        raise TrainingError(
            f"model.image_size={cfg.model.image_size} but data.image_size={dataset.image_size}: set both to the "
            "same value (data.image_size follows the model unless overridden)"
        )
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    model_config.update(in_channels=dataset.channels, learn_sigma=diffusion.learns_sigma)
    if cfg.model.class_cond:
        if dataset.num_classes < 1:
            raise TrainingError(
                "model.class_cond=true but the data has no labels: set model.class_cond=false"
            )
        model_config["num_classes"] = dataset.num_classes
    return instantiate(model_config), model_config


def validate_config(cfg: DictConfig) -> None:
    """Reject values that types alone cannot catch, before any work; each message names the key."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise TrainingError(
            f"missing required value {missing[0]}: set it on the command line, e.g. {missing[0]}=..."
        )
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
        (cfg.keep_last >= 1, f"keep_last={cfg.keep_last}: must be >= 1"),
        (len(cfg.optim.ema_rates) > 0, "optim.ema_rates is empty: give at least one rate, e.g. [0.9999]"),
        (
            cfg.optim.max_nonfinite_steps > 0,
            f"optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps}: must be > 0",
        ),
    ]
    checks += [
        (0 < r < 1, f"optim.ema_rates contains {r}: every rate must be in (0, 1)")
        for r in cfg.optim.ema_rates
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)


def lr_lambda(warmup_steps: int, anneal_steps: int):
    """Multiplier of the base lr at a step: linear warm-up, then constant or linear decay to 0 (the reference)."""

    def factor(step: int) -> float:
        f = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if anneal_steps > 0:
            f *= max(0.0, 1.0 - step / anneal_steps)
        return f

    return factor


def make_ema(model: torch.nn.Module, rates) -> dict[float, torch.nn.Module]:
    """A frozen copy of ``model`` per EMA rate, keyed by the rate."""
    return {float(r): copy.deepcopy(model).requires_grad_(False).eval() for r in rates}


def make_optimizer(cfg: DictConfig, model: torch.nn.Module, hw) -> torch.optim.Optimizer:
    """The configured optimizer over the model's parameters, fused where the hardware group asks for it."""
    return instantiate(cfg.optim.optimizer)(
        model.parameters(), **({"fused": True} if hw.fused_optimizer else {})
    )


def draw_for_batch(sampler, shape: tuple, device: torch.device, seed: int, step: int):
    """Timesteps, importance weights and noise for a whole global batch of ``shape``, from a generator keyed by
    (seed, step): a run's randomness then depends neither on the number of ranks nor on micro-batching, and
    needs no state to resume. Returns (t [N], weights [N], noise [N x C x H x W])."""
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + step)
    t, weights = sampler.sample(shape[0], device, generator=g)
    return t, weights, torch.randn(shape, generator=g, device=device)


def optimizer_step(model: torch.nn.Module, optimizer, scaler, max_norm: float) -> torch.Tensor:
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


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainingError(
            f"cannot write to the run directory {run_dir} ({e.strerror}): choose another "
            "hydra.run.dir or fix its permissions"
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


def _train(cfg: DictConfig, run_dir: Path, env: DistEnv, name: str, group: str | None) -> dict:
    # Validation that needs no work: values, batch arithmetic and the output directory.
    validate_config(cfg)
    per_rank = cfg.data.batch_size // env.world_size
    micro = cfg.data.microbatch if cfg.data.microbatch > 0 else per_rank
    if cfg.data.batch_size % env.world_size or per_rank % micro:
        raise TrainingError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by the world size ({env.world_size}) and "
            f"each rank's share by data.microbatch={cfg.data.microbatch}"
        )
    ckpt_dir, sample_dir = run_dir / "checkpoints", run_dir / "samples"
    if env.is_main:
        check_writable(run_dir)  # checkpoints/ and samples/ appear with their first file
    hw = instantiate(cfg.hardware, local_rank=env.local_rank)
    device = hw.device
    torch.manual_seed(cfg.seed + env.rank)
    log.info("rank %d/%d on %s; run directory %s", env.rank, env.world_size, hw, run_dir)

    # Data: each rank reads its shard of every global batch.
    dataset_cfg = {k: v for k, v in cfg.data.items() if k not in LOADER_KEYS}
    dataset = instantiate(dataset_cfg, **({"cache_dir": str(run_dir)} if "cache_dir" in dataset_cfg else {}))
    loader = InfiniteLoader(
        dataset,
        per_rank,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )

    # Diffusion process, network, EMA copies, timestep sampler.
    diffusion = instantiate(cfg.diffusion)
    model, model_config = build_model(cfg, dataset, diffusion)
    model = hw.prepare_model(model)
    ema_models = make_ema(model, cfg.optim.ema_rates)
    sampler = instantiate(cfg.sampler, num_timesteps=diffusion.num_timesteps)
    log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)

    # Optimizer, lr schedule, grad scaler.
    optimizer = make_optimizer(cfg, model, hw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.optim.lr_anneal_steps)
    )
    scaler = hw.grad_scaler()

    # Resume the run in this directory, or start from given weights.
    step, wandb_id = 0, None
    resume_path = find_resume(cfg, ckpt_dir)
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, map_location="cpu")
        ckpt.load_weights(model, state["model"], f"resume checkpoint {resume_path}")
        for rate, ema in ema_models.items():
            if str(rate) not in state["ema"]:
                raise TrainingError(
                    f"{resume_path} has no EMA with rate {rate} (it has {sorted(state['ema'])})"
                )
            ema.load_state_dict(state["ema"][str(rate)])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        loader.load_state_dict(state["data"])
        rng = state["rng"]
        if len(rng["torch"]) != env.world_size:
            raise TrainingError(
                f"{resume_path} was written by {len(rng['torch'])} ranks, this run has "
                f"{env.world_size}: resume with the same number of processes"
            )
        torch.set_rng_state(rng["torch"][env.rank])
        if device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][env.rank], device)
        check_classes(state.get("class_names") or [], list(dataset.class_names), resume_path)
        step, wandb_id = state["step"], state.get("wandb_run_id")
        log.info("resumed from %s at step %d", resume_path, step)
    elif cfg.init_from:
        weights = ckpt.model_weights(ckpt.load_file(cfg.init_from), use_ema=True)
        ckpt.load_weights(model, weights, f"init_from={cfg.init_from}")
        for ema in ema_models.values():
            ema.load_state_dict(model.state_dict())
        log.info("initialised the weights from %s", cfg.init_from)
    if env.distributed:
        # DDP broadcasts rank 0's parameters to every rank when it is built.
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if resume_path is None:
            for ema in ema_models.values():  # the EMAs start from the broadcast weights
                ema.load_state_dict(model.state_dict())
    else:
        ddp_model = model
    train_model = torch.compile(ddp_model) if hw.compile else ddp_model

    # The logger lives on rank 0 only; it is started after the process group is up and always finished.
    logger = None
    if env.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        (run_dir / "class_names.json").write_text(json.dumps(list(dataset.class_names)))
        logger = instantiate(cfg.logger)
        wandb_id = logger.start(
            str(run_dir), OmegaConf.to_container(cfg, resolve=True), name, group, wandb_id
        )
    total_steps = cfg.max_steps or cfg.optim.lr_anneal_steps or math.inf
    guard = _install_preemption_guard()
    exit_code = 1
    try:
        # The loop: one optimizer step over the global batch per iteration; metrics stay on the device.
        tracker = LossTracker(diffusion.original_num_steps, device, prefix="")
        skipped = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps so far
        run_nonfinite = torch.zeros((), dtype=torch.long, device=device)  # current run of consecutive ones
        worst_run = torch.zeros((), dtype=torch.long, device=device)  # the longest run this interval
        n_micro = per_rank // micro
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        snapshot = dict(
            model=model,
            ema_models=ema_models,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            sampler=sampler,
            loader=loader,
            dataset=dataset,
            model_config=model_config,
        )
        metrics: dict = {}
        batches = iter(loader)
        bar = tqdm(
            total=None if math.isinf(total_steps) else total_steps,
            initial=step,
            desc="train",
            disable=not env.is_main,
            dynamic_ncols=True,
        )
        t_interval, steps_interval = time.perf_counter(), 0
        model.train()
        while step < total_steps:
            x, y = next(batches)
            x, y = hw.prepare_batch(x), y.to(device, non_blocking=True)
            # Drawn for the whole global batch; rank r's k-th example is the global batch's example
            # r + k * world_size (the loader's sharding), so each rank takes its slice.
            t_all, w_all, noise_all = draw_for_batch(
                sampler, (cfg.data.batch_size, *x.shape[1:]), device, cfg.seed, step
            )
            mine = slice(env.rank, None, env.world_size)
            t_mine, w_mine, noise_mine = t_all[mine], w_all[mine], noise_all[mine]
            optimizer.zero_grad(set_to_none=True)
            for i in range(n_micro):
                part = slice(i * micro, (i + 1) * micro)
                t = t_mine[part]
                kwargs = {"y": y[part]} if model.num_classes else {}
                # DDP all-reduces gradients on the last micro-batch only.
                last = i == n_micro - 1
                with contextlib.nullcontext() if last or not env.distributed else ddp_model.no_sync():
                    with hw.autocast():
                        terms = diffusion.training_losses(
                            train_model, x[part], t, model_kwargs=kwargs, noise=noise_mine[part]
                        )
                    loss = (terms["loss"] * w_mine[part]).mean() / n_micro
                    scaler.scale(loss).backward()
                sampler.update_with_losses(t, terms["loss"].detach())
                tracker.add({k: v.detach() for k, v in terms.items()}, diffusion.original_timesteps(t))
            grad_norm = optimizer_step(model, optimizer, scaler, max_norm)
            finite = torch.isfinite(grad_norm)
            scheduler.step()
            update_ema(ema_models, model, step, cfg.optim.ema_warmup)  # a skipped step leaves params finite
            skipped += (~finite).long()
            run_nonfinite = (run_nonfinite + 1) * (~finite).long()
            worst_run = torch.maximum(worst_run, run_nonfinite)
            step += 1
            steps_interval += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step >= total_steps:
                metrics = tracker.compute()  # every rank takes part in the reduction
                if worst_run.item() >= cfg.optim.max_nonfinite_steps:
                    raise TrainingError(
                        f"{worst_run.item()} consecutive steps with non-finite gradients, up to step {step} "
                        f"(optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps}); the last checkpoint in "
                        f"{ckpt_dir} is intact. Lower optim.lr, set optim.grad_clip, or use bf16/fp32"
                    )
                worst_run.zero_()
                elapsed = time.perf_counter() - t_interval
                metrics.update(
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=grad_norm.item(),
                    skipped_steps=skipped.item(),
                    images_seen=step * cfg.data.batch_size,
                    steps_per_s=steps_interval / elapsed,
                    images_per_s=steps_interval * cfg.data.batch_size / elapsed,
                )
                if hw.precision == "fp16":
                    metrics["loss_scale"] = scaler.get_scale()
                if device.type == "cuda":
                    metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if logger is not None:
                    logger.log({f"train/{k}": v for k, v in metrics.items()}, step)
                    bar.set_postfix(
                        loss=f"{metrics.get('loss', math.nan):.4f}", img_s=f"{metrics['images_per_s']:.1f}"
                    )
                    log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                t_interval, steps_interval = time.perf_counter(), 0
            preempted = guard is not None and guard.requested_on_any_rank()  # ranks stop at the same step
            if step >= total_steps or preempted or (cfg.save_every and step % cfg.save_every == 0):
                save_state(cfg, env, ckpt_dir, step, wandb_id, **snapshot)
            if preempted:
                log.warning(
                    "pre-emption signal: saved step %d; handing over to the launcher to requeue", step
                )
                guard.hand_over()  # submitit requeues and exits; if the handler returns, training goes on
            if env.is_main and (step >= total_steps or (cfg.sample_every and step % cfg.sample_every == 0)):
                sample_grid(cfg, hw, diffusion, ema_models, model, sample_dir, step, logger)
        bar.close()
        if env.distributed:  # DDP keeps replicas in step; verify it, a silent divergence would waste the run
            if not replicas_identical(model):
                raise TrainingError(
                    f"parameters differ between ranks at step {step}: a DDP synchronisation bug"
                )
            log.info("parameters identical on all %d ranks at step %d", env.world_size, step)
        exit_code = 0
        return metrics
    except torch.OutOfMemoryError as e:
        raise TrainingError(
            f"out of memory at step {step + 1} with {micro} images per forward pass on {device}: lower "
            f"data.batch_size, set data.microbatch={max(micro // 2, 1)}, or set model.use_checkpoint=true; "
            f"the checkpoints in {ckpt_dir} are intact"
        ) from e
    finally:
        if guard is not None:
            guard.uninstall()
        if logger is not None:
            logger.finish(exit_code)


def _install_preemption_guard():
    """Under submitit (SLURM), save before the job is requeued on its pre-emption/time-out signal."""
    if "SUBMITIT_EXECUTOR" not in os.environ and "SUBMITIT_FOLDER" not in os.environ:
        return None
    from diffusion.cluster import PreemptionGuard

    guard = PreemptionGuard()
    guard.install()
    return guard


def save_state(
    cfg,
    env,
    ckpt_dir,
    step,
    wandb_id,
    model,
    ema_models,
    optimizer,
    scheduler,
    scaler,
    sampler,
    loader,
    dataset,
    model_config,
) -> None:
    """Gather every rank's RNG state and write one checkpoint from rank 0; all ranks wait for it."""
    rng = {"torch": all_gather_object(torch.get_rng_state())}
    device = next(model.parameters()).device
    if device.type == "cuda":
        rng["cuda"] = all_gather_object(torch.cuda.get_rng_state(device))
    if env.is_main:
        state = {
            "step": step,
            "model": model.state_dict(),
            "ema": {str(r): e.state_dict() for r, e in ema_models.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "sampler": sampler.state_dict(),
            "data": loader.state_dict(),
            "rng": rng,
            "wandb_run_id": wandb_id,
            "config": OmegaConf.to_yaml(cfg, resolve=True),
            "model_config": OmegaConf.to_yaml(model_config),
            "class_names": list(getattr(dataset, "class_names", [])),
        }
        path = ckpt.save_checkpoint(state, ckpt_dir, step, cfg.keep_last, cfg.milestone_every)
        log.info("saved %s", path)
    barrier()


def sample_grid(cfg, hw, diffusion, ema_models, model, sample_dir, step, logger) -> None:
    """A grid from the first EMA with fixed noise and classes, so that successive grids are comparable."""
    n = cfg.num_grid_samples
    classes = torch.arange(n) % model.num_classes if model.num_classes else None
    ema = next(iter(ema_models.values()))
    solver = instantiate(
        cfg.solver, steps=min(cfg.solver.steps, diffusion.num_timesteps)
    )  # short test processes
    x = generate(ema, diffusion, solver, range(n), cfg.seed, hw.device, classes, autocast=hw.autocast())
    path = sample_dir / f"step_{step:08d}.png"
    grid = save_grid(to_uint8(x), path)
    if logger is not None:
        logger.log_image("samples", grid, step, caption=f"step {step}")
    log.info("sample grid %s", path)
