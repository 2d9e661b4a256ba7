"""The noise levels of a model trained on T discrete DDPM timesteps, and the map between sigma and timestep.

Mirrors k-diffusion's ``DiscreteSchedule``; :class:`~diffusion.process.gaussian.ADMDenoiser` uses it for its
continuous face and the continuous samplers' ``model`` schedule (``get_sigmas``) comes from it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DiscreteSchedule", "append_zero"]


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """``[n]`` -> ``[n + 1]``: the schedule followed by a final 0 (the noise-free end point)."""
    return torch.cat([sigmas, sigmas.new_zeros([1])])


class DiscreteSchedule:
    """Noise levels of a model trained on T discrete DDPM timesteps, and maps between sigma and timestep t.

    ``sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`` is the VE noise level of timestep t
    (ascending in t). Computed in ``alphas_cumprod``'s floating dtype (a numpy array or list becomes float64).

    Args:
        alphas_cumprod: ``[T]`` cumulative products of the DDPM alphas, decreasing, in (0, 1).
        quantize: default for :meth:`sigma_to_t`: round to the nearest trained timestep.
    """

    def __init__(self, alphas_cumprod, quantize: bool = True):
        a = alphas_cumprod
        if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
            a = torch.as_tensor(np.asarray(a, dtype=np.float64))
        if a.ndim != 1 or len(a) < 2:
            raise ValueError(
                f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(a.shape)}"
            )
        if not bool(((a > 0) & (a < 1)).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1)")
        self.sigmas = ((1 - a) / a) ** 0.5
        if not bool((self.sigmas[1:] > self.sigmas[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.log_sigmas = self.sigmas.log()
        self.quantize = quantize

    @property
    def sigma_min(self) -> torch.Tensor:
        """Smallest trained noise level (timestep 0), a 0-d tensor."""
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        """Largest trained noise level (timestep T-1), a 0-d tensor."""
        return self.sigmas[-1]

    def get_sigmas(self, n: int | None = None) -> torch.Tensor:
        """Decreasing sigmas for ``n`` sampler steps: ``[n + 1]``, ending in 0.

        The ``n`` levels sit at timesteps evenly spaced from T-1 down to 0 (fractional ones interpolated in
        log sigma); ``n=None`` gives all T trained levels.
        """
        if n is None:
            return append_zero(self.sigmas.flip(0))
        t = torch.linspace(len(self.sigmas) - 1, 0, n, dtype=self.sigmas.dtype, device=self.sigmas.device)
        return append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool | None = None) -> torch.Tensor:
        """Timesteps for noise levels ``sigma`` (any shape; result has the same shape).

        With ``quantize`` (default: the constructor's) the nearest trained timestep in log sigma, as int64;
        otherwise t interpolated linearly in log sigma, clamped to [0, T-1].
        """
        quantize = self.quantize if quantize is None else quantize
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log()
        dists = log_sigma.reshape(1, -1) - log_sigmas[:, None]  # [T, numel]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        # low = the last trained level at or below sigma (0 below the range), kept below T-1 so high exists.
        low = (dists >= 0).sum(dim=0).sub(1).clamp(min=0, max=len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise levels for timesteps ``t`` in [0, T-1] (any shape), interpolating log sigma for fractional t.

        Computed in the schedule's dtype (k-diffusion casts t to float32 first).
        """
        t = torch.as_tensor(t)
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.to(log_sigmas.dtype)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
