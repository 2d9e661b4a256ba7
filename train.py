"""Train a diffusion model: python train.py model=unet_128 data.dir=/data/imagenet optim.lr=1e-4

`-m` turns any list of overrides into a sweep; `hydra/launcher=slurm` sends it to a SLURM cluster.
`python train.py --help` lists the config groups; `--cfg job` prints the composed config.
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import diffusion
from diffusion.errors import exit_on_user_error

diffusion.register()  # the config schemas, before @hydra.main composes

log = logging.getLogger("train")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from diffusion.engine.loggers import run_name_and_group
    from diffusion.engine.training import train
    from diffusion.evaluation.sample_quality import objective_value

    hydra_cfg = HydraConfig.get()
    name, group = run_name_and_group(hydra_cfg)

    def run() -> dict:
        return train(cfg, hydra_cfg.runtime.output_dir, name=name, group=group)

    # A sweep job's failure is reported by its launcher, with the traceback; a single run's user error is one line.
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    metrics = run() if sweep else exit_on_user_error(run, log)
    # What a sweeper optimises: the final eval.objective (the loss without evaluation). In a sweep a missing or
    # non-finite value fails the trial with the reason, rather than handing the sweeper a number.
    return objective_value(cfg.eval.objective, metrics, strict=sweep)


if __name__ == "__main__":
    from diffusion.config.explain import run_main

    run_main(main)  # a config that does not compose: one line naming the key and the fix
