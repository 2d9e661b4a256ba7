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

from diffusion.config import register_configs, register_resolvers, user_error

register_configs()
register_resolvers()
log = logging.getLogger("train")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from diffusion.loggers import run_name_and_group
    from diffusion.training import train

    hydra_cfg = HydraConfig.get()
    name, group = run_name_and_group(hydra_cfg)
    try:
        metrics = train(cfg, hydra_cfg.runtime.output_dir, name=name, group=group)
    except Exception as e:
        message = user_error(e)
        if message is None or hydra_cfg.mode.name == "MULTIRUN":
            raise  # a bug, or a sweep job: the launcher reports it with its traceback
        log.debug("training failed", exc_info=True)  # shown with hydra.verbose=true
        log.error("%s", message)
        sys.exit(1)
    return metrics.get("loss") if metrics else None


if __name__ == "__main__":
    main()
