"""The denoiser seam: the one interface through which every sampler reaches a network.

A denoiser is k-diffusion's ``D(x, sigma, **extra_args)``: given x = x0 + sigma * eps at noise level sigma
(variance-exploding scaling, one sigma per image) and the conditioning (class labels ``y``, an upsampler's
``low_res``), it returns the estimate of x0. Every formulation provides one for its networks (ADM's process:
:class:`~diffusion.process.gaussian.ADMDenoiser`; EDM and flow matching likewise), and everything between a
sampler and the network is a wrapper of a denoiser or of the network (classifier-free guidance, classifier
guidance, autoguidance), applied in one place (:func:`diffusion.sampling.generate.generate`).

A formulation trained on discrete timesteps also offers its *discrete face*, :meth:`Denoiser.predict`: the full
prediction at one of its own timesteps, in its own scaling, with the arithmetic of its reference implementation,
so that the solvers written on that process (ADM's DDPM, DDIM, DPM-Solver++) keep their numbers bit for bit. At a
trained level the two faces give the same estimate (tests hold them to 1e-6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

# A classifier's guidance gradient: cond_fn(x, t) -> scale * d log p(y | x) / dx, [N x C x ...], where x and t are
# what the diffusion network itself is given (its input scaling and time values).
CondFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Prediction:
    """What a denoiser's discrete face predicts at (x_t, t).

    :param denoised: the x0 estimate, [N x C x ...] (clamped to the data range when the denoiser clips).
    :param eps: the noise estimate consistent with ``denoised`` at x_t, [N x C x ...].
    :param var_values: the network's learned-variance channels (ADM's ``learned``/``learned_range``), or None.
    :param grad: a classifier's guidance gradient that the step itself should apply (an ancestral step shifts
        its mean by variance * grad, Dhariwal & Nichol's Algorithm 1), or None when there is none or it is
        already folded into ``denoised`` and ``eps`` (score form, Algorithm 2).
    """

    denoised: Tensor
    eps: Tensor
    var_values: Tensor | None = None
    grad: Tensor | None = None

    def with_(self, **changes) -> Prediction:
        return replace(self, **changes)


class Denoiser:
    """Base class of the seam (see the module docstring).

    Subclasses implement :meth:`__call__`; those with a discrete face also implement :meth:`predict`,
    :meth:`respaced` and :meth:`network_timesteps`. ``sigma_min`` and ``sigma_max`` bound the noise levels the
    network was trained on (a schedule outside them is refused).
    """

    sigma_min: float
    sigma_max: float

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        """
        :param x: an [N x C x ...] Tensor x0 + sigma * eps.
        :param sigma: an [N] Tensor of noise levels (> 0).
        :return: the [N x C x ...] estimate of x0.
        """
        raise NotImplementedError

    def network_input(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(the input, the time values) the network is given for x at sigma: what a classifier trained alongside
        it must see too. The input is ``input_scale(sigma) * x``."""
        raise NotImplementedError

    def input_scale(self, sigma: Tensor) -> Tensor:
        """c_in [N]: the factor between x (variance-exploding scaling) and the network's input."""
        raise NotImplementedError

    # --- the discrete face ----------------------------------------------------------------------------------

    def predict(self, x: Tensor, t: Tensor, **extra_args) -> Prediction:
        """
        The prediction at the formulation's own timesteps.

        :param x: an [N x C x ...] Tensor x_t in the formulation's own scaling.
        :param t: a LongTensor [N] of its (respaced) timestep indices.
        """
        raise NotImplementedError(f"{type(self).__name__} has no discrete face: use a continuous sampler")

    def respaced(self, timesteps: list[int]) -> Denoiser:
        """The same denoiser on the process respaced to the given original timesteps (a solver's own)."""
        raise NotImplementedError(f"{type(self).__name__} has no discrete face: use a continuous sampler")

    def network_timesteps(self, t: Tensor) -> Tensor:
        """The time values the network is given at respaced indices ``t`` (what a classifier sees too)."""
        raise NotImplementedError(f"{type(self).__name__} has no discrete face: use a continuous sampler")

    def sigma_at(self, t: Tensor) -> Tensor:
        """The noise levels [N] of respaced indices ``t`` (float64)."""
        raise NotImplementedError(f"{type(self).__name__} has no discrete face: use a continuous sampler")

    def shift_by_score(self, prediction: Prediction, x: Tensor, t: Tensor, grad: Tensor) -> Prediction:
        """The prediction after the score correction ``grad`` (d log p / dx_t) at respaced indices ``t``."""
        raise NotImplementedError(f"{type(self).__name__} has no discrete face: use a continuous sampler")


class DenoiserWrapper(Denoiser):
    """A denoiser that changes another one's output (guidance): it keeps the inner one's range and passes the
    discrete face's helpers through."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner

    @property
    def sigma_min(self) -> float:
        return self.inner.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.inner.sigma_max

    def network_input(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return self.inner.network_input(x, sigma)

    def input_scale(self, sigma: Tensor) -> Tensor:
        return self.inner.input_scale(sigma)

    def __getattr__(self, name: str):
        # Everything else (the process, the trained levels) is the inner denoiser's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def network_timesteps(self, t: Tensor) -> Tensor:
        return self.inner.network_timesteps(t)

    def sigma_at(self, t: Tensor) -> Tensor:
        return self.inner.sigma_at(t)

    def shift_by_score(self, prediction: Prediction, x: Tensor, t: Tensor, grad: Tensor) -> Prediction:
        return self.inner.shift_by_score(prediction, x, t, grad)

    def respaced(self, timesteps: list[int]) -> Denoiser:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.inner = self.inner.respaced(timesteps)
        return clone


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """A [N] Tensor viewed as [N x 1 x ...] with ``ndim`` dimensions in all."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def sigma_tensor(sigma: float | Tensor, x: Tensor) -> Tensor:
    """``sigma`` as an [N] float Tensor on x's device (a float or a 0-dim Tensor is broadcast to the batch)."""
    s = torch.as_tensor(sigma, device=x.device, dtype=torch.float32 if not torch.is_tensor(sigma) else None)
    return s.expand(x.shape[0]) if s.dim() == 0 else s
