"""Encode a data set once into a latent cache that training with ``data.latent=true`` reads:

    python -m diffusion.latent_cache data.dir=/data/imagenet data.image_size=256 \
        data.latent_cache=/data/latents/imagenet256_ema [vae=sd_vae_ft_mse] [hardware=gpu]

The ``data`` and ``vae`` groups are training's: the same overrides plus ``data.latent=true`` then train on the
cache, every rank reading the same memory-mapped files. ``data.image_size`` is given, or follows ``model=...``
as in training (DiT-XL/2's input_size 32 times the VAE's 8: 256). A cache made with another VAE, image size,
data set or flip setting is refused with one line naming what differs (``rebuild=true`` replaces it); a
matching one is kept as it is. The cache stores each image's posterior (mean and standard deviation, see
diffusion/latent.py), both flips where the data flips, and is written aside and renamed into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from diffusion import CONF_DIR, register
from diffusion.config import build
from diffusion.data.build import build_dataset
from diffusion.data.latent import LatentDataset, build_latent_cache
from diffusion.models.vae import LatentError

log = logging.getLogger(__name__)


def write_latent_cache(cfg: DictConfig) -> LatentDataset:
    """Encode ``cfg.data``'s data set with ``cfg.vae`` into ``cfg.data.latent_cache`` (a composed
    ``conf/latent_cache.yaml``); returns the cache, opened."""
    if not cfg.data.get("latent_cache"):
        raise LatentError(
            "data.latent_cache is not set: name the cache directory to write, e.g. "
            "data.latent_cache=/data/latents/imagenet256"
        )
    hw = build(cfg.hardware)
    dataset = build_dataset(cfg.data, latent=False)
    vae = build(cfg.vae, device=hw.device)
    existing = (Path(cfg.data.latent_cache).expanduser() / "meta.json").is_file()
    bar = tqdm(total=len(dataset), desc="encoding", unit="img")
    latents = build_latent_cache(
        dataset,
        vae,
        cfg.data.latent_cache,
        flips=cfg.flips,
        rebuild=cfg.rebuild,
        batch_size=cfg.batch_size,
        num_workers=cfg.data.num_workers,
        storage_dtype=cfg.storage_dtype,
        progress=lambda done, total: bar.update(done - bar.n),
    )
    bar.close()
    log.info(
        "%s latent cache %s: %d images of %d px as %dx%dx%d latents%s, VAE %s",
        "reused the" if existing and bar.n == 0 else "wrote the",
        latents.path,
        len(latents),
        latents.pixel_image_size,
        latents.channels,
        latents.image_size,
        latents.image_size,
        " (and their mirror images)" if latents.flips else "",
        vae.name,
    )
    return latents


def main() -> None:
    register()
    import hydra

    from diffusion.config.explain import run_main
    from diffusion.errors import exit_on_user_error

    @hydra.main(config_path=str(CONF_DIR), config_name="latent_cache", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        exit_on_user_error(lambda: write_latent_cache(cfg), log)

    run_main(run)


if __name__ == "__main__":
    main()
