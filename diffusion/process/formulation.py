"""What every training formulation offers the engine: the seam between the training task and ADM's process, EDM
or flow matching.

A formulation (the ``diffusion`` config group) is one object that knows how to

- draw each training example's noise level (:meth:`Formulation.level_sampler`: ADM's integer timesteps from the
  ``sampler`` group, EDM's log-normal sigma, flow matching's time density);
- turn a network's output into per-example loss terms (:meth:`training_losses`, "loss" among them);
- say which quarter of its level density an example fell in (:meth:`quartile`, for the loss per quartile that the
  engine logs: ADM's quartiles of [0, T), a continuous formulation's four equal-probability bins);
- wrap a network as the sampling seam (:meth:`denoiser`, diffusion/process/denoiser.py).

It may own trainable state besides the network (EDM2's learned loss weighting): :meth:`modules` lists it, and the
engine optimises and checkpoints it with the network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.process.denoiser import Denoiser


class Formulation:
    """The interface; see the module docstring. ``learns_sigma``: the network outputs variance channels."""

    name = "formulation"
    learns_sigma = False
    # Whether its networks have a discrete face (ADM's solvers DDPM, DDIM, DPM-Solver++ need one).
    discrete = False
    # Whether a network with learned-variance channels it does not train may be sampled (the extra ones dropped).
    accepts_variance_channels = False

    def level_sampler(self, configured: Callable[[int], Any] | None) -> Any:
        """The sampler of training levels; ``configured(num_timesteps)`` builds the ``sampler`` group's, which
        only a discrete-time formulation uses."""
        return DensitySampler(self)

    def sample_levels(self, n: int, generator: torch.Generator, device=None) -> Tensor:
        raise NotImplementedError

    def training_losses(
        self, net, x_start: Tensor, t: Tensor, model_kwargs=None, noise=None
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def quartile(self, levels: Tensor) -> Tensor:
        raise NotImplementedError

    def denoiser(self, net, clip_denoised: bool = False, quantize: bool = True) -> Denoiser:
        raise NotImplementedError

    def modules(self) -> list[nn.Module]:
        """Trainable modules owned by the formulation (none by default)."""
        return []

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]


class DensitySampler:
    """A continuous formulation's training levels, in the engine's sampler interface (``sample``,
    ``update_with_losses``, ``state_dict``): draws depend only on the generator the engine keys by (seed, step).

    The formulation draws on the device of the engine's generator (the training device).
    """

    def __init__(self, formulation: Formulation) -> None:
        self.formulation = formulation

    def sample(
        self, batch_size: int, device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(levels [N] float64, importance weights [N], all 1) on ``device``, drawn with the engine's generator on
        its own device, so a GPU step waits for no host round trip."""
        levels = self.formulation.sample_levels(batch_size, generator or torch.default_generator, device)
        return levels, torch.ones(batch_size, device=device)

    def update_with_losses(self, t: Tensor, losses: Tensor) -> None:
        """Nothing adapts: the density is the formulation's."""

    def state_dict(self) -> dict[str, Any]:
        return {"density": type(self.formulation).__name__}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""
