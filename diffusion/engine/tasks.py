"""What the training loop optimises: the seam between the engine and the model family it trains.

The engine (diffusion/training.py) owns everything that does not depend on the objective: data, EMA, optimizer,
lr schedule, micro-batching, DDP, checkpoints, W&B, SLURM pre-emption. A task owns the rest:

- ``build_model(model_cfg, data)``: the network, with the run-time values only the data and the task know;
- ``losses(net, x, y, t, noise)``: per-example loss terms of one micro-batch, "loss" among them;
- ``sample_grid(model, n, seed, hw)``: images for the periodic grids (None when the task does not generate);
- ``evaluate(model, step, run)``: metrics the engine logs every ``eval_every`` steps;
- ``objective``: which of those metrics ``best.pt`` follows, and whether lower or higher is better (None: none).

The tasks: :class:`DiffusionTask` (``task=diffusion``), :class:`SuperResTask` (``task=super_res``: the same loss
for a SuperResModel given the area-downsampled image) and :class:`ClassifierTask` (``task=classifier``: a
noisy-image classifier for classifier guidance, validated on held-out data).

Every task is built from the ``task`` config group with the run's diffusion process and timestep sampler, which
draws each example's timestep (and the engine draws its noise) from a generator keyed by (seed, step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from diffusion.config import build
from diffusion.engine.loggers import LossTracker
from diffusion.errors import ConfigError
from diffusion.evaluation.sample_quality import SampleQuality
from diffusion.models.protocol import declares_network
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.process.timestep_samplers import ScheduleSampler
from diffusion.sampling.generate import generate
from diffusion.sampling.noise import derived_seed
from diffusion.sampling.solvers import Solver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What a task's periodic work may need from the run: where and how to compute, and the run's seed."""

    hw: object  # diffusion.runtime.hardware.Hardware
    env: object  # diffusion.runtime.distributed.DistEnv
    seed: int


class Task:
    """The interface the engine calls; see the module docstring.

    :param diffusion: the process that noises training inputs (and, for generative tasks, samples).
    :param sampler: draws the timestep of every training example.
    """

    # Whether the task makes images (grids, evaluation) with the run's solver.
    generates = True

    def __init__(self, diffusion: GaussianDiffusion, sampler: ScheduleSampler) -> None:
        self.diffusion = diffusion
        self.sampler = sampler

    def quartile(self, levels: Tensor) -> Tensor:
        """Which quarter of the formulation's level density each example's level fell in, a LongTensor [N] in
        0..3 (ADM: quarters of [0, T); EDM and flow matching: equal-probability bins)."""
        return self.diffusion.quartile(levels)

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
    if not declares_network(network):
        raise ConfigError(
            f"model._target_={config['_target_']} cannot be trained here: it does not declare the network protocol "
            "(diffusion.models.protocol.Network: role, channels, classes and a fit_to_data classmethod)"
        )
    return network.fit_to_data(config, data, **runtime)


class DiffusionTask(Task):
    """Denoising diffusion: the loss the process defines (ADM's L_simple, plus the bound for learned variances).

    :param solver: the solver of the periodic sample grids and of the evaluation's samples.
    :param evaluation: scores samples every ``eval_every`` steps (the ``eval`` group; FID and the like).
    """

    # Whether the network is a SuperResModel, which needs the low-resolution image (SuperResTask).
    takes_low_res = False

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
        self.vae = None  # latent data's VAE (diffusion.models.vae.LatentVAE): grids are decoded through it

    def build_model(self, model_cfg: DictConfig, data) -> tuple[nn.Module, dict]:
        """The configured network with the data's channels and classes and the process's output channels.

        :return: the model and its complete constructor config (stored in checkpoints, so that sampling
            needs no flags).
        """
        config = fit_to_data(model_cfg, data, learn_sigma=self.diffusion.learns_sigma)
        if (get_class(config["_target_"]).role == "upsampler") != self.takes_low_res:
            raise ConfigError(
                f"task={'super_res' if self.takes_low_res else 'diffusion'} does not train "
                f"model._target_={config['_target_']}: a SuperResModel (model=upsampler_*) trains with "
                "task=super_res (e.g. experiment=digits_upsampler), any other diffusion network with task=diffusion"
            )
        model = build(config)
        self.class_cond = model.num_classes is not None
        self.vae = getattr(data, "vae", None)
        if self.evaluation is not None:
            self.evaluation.check_model(
                model, self.vae
            )  # a reference of another size fails now, not at the first eval
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
        solver, decode = self._sampling(hw)
        x = generate(
            model, self.diffusion, solver, range(n), seed, hw.device, classes, autocast=hw.autocast()
        )
        return x if decode is None else decode(x)

    def evaluate(self, model: nn.Module, step: int, run: RunContext) -> dict[str, float]:
        """The evaluation's scores of ``num_samples`` samples of ``model`` ("eval/fid"...); {} without one."""
        if self.evaluation is None:
            return {}
        solver, decode = self._sampling(run.hw)
        return self.evaluation(model, self.diffusion, solver, step, run, decode=decode)

    def _sampling(self, hw):
        """The solver and the decoder (None in pixel space) of the images this task makes: latents are decoded by
        the data's VAE, where the model runs, and their x0 predictions are not clamped (they are not bounded)."""
        if self.vae is None or self.solver is None:
            return self.solver, None
        from diffusion.sampling.solvers import unclipped

        self.vae = self.vae.on(hw.device)  # the loader keeps its own copy
        return unclipped(self.solver), self.vae.decode

    @property
    def objective(self) -> tuple[str, str] | None:
        """The evaluation's ``eval.objective`` as (e.g.) ("eval/fid", "minimize"); None when it tracks none."""
        return self.evaluation.tracked if self.evaluation is not None else None


class SuperResTask(DiffusionTask):
    """Super-resolution diffusion (the reference's super_res_train.py): DiffusionTask's loss for a SuperResModel,
    which sees each image's area-downsampled copy ``low_res`` (``F.interpolate(x, small_size, mode="area")``, as
    the reference's loader makes it) besides the noisy full-size image.

    :param solver: the solver of the periodic grids, which upsample held-out images (training images when the
        data has none).
    """

    takes_low_res = True

    def __init__(
        self, diffusion: GaussianDiffusion, sampler: ScheduleSampler, solver: Solver | None = None
    ) -> None:
        super().__init__(diffusion, sampler, solver)
        self.small_size = 0
        self.grid_data = None

    def build_model(self, model_cfg: DictConfig, data) -> tuple[nn.Module, dict]:
        """The SuperResModel for the data (see DiffusionTask.build_model); it must name its ``small_size``."""
        model, config = super().build_model(model_cfg, data)
        if config.get("small_size") is None:
            raise ConfigError(
                "task=super_res needs model.small_size: the low resolution the model upsamples from "
                f"(e.g. {config['image_size'] // 4})"
            )
        self.small_size = config["small_size"]
        self.grid_data = held_out_data(data) or data
        return model, config

    def low_res(self, x: Tensor) -> Tensor:
        """:param x: an [N x C x H x W] Tensor; returns its [N x C x small_size x small_size] area average."""
        return F.interpolate(x, size=(self.small_size, self.small_size), mode="area")

    def losses(self, net: nn.Module, x: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """As DiffusionTask.losses, with ``low_res`` made from x."""
        kwargs = {"low_res": self.low_res(x), **({"y": y} if self.class_cond else {})}
        return self.diffusion.training_losses(net, x, t, model_kwargs=kwargs, noise=noise)

    def sample_grid(self, model: nn.Module, n: int, seed: int, hw) -> Tensor | None:
        """The first ``n`` held-out images' low-resolution copies (nearest-upsampled), each followed by what the
        model makes of it: 2n images, pairs side by side."""
        if self.solver is None:
            return None
        n = min(n, len(self.grid_data))
        x, y = _stack([self.grid_data[i] for i in range(n)])
        low = self.low_res(x).to(hw.device)
        classes = y if self.class_cond else None
        samples = generate(
            model, self.diffusion, self.solver, range(n), seed, hw.device, classes,
            autocast=hw.autocast(), model_kwargs={"low_res": low},
        )  # fmt: skip
        inputs = F.interpolate(low, size=x.shape[-2:], mode="nearest")
        return torch.stack([inputs, samples], dim=1).flatten(0, 1)  # (2n, C, H, W): input, output, input...


class ClassifierTask(Task):
    """A noisy-image classifier for classifier guidance (the reference's classifier_train.py).

    Each training image is noised with ``q_sample`` at the engine's timestep t (drawn by the ``sampler`` group,
    uniformly by default) and classified at t, as the network sees timesteps (original indices); the loss is
    the cross-entropy. Per example it reports ``loss``, ``acc@1`` and ``acc@5`` (0 or 1), so the engine logs
    each and its per-timestep-quartile values. :meth:`evaluate` does the same on the data's held-out set
    (``data.held_out()``: digits' "val" split, an image folder's ``val_dir``) under "val/...".

    :param noised: classify noisy images x_t; False classifies the clean images at t = 0 (the reference's
        ``--noised False``), whose per-quartile values then only repeat the overall ones.
    :param val_timesteps: each held-out image is classified this many times, at a timestep drawn uniformly in
        each of as many equal slices of [0, T) (4: one per quartile), from a generator keyed by the run's seed
        and the image's index, so every evaluation sees the same noisy images.
    :param val_images: validate on the first this many held-out images; 0 = all of them.
    :param val_batch_size: images per forward pass of the validation, on each rank.
    :param solver: not used: a classifier makes no images (every task is built with the run's solver).
    """

    generates = False

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        sampler: ScheduleSampler,
        solver: Solver | None = None,
        noised: bool = True,
        val_timesteps: int = 4,
        val_images: int = 0,
        val_batch_size: int = 256,
    ) -> None:
        if not diffusion.discrete:
            raise ConfigError(
                f"task=classifier trains a noisy-image classifier on ADM's discrete process; diffusion="
                f"{diffusion.name} has none: use diffusion=adm (classifier guidance of EDM or flow models needs a "
                "classifier trained on their noise levels, which this task does not do)"
            )
        super().__init__(diffusion, sampler)
        for name, value, least in [
            ("val_timesteps", val_timesteps, 1),
            ("val_images", val_images, 0),
            ("val_batch_size", val_batch_size, 1),
        ]:
            if value < least:
                raise ConfigError(f"task.{name}={value}: must be >= {least}")
        self.noised = noised
        self.val_timesteps = val_timesteps if noised else 1
        self.val_images = val_images
        self.val_batch_size = val_batch_size
        self.val_data = None

    def build_model(self, model_cfg: DictConfig, data) -> tuple[nn.Module, dict]:
        """The classifier with the data's channels and classes; also takes the data's held-out set."""
        target = OmegaConf.select(model_cfg, "_target_")
        if getattr(get_class(target), "role", None) != "classifier":
            raise ConfigError(
                f"task=classifier trains a noisy-image classifier, not model._target_={target}: use "
                "model=classifier_digits (or classifier_64/128/256/512), e.g. experiment=digits_classifier"
            )
        config = fit_to_data(model_cfg, data)
        self.val_data = held_out_data(data)
        if self.val_data is None:
            log.warning(
                "the data has no held-out set (data.val_dir for an image folder, data.split=train for the "
                "digits): the classifier is not validated"
            )
        return build(config), config

    def logits(self, net: nn.Module, x: Tensor, t: Tensor, noise: Tensor | None) -> Tensor:
        """
        :param x: an [N x C x H x W] Tensor of clean images; t: [N] timesteps of the process; noise: like x.
        :return: [N x K] logits of x_t (of x at t = 0 when not ``noised``).
        """
        if not self.noised:
            return net(x, torch.zeros_like(t))
        # model_output gives the classifier the timesteps a diffusion network sees: original indices.
        return self.diffusion.model_output(net, self.diffusion.q_sample(x, t, noise), t)

    def losses(self, net: nn.Module, x: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """
        :param x: an [N x C x H x W] Tensor of clean images in [-1, 1]; y: [N] labels; t: [N] timesteps;
            noise: standard normal noise like x.
        :return: dict of [N] Tensors: "loss" (cross-entropy), "acc@1" and "acc@5" (1 where the label is among
            the top 1 / top 5 logits, else 0).
        """
        return classification_terms(self.logits(net, x, t, noise), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, run: RunContext) -> dict[str, float]:
        """The held-out metrics: val/loss, val/acc@1, val/acc@5 and each one's _q0.._q3. Every rank classifies
        its share of the images (r, r + W, ...) and the means are reduced over all of them."""
        if self.val_data is None:
            return {}
        device = run.hw.device
        tracker = LossTracker(4, device, prefix="val/")
        count = min(len(self.val_data), self.val_images or len(self.val_data))
        mine = list(range(run.env.rank, count, run.env.world_size))
        T = self.diffusion.num_timesteps
        K = min(self.val_timesteps, T)  # a slice holds at least one timestep
        for b in range(0, len(mine), self.val_batch_size):
            indices = mine[b : b + self.val_batch_size]
            x, y = _stack([self.val_data[i] for i in indices])
            x, y = run.hw.prepare_batch(x), y.to(device)
            generators = [torch.Generator().manual_seed(derived_seed(run.seed, i)) for i in indices]
            for k in range(K):
                # One draw per slice [kT/K, (k+1)T/K) of the process's timesteps, and its noise, per image.
                t = torch.tensor(
                    [int(torch.randint(k * T // K, (k + 1) * T // K, (), generator=g)) for g in generators]
                )
                noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
                t, noise = t.to(device), noise.to(device)
                with run.hw.autocast():
                    terms = classification_terms(self.logits(model, x, t, noise), y)
                tracker.add(terms, self.quartile(t) if self.noised else torch.zeros_like(t))
        if not mine:  # a rank without images still takes part in the reduction, with the same terms
            empty = torch.zeros(0, device=device)
            tracker.add(dict.fromkeys(("loss", "acc@1", "acc@5"), empty), empty.long())
        metrics = tracker.compute()
        if run.env.is_main:
            log.info(
                "step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "_q" not in k)
            )
        return metrics


def classification_terms(logits: Tensor, y: Tensor) -> dict[str, Tensor]:
    """
    :param logits: an [N x K] Tensor; y: an [N] long Tensor of labels.
    :return: dict of [N] float32 Tensors: "loss" (cross-entropy), "acc@1", "acc@5" (top-min(5, K)).
    """
    logits = logits.float()
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (N, 5)
    hits = top == y[:, None]
    return {
        "loss": F.cross_entropy(logits, y, reduction="none"),
        "acc@1": hits[:, 0].float(),
        "acc@5": hits.any(dim=-1).float(),
    }


def held_out_data(data):
    """The data's held-out set (``data.held_out()``), or None when it has none or cannot say."""
    held_out = getattr(data, "held_out", None)
    return held_out() if held_out is not None else None


def _stack(items: list) -> tuple[Tensor, Tensor]:
    """(x [N x C x H x W], y [N]) from a list of dataset items (x, y)."""
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])
