"""Helpers shared by the continuous-noise formulations: config validation and broadcasting.

Config errors are ConfigError (a ValueError) with a one-line message naming the key, e.g.
``"diffusion.sigma_data=-1: must be > 0"``; the platform's ConfigError is a ValueError subclass, so an integrator
may swap it in without changing callers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion.errors import ConfigError
from diffusion.errors import check_choice as _check_choice
from diffusion.process.denoiser import append_dims  # noqa: F401  (re-exported for edm.py and flow.py)

KEY_PREFIX = "diffusion."


def config_error(key: str, value: object, why: str) -> ValueError:
    """A ConfigError (a ValueError) whose one-line message names the config key, its value and the constraint."""
    return ConfigError(
        f"{KEY_PREFIX}{key}={value!r}: {why}"
        if isinstance(value, str)
        else f"{KEY_PREFIX}{key}={value}: {why}"
    )


def check_float(key: str, value: object, *, positive: bool = False, nonneg: bool = False) -> float:
    """``value`` as a finite float, or a ValueError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise config_error(key, value, "must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise config_error(key, value, "must be finite")
    if positive and not value > 0:
        raise config_error(key, value, "must be > 0")
    if nonneg and not value >= 0:
        raise config_error(key, value, "must be >= 0")
    return value


def check_choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError naming ``diffusion.<key>`` and the choices."""
    return _check_choice(f"{KEY_PREFIX}{key}", value, choices)


def per_example(sigma: Tensor | float, x: Tensor) -> Tensor:
    """A noise level given as a scalar, [1] or [N] tensor, as an [N] tensor in x's dtype and device."""
    sigma = torch.as_tensor(sigma, device=x.device).to(x.dtype if x.is_floating_point() else torch.float32)
    if sigma.ndim == 0 or sigma.numel() == 1:
        return sigma.reshape(1).expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dims: [N, ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def check_output_channels(out: Tensor, x: Tensor, name: str) -> None:
    """Refuse a network output whose shape is not x's (e.g. 2C channels from a learned-variance network).

    Silently dropping the extra channels would hide a misconfigured network that spends half its capacity on
    an output nothing trains, so this is an error rather than ignored.
    """
    if out.shape != x.shape:
        raise ValueError(
            f"{name}: network returned shape {tuple(out.shape)} for input {tuple(x.shape)}; this formulation has no "
            "learned variance, configure the network with out_channels equal to in_channels"
        )
