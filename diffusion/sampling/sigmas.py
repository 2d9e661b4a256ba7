"""Noise-level schedules for the continuous-sigma samplers, and the map between sigmas and discrete timesteps.

The continuous schedules return ``n + 1`` decreasing sigmas ending in 0, as k-diffusion's ``get_sigmas_*`` do.
``DiscreteSchedule`` (defined in ``diffusion.process.discrete_schedule``, where ADM's denoiser uses it) mirrors
k-diffusion's class of that name for models trained on T discrete DDPM steps.
"""

from __future__ import annotations

import math

import torch

from diffusion.process.discrete_schedule import DiscreteSchedule, append_zero

__all__ = [
    "DiscreteSchedule",
    "append_zero",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "get_sigmas_polyexponential",
]


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu"
) -> torch.Tensor:
    """Karras et al. (2022): ``n`` sigmas evenly spaced in ``sigma**(1/rho)``, then 0; shape ``[n + 1]``.

    Computed in torch's default float dtype, like k-diffusion.
    """
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho).to(device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device="cpu") -> torch.Tensor:
    """``n`` sigmas evenly spaced in log sigma, ``sigma_max`` to ``sigma_min``, then 0; shape ``[n + 1]``."""
    _check(n, sigma_min, sigma_max)
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp())


def get_sigmas_polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device="cpu"
) -> torch.Tensor:
    """Log sigma following ``ramp**rho`` (ramp from 1 to 0) between the log end points, then 0; ``[n + 1]``.

    ``rho=1`` is the exponential schedule; larger ``rho`` spends more steps at low noise.
    """
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return append_zero(torch.exp(ramp * (log_max - log_min) + log_min))
