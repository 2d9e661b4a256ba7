"""Building the ``data`` group's dataset: images, or their latents under a VAE."""

from __future__ import annotations

import os

from diffusion.config import LOADER_KEYS, build
from diffusion.data.latent import latent_training_data


def build_dataset(
    data_cfg,
    *,
    cache_dir: str | os.PathLike | None = None,
    vae=None,
    latent: bool | None = None,
    no_flips: bool = False,
    **fields,
):
    """
    The dataset of the ``data`` group (its loader keys left out): the one way every command builds it.

    :param cache_dir: where an image folder keeps its scan cache (ignored by classes that take none).
    :param vae: the ``vae`` group's config (or a VAE), for ``data.latent``.
    :param latent: the latents under the VAE (default: ``data.latent``); False: the images themselves.
    :param no_flips: turn random flips off (a reference batch holds the real images, not mirrors).
    :param fields: constructor values that replace the group's (e.g. a checkpoint's image_size and channels).
    """
    # The given fields replace the group's unread: data.image_size may be an interpolation that cannot resolve here.
    config = {k: data_cfg[k] for k in data_cfg if k not in LOADER_KEYS and k not in fields}
    config.update(fields)
    if no_flips and "random_flip" in config:
        config["random_flip"] = False
    if cache_dir is not None and str(config.get("_target_", "")).endswith("ImageFolder"):
        config["cache_dir"] = str(cache_dir)
    dataset = build(config)
    if not (data_cfg.get("latent") if latent is None else latent):
        return dataset
    return latent_training_data(dataset, vae, data_cfg.latent_cache)
