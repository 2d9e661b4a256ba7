"""What the training loop optimises: the seam between the engine and the model family it trains.

The engine (diffusion/training.py) owns everything that does not depend on the objective: data, EMA, optimizer,
lr schedule, micro-batching, DDP, checkpoints, W&B, SLURM pre-emption. A task owns the rest:

- ``build_model(model_cfg, data)``: the network, with the run-time values only the data and the task know;
- ``losses(net, x, y, t, noise)``: per-example loss terms of one micro-batch, "loss" among them;
- ``sample_grid(model, n, seed, hw)``: images for the periodic grids (None when the task does not generate);
- ``evaluate(model, step, run)``: metrics the engine logs every ``eval_every`` steps;
- ``objective``: which of those metrics ``best.pt`` follows, and whether lower or higher is better (None: none).

Every task is built from the ``task`` config group with the run's diffusion process and timestep sampler, which
draws each example's timestep (and the engine draws its noise) from a generator keyed by (seed, step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from diffusion.config import build
from diffusion.errors import ConfigError
from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.sample_quality import SampleQuality
from diffusion.solvers import Solver, generate
from diffusion.timestep_samplers import ScheduleSampler


@dataclass(frozen=True)
class RunContext:
    """What a task's periodic work may need from the run: where and how to compute, and the run's seed."""

    hw: object  # diffusion.hardware.Hardware
    env: object  # diffusion.distributed.DistEnv
    seed: int


class Task:
    """The interface the engine calls; see the module docstring.

    :param diffusion: the process that noises training inputs (and, for generative tasks, samples).
    :param sampler: draws the timestep of every training example.
    """

    def __init__(self, diffusion: GaussianDiffusion, sampler: ScheduleSampler) -> None:
        self.diffusion = diffusion
        self.sampler = sampler

    @property
    def num_timesteps(self) -> int:
        """T of the original process: the loss tracker's quartiles split [0, T)."""
        return self.diffusion.original_num_steps

    def original_timesteps(self, t: Tensor) -> Tensor:
        """:param t: a LongTensor [N] of the process's timesteps; returns the original indices [N]."""
        return self.diffusion.original_timesteps(t)

    def build_model(self, model_cfg: DictConfig, data) -> tuple[nn.Module, dict]:
        raise NotImplementedError

    def losses(self, net: nn.Module, x: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def sample_grid(self, model: nn.Module, n: int, seed: int, hw) -> Tensor | None:
        """``n`` images in [-1, 1] for a progress grid, [n x C x H x W]; None when the task does not generate."""
        return None

    def evaluate(self, model: nn.Module, step: int, run: RunContext) -> dict[str, float]:
        """Metrics of ``model`` (the first EMA) at ``step``; every rank calls it. None by default."""
        return {}

    @property
    def objective(self) -> tuple[str, str] | None:
        """(key in :meth:`evaluate`'s dict, "minimize" or "maximize") of the metric the engine keeps the best
        checkpoint of, ``best.pt``; None keeps none. Every rank must return the same value for that key."""
        return None


def fit_to_data(model_cfg: DictConfig, data, **runtime) -> dict:
    """The model group's config as a dict, completed with the run-time values by the network class's own
    ``fit_to_data(config, data, **runtime)`` (see UNetModel.fit_to_data)."""
    config = OmegaConf.to_container(model_cfg, resolve=True)
    network = get_class(config["_target_"])
    if not hasattr(network, "fit_to_data"):
        raise ConfigError(
            f"model._target_={config['_target_']} cannot be trained here: it has no fit_to_data classmethod "
            "that takes the data's channels and classes"
        )
    return network.fit_to_data(config, data, **runtime)


class DiffusionTask(Task):
    """Denoising diffusion: the loss the process defines (ADM's L_simple, plus the bound for learned variances).

    :param solver: the solver of the periodic sample grids and of the evaluation's samples.
    :param evaluation: scores samples every ``eval_every`` steps (the ``eval`` group; FID and the like).
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        sampler: ScheduleSampler,
        solver: Solver | None = None,
        evaluation: SampleQuality | None = None,
    ) -> None:
        super().__init__(diffusion, sampler)
        self.solver = solver
        self.evaluation = evaluation
        self.class_cond = False

    def build_model(self, model_cfg: DictConfig, data) -> tuple[nn.Module, dict]:
        """The configured network with the data's channels and classes and the process's output channels.

        :return: the model and its complete constructor config (stored in checkpoints, so that sampling
            needs no flags).
        """
        config = fit_to_data(model_cfg, data, learn_sigma=self.diffusion.learns_sigma)
        model = build(config)
        self.class_cond = model.num_classes is not None
        if self.evaluation is not None:
            self.evaluation.check_model(model)  # a reference of another size fails now, not at the first eval
        return model, config

    def losses(self, net: nn.Module, x: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """
        :param x: an [N x C x H x W] Tensor of clean images in [-1, 1]; y: [N] labels (ignored when the model
            is unconditional); t: [N] timesteps; noise: standard normal noise like x.
        :return: dict of [N] Tensors: "loss", and "mse" / "vb" where the process has them.
        """
        kwargs = {"y": y} if self.class_cond else {}
        return self.diffusion.training_losses(net, x, t, model_kwargs=kwargs, noise=noise)

    def sample_grid(self, model: nn.Module, n: int, seed: int, hw) -> Tensor | None:
        """``n`` samples with fixed noise and classes (0, 1, 2...), so that successive grids are comparable."""
        if self.solver is None:
            return None
        classes = torch.arange(n) % model.num_classes if model.num_classes else None
        return generate(
            model, self.diffusion, self.solver, range(n), seed, hw.device, classes, autocast=hw.autocast()
        )

    def evaluate(self, model: nn.Module, step: int, run: RunContext) -> dict[str, float]:
        """The evaluation's scores of ``num_samples`` samples of ``model`` ("eval/fid"...); {} without one."""
        if self.evaluation is None:
            return {}
        return self.evaluation(model, self.diffusion, self.solver, step, run)

    @property
    def objective(self) -> tuple[str, str] | None:
        """The evaluation's ``eval.objective`` as (e.g.) ("eval/fid", "minimize"); None when it tracks none."""
        return self.evaluation.tracked if self.evaluation is not None else None
