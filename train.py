"""Train a diffusion model: python train.py model=unet_128 data=image_folder data.dir=/data/imagenet optim.lr=1e-4

`-m` turns any list of overrides into a sweep; `hydra/launcher=slurm` sends it to a SLURM cluster.
`python train.py --help` lists the config groups; `--cfg job` prints the composed config.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion.config import register_configs, register_resolvers

register_configs()
register_resolvers()
log = logging.getLogger("train")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from diffusion.checkpoint import CheckpointError
    from diffusion.loggers import run_name_and_group
    from diffusion.training import TrainingError, train

    hydra_cfg = HydraConfig.get()
    name, group = run_name_and_group(hydra_cfg)
    try:
        metrics = train(cfg, hydra_cfg.runtime.output_dir, name=name, group=group)
    except (TrainingError, CheckpointError, ValueError) as e:
        # A clear, single-line error for the user; the traceback goes to train.log only.
        log.debug("training failed", exc_info=True)
        log.error("%s", e)
        if hydra_cfg.mode.name == "MULTIRUN":
            raise
        sys.exit(1)
    return metrics.get("loss") if metrics else None


if __name__ == "__main__":
    main()
