"""Sampling from a checkpoint: the work behind ``sample.py``.

A project checkpoint carries its model and diffusion config, so it needs no flags. A plain state dict (OpenAI's
released ``.pt`` files) needs ``model=<preset> diffusion=<preset>``. Under torchrun the ranks split the images
(rank r makes images r, r + W, r + 2W, ...) and rank 0 writes one ``samples.npz`` in index order and
``grid.png``. Every request is checked before the first image is generated.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffusion import CONF_DIR
from diffusion import checkpoint as ckpt
from diffusion.config import build
from diffusion.distributed import DistEnv, barrier, cleanup_distributed, init_distributed
from diffusion.errors import UserError
from diffusion.images import save_grid, to_uint8
from diffusion.latent import latent_solver
from diffusion.solvers import check_guidance, generate

log = logging.getLogger(__name__)


class SamplingError(UserError):
    """The sampling request cannot be met; the message says what to change."""


def _compose_model(name: str) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # Inside sample.py's @hydra.main Hydra is already initialised on conf/; elsewhere (tests, notebooks) open it.
    if GlobalHydra.instance().is_initialized():
        return compose(overrides=[f"+model={name}"]).model
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(overrides=[f"+model={name}"]).model


def _shapes(state_dict: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@functools.cache
def _preset_shapes(name: str) -> dict[str, tuple[int, ...]]:
    # Built on the meta device (no memory, no initialisation): about 0.1 s per preset, once per process.
    with torch.device("meta"):
        return _shapes(instantiate(_compose_model(name)).state_dict())


def matching_presets(state_dict: dict) -> list[str]:
    """Model presets in ``conf/model`` whose key/shape layout equals ``state_dict``'s."""
    theirs = _shapes(state_dict)
    return [p.stem for p in sorted((CONF_DIR / "model").glob("*.yaml")) if _preset_shapes(p.stem) == theirs]


def _read_checkpoint(cfg: DictConfig) -> tuple[DictConfig, DictConfig, dict, dict]:
    """(model config, diffusion config, weights, info) from a project checkpoint or a plain state dict."""
    state = ckpt.load_file(cfg.checkpoint)
    if "format_version" not in state:
        if cfg.model is None or cfg.diffusion is None:
            raise SamplingError(
                f"{cfg.checkpoint} is a plain state dict (such as OpenAI's releases): name its network and "
                "process, e.g. model=unet_256 diffusion=adm"
            )
        info = {"class_names": [], "step": None, "channels_last": None, "vae": cfg.get("vae")}
        return cfg.model, cfg.diffusion, state, info
    if state["format_version"] != ckpt.FORMAT_VERSION:
        ckpt.load_checkpoint(cfg.checkpoint)  # raises the explanation of the version mismatch
    if cfg.model is not None or cfg.diffusion is not None:
        raise SamplingError(
            f"{cfg.checkpoint} is a checkpoint of this project and carries its own model and diffusion config: "
            "drop the model=... and diffusion=... overrides"
        )
    weights = ckpt.model_weights(state, cfg.use_ema, cfg.ema_rate)
    run_cfg = OmegaConf.create(state["config"])
    info = {
        "class_names": state.get("class_names", []),
        "step": state["step"],
        "channels_last": run_cfg.hardware.get("channels_last"),  # None: the run left it to the device
        "vae": _checkpoint_vae(cfg, run_cfg),
    }
    return OmegaConf.create(state["model_config"]), run_cfg.diffusion, weights, info


def _checkpoint_vae(cfg: DictConfig, run_cfg: DictConfig) -> DictConfig | None:
    """The VAE that decodes a project checkpoint's samples: its run's (data.latent=true), or ``cfg.vae`` where
    this machine keeps it elsewhere; None in pixel space."""
    latent = run_cfg.get("data") is not None and run_cfg.data.get("latent")
    if not latent:
        if cfg.get("vae") is not None:
            raise SamplingError(
                f"{cfg.checkpoint} was trained in pixel space (data.latent=false): drop the vae=... override"
            )
        return None
    return cfg.vae if cfg.get("vae") is not None else run_cfg.vae


def load_model(cfg: DictConfig) -> tuple[torch.nn.Module, object, dict]:
    """Build the network and diffusion for ``cfg.checkpoint`` and load its (EMA) weights, strictly.

    :param cfg: a node with checkpoint, model, diffusion, use_ema and ema_rate (``sample.yaml``, ``nll.yaml``).
    :return: (model in eval mode on the CPU, diffusion, info) where info holds ``class_names``, the
        checkpoint ``step`` and the ``channels_last`` its run set explicitly (both None for a plain state dict),
        and ``vae``, the config of the VAE that decodes a latent model's samples (None in pixel space).
    """
    model_cfg, diffusion_cfg, weights, info = _read_checkpoint(cfg)
    with torch.device("meta"):
        model = build(model_cfg)
    problem = ckpt.describe_mismatch(model, weights)
    if problem:
        presets = matching_presets(weights)
        hint = (
            f"The file matches model={' / model='.join(presets)}."
            if presets
            else "No model preset matches it."
        )
        raise SamplingError(f"{cfg.checkpoint} does not fit the chosen model: {problem}. {hint}")
    # The meta-device network takes the loaded tensors as they are: no random initialisation to throw away.
    # Weights stay fp32 whatever the file holds; the hardware group's autocast decides the compute precision.
    model.load_state_dict(weights, strict=True, assign=True)
    model.float()
    diffusion = build(diffusion_cfg)
    expected = model.in_channels * (2 if diffusion.learns_sigma else 1)
    if model.out_channels != expected:
        raise SamplingError(
            f"the network outputs {model.out_channels} channels but diffusion.model_var_type="
            f"{diffusion.model_var_type} expects {expected}: choose the diffusion preset the model was trained with"
        )
    return model.eval(), diffusion, info


def class_labels(cfg: DictConfig, model: torch.nn.Module) -> torch.Tensor | None:
    """The class of every requested image, a LongTensor [num_samples]: ``classes`` cycled, or all classes in
    turn; None for an unconditional model. Also checks that ``guidance_scale`` suits the model."""
    check_guidance(model, cfg.guidance_scale, cfg.get("guidance_style", "all"))
    if not model.num_classes:
        if cfg.classes:
            raise SamplingError(
                f"classes={list(cfg.classes)} given, but the model is unconditional: drop classes"
            )
        return None
    base = list(cfg.classes) if cfg.classes else list(range(model.num_classes))
    bad = [c for c in base if not 0 <= c < model.num_classes]
    if bad:
        raise SamplingError(f"classes {bad} are outside the model's range 0..{model.num_classes - 1}")
    return torch.tensor(base).repeat(cfg.num_samples // len(base) + 1)[: cfg.num_samples]


def latent_decoder(vae_cfg: DictConfig | None, model: torch.nn.Module, device: torch.device):
    """The VAE (a diffusion.latent.LatentVAE on ``device``) that decodes a latent model's samples, or None in
    pixel space. SamplingError for a model whose outputs cannot be images without one (not 1 or 3 channels) and
    for a VAE whose latents are not the model's."""
    if vae_cfg is None:
        if model.in_channels not in (1, 3):
            raise SamplingError(
                f"the model makes {model.in_channels}-channel samples, which are latents, not images: name the VAE "
                "that decodes them, e.g. vae=sd_vae_ft_ema (DiT's released models: sd_vae_ft_ema or sd_vae_ft_mse)"
            )
        return None
    from diffusion.latent import check_latent_channels

    vae = build(vae_cfg, device=device)
    check_latent_channels(vae, model.in_channels)
    return vae


def _missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    # OmegaConf.missing_keys resolves interpolations, and data.image_size points at a model that a project
    # checkpoint only supplies later; this walk reads no interpolation.
    found = []
    for key in node:
        if OmegaConf.is_missing(node, key):
            found.append(f"{prefix}{key}")
        elif not OmegaConf.is_interpolation(node, key) and OmegaConf.is_dict(node[key]):
            found += _missing_keys(node[key], f"{prefix}{key}.")
    return found


def check_complete(cfg: DictConfig) -> None:
    """SamplingError naming the first required value (``???`` in the config) that was not given."""
    missing = sorted(_missing_keys(cfg))
    if missing:
        raise SamplingError(
            f"missing required value {missing[0]}: set it on the command line, e.g. {missing[0]}=..."
        )


def check_request(cfg: DictConfig) -> None:
    """The checks that need no checkpoint."""
    check_complete(cfg)
    for key, minimum in [("num_samples", 1), ("batch_size", 1), ("grid_max", 1), ("seed", 0)]:
        if cfg[key] < minimum:
            raise SamplingError(f"{key}={cfg[key]}: must be >= {minimum}")


def sample(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Generate ``cfg.num_samples`` images into ``run_dir/samples.npz`` and ``grid.png``; returns the npz path."""
    env = init_distributed()
    try:
        return _sample(cfg, Path(run_dir), env)
    finally:
        cleanup_distributed()


def sampling_hardware(hardware: DictConfig, trained_channels_last: bool | None, local_rank: int = 0):
    """The hardware group's Hardware, in the memory layout the checkpoint's run chose explicitly where this
    run leaves it to the device default: a recipe's choice for its network (experiment=digits turns
    channels_last off, measured slower for that network in training and in sampling) holds for its samples."""
    layout = {}
    if hardware.get("channels_last") is None and trained_channels_last is not None:
        layout["channels_last"] = trained_channels_last
    return build(hardware, local_rank=local_rank, **layout)


def _sample(cfg: DictConfig, run_dir: Path, env: DistEnv) -> Path:
    check_request(cfg)
    model, diffusion, info = load_model(cfg)
    hw = sampling_hardware(cfg.hardware, info["channels_last"], env.local_rank)
    labels = class_labels(cfg, model)
    solver = build(cfg.solver)
    solver.check(diffusion)
    vae = latent_decoder(info["vae"], model, hw.device)
    if vae is not None:
        # Latents are not bounded to [-1, 1]: x0 is not clamped (DiT samples with clip_denoised=False).
        solver = latent_solver(solver)
        log.info("latent model: samples are decoded by the VAE %s", vae.name)
    model = hw.prepare_model(model)
    log.info("%s on %s; %d rank(s); %s", solver, hw, env.world_size, cfg.checkpoint)

    start = time.perf_counter()
    mine = list(range(env.rank, cfg.num_samples, env.world_size))
    shard = _generate_shard(cfg, model, diffusion, solver, labels, mine, hw, env, vae)
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / f".shard_{env.rank}.npy", shard)
    barrier()
    out = run_dir / "samples.npz"
    if env.is_main:
        _write_samples(run_dir, out, cfg, labels, env.world_size)
        elapsed = time.perf_counter() - start
        log.info(
            "%d samples from %s (step %s) in %.1f s: %.2f images/s on %d rank(s) -> %s",
            cfg.num_samples,
            cfg.checkpoint,
            info["step"],
            elapsed,
            cfg.num_samples / elapsed,
            env.world_size,
            out,
        )
    barrier()
    return out


def _generate_shard(cfg, model, diffusion, solver, labels, mine, hw, env, vae=None) -> np.ndarray:
    """This rank's images, uint8 [len(mine) x H x W x C], in batches of ``cfg.batch_size``; a latent model's
    samples decoded by ``vae``."""
    side, channels = model.image_size, model.in_channels
    if vae is not None:
        side, channels = side * vae.downsample, vae.image_channels
    images = [np.zeros((0, side, side, channels), np.uint8)]
    bar = tqdm(total=len(mine), desc="sampling", unit="img", disable=not env.is_main)
    for b in range(0, len(mine), cfg.batch_size):
        idx = mine[b : b + cfg.batch_size]
        y = labels[idx] if labels is not None else None
        x = generate(
            model, diffusion, solver, idx, cfg.seed, hw.device, y, cfg.guidance_scale, autocast=hw.autocast(),
            guidance_style=cfg.get("guidance_style", "all"),
        )  # fmt: skip
        if vae is not None:
            x = vae.decode(x)
        images.append(to_uint8(x))
        bar.update(len(idx))
    bar.close()
    return np.concatenate(images)


def _write_samples(run_dir: Path, out: Path, cfg: DictConfig, labels, world_size: int) -> None:
    """Interleave the ranks' shards back into index order; write samples.npz atomically, then grid.png."""
    shards = [np.load(run_dir / f".shard_{r}.npy") for r in range(world_size)]
    arr = np.empty((cfg.num_samples, *shards[0].shape[1:]), dtype=np.uint8)
    for r, shard in enumerate(shards):
        arr[r::world_size] = shard
    arrays = {"arr_0": arr}  # the layout OpenAI's evaluator reads: arr_0 images, arr_1 labels
    if labels is not None:
        arrays["arr_1"] = labels.numpy()
    tmp = run_dir / ".samples.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(out)
    save_grid(arr[: cfg.grid_max], run_dir / "grid.png")
    for r in range(world_size):
        (run_dir / f".shard_{r}.npy").unlink()
