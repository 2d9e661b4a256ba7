"""Bits/dim of a checkpoint on a dataset: the variational bound, as guided-diffusion's ``image_nll.py`` reports it.

    python -m diffusion.nll checkpoint=outputs/digits/checkpoints/latest.pt data=digits num_batches=4

For every image the full bound is evaluated with :meth:`GaussianDiffusion.calc_bpd_loop` (one network call per
training timestep: T calls per batch). The run directory gets ``nll.npz`` with the per-image values (``index``,
``total_bpd``, ``prior_bpd``; ``vb``, ``xstart_mse`` and ``mse`` per term, column i for t = T-1-i) and the log a
summary line. Under torchrun the ranks split every batch (``data.batch_size`` is the global batch, as in
training) and rank 0 writes the merged results. The noise of batch b on rank r is drawn from a generator seeded by
(seed, r, b), so a run is reproducible for a given seed, batch size and number of ranks.

A plain state dict (OpenAI's releases) needs ``model=<preset> diffusion=<preset>``, as for sample.py.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion import CONF_DIR, register
from diffusion.data.build import build_dataset
from diffusion.data.datasets import InfiniteLoader
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.runtime.distributed import DistEnv, all_gather_object, cleanup_distributed, init_distributed
from diffusion.sample import SamplingError, check_complete, load_model, sampling_hardware
from diffusion.sampling.noise import derived_seed

log = logging.getLogger(__name__)
TERMS = ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse")


def batch_generator(seed: int, rank: int, batch: int) -> torch.Generator:
    """The CPU generator that draws the noise of ``batch`` on ``rank``."""
    return torch.Generator().manual_seed(derived_seed(seed, rank, batch))


@torch.no_grad()
def bits_per_dim(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    seed: int = 0,
    rank: int = 0,
    clip_denoised: bool = True,
) -> dict[str, np.ndarray]:
    """
    The variational bound of every image in ``batches``.

    :param batches: (x, y) pairs: x an [N x C x H x W] Tensor in [-1, 1], y [N] labels (used when the model is
        class-conditional).
    :return: dict of float64 arrays, concatenated over the batches: "total_bpd" and "prior_bpd" [M]; "vb",
        "xstart_mse" and "mse" [M x T].
    """
    results = {k: [] for k in TERMS}
    for b, (x, y) in enumerate(batches):
        kwargs = {"y": y.to(device)} if model.num_classes else {}
        out = diffusion.calc_bpd_loop(
            model, x.to(device), clip_denoised, kwargs, generator=batch_generator(seed, rank, b)
        )
        for k in TERMS:
            results[k].append(out[k].double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in results.items()}


def _dataset(cfg: DictConfig, model: torch.nn.Module):
    """The configured dataset in the model's format: its image size and channels."""
    data = cfg.data
    if not OmegaConf.is_interpolation(data, "image_size") and data.image_size != model.image_size:
        raise SamplingError(
            f"data.image_size={data.image_size} but the model takes {model.image_size} px images: drop the override"
        )
    dataset = build_dataset(data, latent=False, image_size=model.image_size, channels=model.in_channels)
    if model.num_classes and not dataset.num_classes:
        raise SamplingError("the model is class-conditional but the data has no labels: choose labelled data")
    return dataset


def evaluate(cfg: DictConfig, run_dir: str | Path) -> dict | None:
    """Evaluate ``cfg.checkpoint`` on ``cfg.data``; rank 0 writes ``run_dir/nll.npz`` and returns the summary
    (mean total_bpd and prior_bpd, num_images, num_terms), the other ranks None."""
    env = init_distributed()
    try:
        return _evaluate(cfg, Path(run_dir), env)
    finally:
        cleanup_distributed()


def _loader(cfg: DictConfig, dataset, env: DistEnv) -> tuple[InfiniteLoader, int]:
    if cfg.data.batch_size % env.world_size:
        raise SamplingError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by the {env.world_size} ranks"
        )
    try:
        loader = InfiniteLoader(
            dataset, cfg.data.batch_size // env.world_size, env.rank, env.world_size, cfg.seed,
            cfg.data.num_workers, shuffle=False,
        )  # fmt: skip
    except ValueError as e:
        raise SamplingError(f"data.batch_size={cfg.data.batch_size}: {e}") from None
    if cfg.num_batches < 0 or cfg.num_batches > loader.batches_per_epoch:
        raise SamplingError(
            f"num_batches={cfg.num_batches}: the dataset holds {loader.batches_per_epoch} batches of "
            f"{cfg.data.batch_size}; use 1..{loader.batches_per_epoch}, or 0 for all of them"
        )
    return loader, cfg.num_batches or loader.batches_per_epoch


def _evaluate(cfg: DictConfig, run_dir: Path, env: DistEnv) -> dict | None:
    check_complete(cfg)
    if cfg.seed < 0:
        raise SamplingError(f"seed={cfg.seed}: must be >= 0")
    model, diffusion, info = load_model(cfg)
    if not isinstance(diffusion, GaussianDiffusion):
        raise SamplingError(
            f"bits/dim is the variational bound of ADM's discrete process (diffusion=adm, ddpm, improved); "
            f"{cfg.checkpoint} was trained with diffusion={diffusion.name}, which has no such bound here"
        )
    if info.get("vae") is not None:
        raise SamplingError(
            f"{cfg.checkpoint} models the VAE latents of its images (data.latent=true): bits/dim is computed "
            "on pixels, for pixel-space models only"
        )
    hw = sampling_hardware(cfg.hardware, info["channels_last"], env.local_rank)
    loader, num_batches = _loader(cfg, _dataset(cfg, model), env)
    model = hw.prepare_model(model)
    log.info("bits/dim of %s on %d batches of %d, %d terms each", cfg.checkpoint, num_batches,
             cfg.data.batch_size, diffusion.num_timesteps)  # fmt: skip
    with hw.autocast():
        ours = bits_per_dim(
            model, diffusion, itertools.islice(iter(loader), num_batches), hw.device, cfg.seed, env.rank,
            cfg.clip_denoised,
        )  # fmt: skip
    ours["index"] = loader.shard_indices(0)[: len(ours["total_bpd"])]
    gathered = all_gather_object(ours)
    if not env.is_main:
        return None
    merged = {k: np.concatenate([g[k] for g in gathered]) for k in ours}
    run_dir.mkdir(parents=True, exist_ok=True)
    np.savez(run_dir / "nll.npz", **merged)
    summary = {
        "total_bpd": float(merged["total_bpd"].mean()),
        "prior_bpd": float(merged["prior_bpd"].mean()),
        "num_images": len(merged["total_bpd"]),
        "num_terms": diffusion.num_timesteps,
        "step": info["step"],
    }
    log.info("total_bpd=%.6f prior_bpd=%.6f over %d images (%d terms; checkpoint step %s) -> %s",
             summary["total_bpd"], summary["prior_bpd"], summary["num_images"], summary["num_terms"],
             summary["step"], run_dir / "nll.npz")  # fmt: skip
    return summary


def main() -> None:
    register()
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from diffusion.config.explain import run_main
    from diffusion.errors import exit_on_user_error

    @hydra.main(config_path=str(CONF_DIR), config_name="nll", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        exit_on_user_error(lambda: evaluate(cfg, HydraConfig.get().runtime.output_dir), log)

    run_main(run)  # a config that does not compose: one line naming the key and the fix


if __name__ == "__main__":
    main()
