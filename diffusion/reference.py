"""A reference batch in OpenAI's format from a dataset, read through the ``data`` group as training reads it.

    python -m diffusion.reference data=image_folder data.dir=/data/imagenet data.image_size=64 \\
        num_images=50000 out=ref.npz eval=inception

writes ``out``: ``arr_0`` (uint8 [N x H x W x C], the crop the training run sees: center crop, or the random crop
of ``data.random_crop=true`` drawn from ``seed``; never flipped) and the statistics of the ``eval`` group's features
(``mu``, ``sigma``, ``mu_s``, ``sigma_s``), the file ``eval.reference`` and ``python -m diffusion.evaluate``
compare samples with. ``num_images`` images are drawn at random (seeded) from the whole dataset, so that a folder
sorted by class gives every class its share; 0 takes all of them. The dataset is read with ``data.batch_size``
images per batch and ``data.num_workers`` decoding processes; features are computed on the ``hardware`` group's
device in batches of ``eval.batch_size``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError
from torch.utils.data import DataLoader

from diffusion import CONF_DIR, register
from diffusion.config import build
from diffusion.data.datasets import SeededItems
from diffusion.data.images import to_uint8
from diffusion.errors import ConfigError

log = logging.getLogger(__name__)


def reference_dataset(data: DictConfig):
    """The ``data`` group's dataset as the reference reads it: the training crop, no flips."""
    from diffusion.data.build import build_dataset

    return build_dataset(data, latent=False, no_flips=True)  # a reference holds the real images, not mirrors


def choose_images(count: int, num_images: int, seed: int) -> np.ndarray:
    """The indices of the reference's images: all when ``num_images`` is 0, else a seeded random subset, in
    ascending order (files are read in their order)."""
    if num_images < 0:
        raise ConfigError(f"num_images={num_images}: give a positive number, or 0 for the whole dataset")
    if num_images > count:
        raise ConfigError(
            f"num_images={num_images} but the dataset holds {count} images: ask for at most {count} (num_images=0 "
            "takes them all)"
        )
    if num_images in (0, count):
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, num_images, replace=False))


def write_reference(cfg: DictConfig) -> Path:
    """Write the reference batch ``cfg.out`` (see the module docstring); returns its path."""
    from diffusion.evaluation.batch_files import write_reference_batch
    from diffusion.evaluation.evaluator import Evaluator
    from diffusion.sample import check_complete

    check_complete(cfg)
    try:
        cfg.data.image_size  # noqa: B018  (the data group's default follows the model, which is absent here)
    except InterpolationResolutionError:
        raise ConfigError(
            "give the reference's image size, the size of the model's samples: data.image_size=64 (e.g.)"
        ) from None
    out = Path(cfg.out)
    if out.suffix != ".npz":
        raise ConfigError(
            f"out={cfg.out}: name the reference batch file .npz (OpenAI's evaluator reads .npz)"
        )
    if cfg.eval.features == "none":
        raise ConfigError("eval=none has no features to store: choose eval=inception (or eval=digits)")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: must be >= 1")
    hw = build(cfg.hardware, local_rank=0)
    # The features first: a missing Inception weights file fails before the dataset is scanned.
    evaluator = Evaluator(
        features=cfg.eval.features,
        inception_weights=cfg.eval.inception_weights,
        device=hw.device,
        batch_size=cfg.eval.batch_size,
        download_weights=cfg.eval.download_weights,
    )
    dataset = reference_dataset(cfg.data)
    indices = choose_images(len(dataset), cfg.num_images, cfg.seed)
    loader = DataLoader(
        SeededItems(dataset, (cfg.seed,), indices),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=hw.device.type == "cuda",
    )
    log.info(
        "reference batch: %d of %d images of %s at %d px, %s features on %s -> %s",
        len(indices),
        len(dataset),
        cfg.data._target_.rsplit(".", 1)[-1],
        dataset.image_size,
        evaluator.feature_set.name,
        hw.device,
        out,
    )

    def images() -> Iterator[np.ndarray]:
        from tqdm.auto import tqdm

        with tqdm(total=len(indices), desc="reference", unit="img", dynamic_ncols=True) as bar:
            for x, _ in loader:
                yield to_uint8(x)
                bar.update(len(x))

    start = time.perf_counter()
    batch = write_reference_batch(out, images(), evaluator)
    log.info(
        "wrote %d images (%dx%dx%d) and their %s statistics to %s in %.1f s",
        len(batch),
        *batch.shape[1:],
        evaluator.feature_set.name,
        out,
        time.perf_counter() - start,
    )
    return out


def main() -> None:
    register()
    import hydra

    from diffusion.config.explain import run_main
    from diffusion.errors import exit_on_user_error

    @hydra.main(config_path=str(CONF_DIR), config_name="reference", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        exit_on_user_error(lambda: write_reference(cfg), log)

    run_main(run)  # a config that does not compose: one line naming the key and the fix


if __name__ == "__main__":
    main()
