"""Sampling from a checkpoint: the work behind ``sample.py``.

A project checkpoint carries its model and diffusion config, so it needs no flags. A plain state dict (OpenAI's
released ``.pt`` files) needs ``model=<preset> diffusion=<preset>``. Under torchrun the ranks split the images and
rank 0 writes one ``samples.npz`` in index order and ``grid.png``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffusion import checkpoint as ckpt
from diffusion.distributed import DistEnv, barrier, cleanup_distributed, init_distributed
from diffusion.images import save_grid, to_uint8
from diffusion.solvers import generate

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class SamplingError(ValueError):
    """The sampling request cannot be met; the message says what to change."""


def matching_presets(state_dict: dict) -> list[str]:
    """Model presets in ``conf/model`` whose key/shape layout equals ``state_dict``'s (built on the meta device)."""
    from hydra import compose, initialize_config_dir

    from diffusion.config import register_configs

    register_configs()
    theirs = {k: tuple(v.shape) for k, v in state_dict.items()}
    found = []
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for path in sorted((CONF_DIR / "model").glob("*.yaml")):
            cfg = compose(config_name="train", overrides=[f"model={path.stem}"])
            with torch.device("meta"):
                model = instantiate(cfg.model)
            if {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs:
                found.append(path.stem)
    return found


def load_model(cfg: DictConfig) -> tuple[torch.nn.Module, object, dict]:
    """Build the network and diffusion for ``cfg.checkpoint`` and load its (EMA) weights.

    Returns (model, diffusion, info) where info holds ``class_names`` and the checkpoint ``step`` when known.
    """
    state = ckpt.load_file(cfg.checkpoint)
    if "format_version" in state:
        state = ckpt.load_checkpoint(cfg.checkpoint)
        train_cfg = OmegaConf.create(state["config"])
        model_cfg = OmegaConf.create(state["model_config"])
        diffusion_cfg = cfg.diffusion if cfg.diffusion is not None else train_cfg.diffusion
        weights = ckpt.model_weights(state, cfg.use_ema, cfg.ema_rate)
        info = {"class_names": state.get("class_names", []), "step": state["step"]}
    else:
        if cfg.model is None or cfg.diffusion is None:
            raise SamplingError(
                f"{cfg.checkpoint} is a plain state dict (such as OpenAI's releases): name its network and process, "
                "e.g. model=unet_256 diffusion=adm"
            )
        model_cfg, diffusion_cfg, weights, info = (
            cfg.model,
            cfg.diffusion,
            state,
            {"class_names": [], "step": None},
        )
    with torch.device("meta"):
        model = instantiate(model_cfg)
    problem = ckpt.describe_mismatch(model, weights)
    if problem:
        presets = matching_presets(weights)
        hint = (
            f" The file matches model={' / model='.join(presets)}."
            if presets
            else " No model preset matches it."
        )
        raise SamplingError(f"{cfg.checkpoint} does not fit the chosen model: {problem}.{hint}")
    model = instantiate(model_cfg)
    model.load_state_dict(weights, strict=True)
    diffusion = instantiate(diffusion_cfg)
    if model.out_channels != model.in_channels * (2 if diffusion.learns_sigma else 1):
        raise SamplingError(
            f"the network outputs {model.out_channels} channels but diffusion.model_var_type="
            f"{diffusion_cfg.model_var_type} expects {model.in_channels * (2 if diffusion.learns_sigma else 1)}: "
            "choose the diffusion preset the model was trained with"
        )
    return model.eval(), diffusion, info


def class_labels(cfg: DictConfig, model: torch.nn.Module) -> torch.Tensor | None:
    """The class of every requested image: ``classes`` cycled, or spread evenly over all classes."""
    if not model.num_classes:
        if cfg.classes:
            raise SamplingError("classes=... given, but the model is unconditional: drop classes")
        if cfg.guidance_scale != 1.0:
            raise SamplingError(
                "guidance_scale != 1 needs a class-conditional model trained with model.label_dropout > 0"
            )
        return None
    if cfg.guidance_scale != 1.0 and model.null_class is None:
        raise SamplingError(
            "guidance_scale != 1 needs a model trained with classifier-free guidance (model.label_dropout > 0); "
            "this one has no null class: use guidance_scale=1"
        )
    if cfg.classes:
        bad = [c for c in cfg.classes if not 0 <= c < model.num_classes]
        if bad:
            raise SamplingError(f"classes {bad} are outside the model's range 0..{model.num_classes - 1}")
        base = torch.tensor(list(cfg.classes))
    else:
        base = torch.arange(model.num_classes)
    return base.repeat(cfg.num_samples // len(base) + 1)[: cfg.num_samples]


def sample(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Generate ``cfg.num_samples`` images into ``run_dir/samples.npz`` and ``grid.png``; returns the npz path."""
    env = init_distributed()
    try:
        return _sample(cfg, Path(run_dir), env)
    finally:
        cleanup_distributed()


def _sample(cfg: DictConfig, run_dir: Path, env: DistEnv) -> Path:
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise SamplingError(f"num_samples={cfg.num_samples} and batch_size={cfg.batch_size} must be >= 1")
    hw = instantiate(cfg.hardware, local_rank=env.local_rank)
    model, diffusion, info = load_model(cfg)
    model = hw.prepare_model(model)
    labels = class_labels(cfg, model)
    solver = instantiate(cfg.solver)
    solver.check(diffusion)  # a step count the respacing cannot meet fails here, before any work

    # Rank r generates images r, r + W, r + 2W, ...; an image's noise depends on its index only.
    mine = list(range(env.rank, cfg.num_samples, env.world_size))
    images, start = [], time.perf_counter()
    bar = tqdm(total=len(mine), desc=f"sampling (rank {env.rank})", unit="img", disable=not env.is_main)
    for b in range(0, len(mine), cfg.batch_size):
        idx = mine[b : b + cfg.batch_size]
        y = labels[idx] if labels is not None else None
        x = generate(
            model, diffusion, solver, idx, cfg.seed, hw.device, y, cfg.guidance_scale, autocast=hw.autocast()
        )
        images.append(to_uint8(x))
        bar.update(len(idx))
    bar.close()
    elapsed = time.perf_counter() - start
    shard = np.concatenate(images) if images else np.zeros((0,), np.uint8)
    np.save(run_dir / f".shard_{env.rank}.npy", shard)
    barrier()
    out = run_dir / "samples.npz"
    if env.is_main:
        shards = [np.load(run_dir / f".shard_{r}.npy") for r in range(env.world_size)]
        arr = np.empty((cfg.num_samples, *shards[0].shape[1:]), dtype=np.uint8)
        for r, s in enumerate(shards):
            arr[r :: env.world_size] = s
        arrays = {"arr_0": arr}
        if labels is not None:
            arrays["arr_1"] = labels.numpy()
        tmp = run_dir / ".samples.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.replace(out)
        save_grid(arr[: cfg.grid_max], run_dir / "grid.png")
        for r in range(env.world_size):
            (run_dir / f".shard_{r}.npy").unlink()
        log.info(
            "%d samples from %s (step %s) in %.1f s: %.2f images/s on %d rank(s) -> %s",
            cfg.num_samples,
            cfg.checkpoint,
            info["step"],
            elapsed,
            len(mine) * env.world_size / elapsed,
            env.world_size,
            out,
        )
    barrier()
    return out
