"""Generate images: python sample.py checkpoint=outputs/.../checkpoints/latest.pt num_samples=64 solver=dpm_solver

Writes samples.npz (arr_0: uint8 [N,H,W,C], arr_1: class labels; the layout OpenAI's evaluator reads) and grid.png
into the run directory. OpenAI's released files: python sample.py model=unet_256 diffusion=adm
checkpoint=256x256_diffusion.pt solver=ddim solver.steps=25
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import diffusion
from diffusion.errors import exit_on_user_error

diffusion.register()  # the config schemas, before @hydra.main composes

log = logging.getLogger("sample")


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns ``score_objective`` when the samples are scored (score=digits|inception), for sweepers."""
    from diffusion.sample import read_score, sample

    run_dir = HydraConfig.get().runtime.output_dir
    exit_on_user_error(lambda: sample(cfg, run_dir), log)
    return read_score(cfg, run_dir)


if __name__ == "__main__":
    from diffusion.config.explain import run_main

    run_main(main)  # a config that does not compose: one line naming the key and the fix
