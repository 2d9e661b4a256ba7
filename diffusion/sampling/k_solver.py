"""``KSampler``: the continuous-sigma samplers (k_samplers.py) as a solver of the ``solver`` config group.

It has the discrete solvers' call signature, ``solver(denoiser, x_T, extra_args, noise, progress, callback)``,
and runs on the denoiser's continuous face ``D(x, sigma)``:

- the sigmas come from ``schedule``: ``karras`` (rho 7 unless set), ``exponential``, ``polyexponential`` (rho 1
  unless set) between ``sigma_min`` and ``sigma_max`` (default: the model's trained range), or ``model``: the
  model's own trained levels evenly spaced in its timesteps; each ends in sigma = 0.
- the start is k-diffusion's, ``x = x_T * sigmas[0]`` with x_T standard normal (the VE prior at sigma_max). ADM's
  VP prior would be ``x_T * sqrt(1 + sigma_max**2)``; at the trained sigma_max (157 for the linear 1000-step
  schedule) the two differ by 2e-5 relative, and keeping k-diffusion's start makes the samplers interchangeable.
- stochastic samplers draw their noise from the per-image generators (``noise.draw()``, see noise.py), so an
  image does not depend on the batch size or the ranks; without ``noise`` they refuse to start.
- x0 estimates are not clamped unless ``clip_denoised`` (k-diffusion never clamps) and learned-variance channels
  are ignored (the denoiser drops them); classifier guidance reaches them in the score form (the denoiser's
  continuous face).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from diffusion.errors import ConfigError
from diffusion.sampling import k_samplers
from diffusion.sampling.sigmas import get_sigmas_exponential, get_sigmas_karras, get_sigmas_polyexponential

SCHEDULES = ("karras", "exponential", "polyexponential", "model")
# The options a sampler function takes besides (model, x, sigmas, extra_args, callback, disable, noise_sampler).
_COMMON = {"model", "x", "sigmas", "extra_args", "callback", "disable", "noise_sampler"}
# Relative slack when comparing a requested range with the trained one (float32 configs of float64 levels).
_RANGE_SLACK = 1e-5


def sampler_options(sampler: str) -> dict[str, object]:
    """The options sampler ``sampler`` accepts, with k-diffusion's defaults."""
    params = inspect.signature(k_samplers.SAMPLERS[sampler]).parameters
    return {n: p.default for n, p in params.items() if n not in _COMMON}


class KSampler:
    """One of k-diffusion's samplers (``sampler``) on a continuous noise schedule.

    :param sampler: ``euler``, ``euler_ancestral``, ``heun``, ``dpm_2``, ``dpm_2_ancestral``, ``lms``,
        ``dpmpp_2s_ancestral``, ``dpmpp_2m``, ``dpmpp_2m_sde`` or ``dpmpp_3m_sde``.
    :param steps: number of sampler steps (sigmas, not counting the final 0); ``network_evaluations`` says how
        many denoiser calls they take (Heun, DPM-2 and DPM++ 2S two per step but the last).
    :param schedule: ``karras``, ``exponential``, ``polyexponential`` or ``model`` (see the module docstring).
    :param sigma_min: the smallest nonzero sigma; None: the model's smallest trained level.
    :param sigma_max: the largest sigma; None: the model's largest trained level.
    :param rho: the karras / polyexponential shape; None: 7 for karras, 1 for polyexponential.
    :param quantize: the denoiser evaluates the network at the nearest trained timestep (True) or at the
        timestep interpolated in log sigma (False); with True the schedule must lie in the trained range.
    :param eta: ancestral / SDE noise (the ancestral ones, dpmpp_2m_sde, dpmpp_3m_sde); None: 1.
    :param s_churn: EDM's stochasticity (euler, heun, dpm_2); None: 0.
    :param s_tmin: the lowest sigma that gets churn; None: 0.
    :param s_tmax: the highest sigma that gets churn; None: inf.
    :param s_noise: the scale of the added noise; None: 1.
    :param order: lms's order; None: 4.
    :param solver_type: dpmpp_2m_sde's second-order step, ``midpoint`` or ``heun``; None: midpoint.
    :param clip_denoised: clamp the denoiser's x0 estimates to [-1, 1], as ADM's own solvers do. Off by
        default, as in k-diffusion; pixel models trained briefly gain from it (docs/samplers.md), latents never
        get it (sample.py and the tasks unclip latent models' solvers).
    """

    classifier_form = "score"

    def __init__(
        self,
        sampler: str,
        steps: int,
        schedule: str = "karras",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        rho: float | None = None,
        quantize: bool = True,
        eta: float | None = None,
        s_churn: float | None = None,
        s_tmin: float | None = None,
        s_tmax: float | None = None,
        s_noise: float | None = None,
        order: int | None = None,
        solver_type: str | None = None,
        clip_denoised: bool = False,
    ) -> None:
        if sampler not in k_samplers.SAMPLERS:
            raise ConfigError(f"solver.sampler={sampler!r}: use one of {sorted(k_samplers.SAMPLERS)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"solver.steps={steps!r}: must be an integer >= 1")
        if schedule not in SCHEDULES:
            raise ConfigError(f"solver.schedule={schedule!r}: use one of {list(SCHEDULES)}")
        given = {
            "eta": eta, "s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise,
            "order": order, "solver_type": solver_type,
        }  # fmt: skip
        accepted = sampler_options(sampler)
        self.options = {k: v for k, v in given.items() if v is not None}
        for key in self.options:
            if key not in accepted:
                raise ConfigError(
                    f"solver.{key} is not an option of sampler {sampler}: it takes "
                    f"{', '.join(accepted) or 'none'} (leave solver.{key} null)"
                )
        if self.options.get("solver_type", "midpoint") not in ("midpoint", "heun"):
            raise ConfigError(f"solver.solver_type={solver_type!r}: use 'midpoint' or 'heun'")
        if self.options.get("order", 1) < 1:
            raise ConfigError(f"solver.order={order}: must be >= 1")
        if schedule == "model" and (sigma_min is not None or sigma_max is not None):
            raise ConfigError(
                "solver.schedule=model uses the model's trained levels: leave solver.sigma_min/sigma_max null"
            )
        if rho is not None and schedule not in ("karras", "polyexponential"):
            raise ConfigError(f"solver.rho shapes karras and polyexponential, not {schedule}: leave it null")
        for key, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            if value is not None and not value > 0:
                raise ConfigError(f"solver.{key}={value}: must be > 0")
        if sigma_min is not None and sigma_max is not None and sigma_min >= sigma_max:
            raise ConfigError(f"solver.sigma_min={sigma_min} >= solver.sigma_max={sigma_max}: need min < max")
        self.sampler = sampler
        self.steps = steps
        self.schedule = schedule
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho
        self.quantize = quantize
        self.clip_denoised = clip_denoised

    @property
    def name(self) -> str:
        return self.sampler

    @property
    def stochastic(self) -> bool:
        """Whether the sampler draws fresh noise with these options (and so needs ``noise``)."""
        return k_samplers.is_stochastic(self.sampler, **self.options)

    @property
    def network_evaluations(self) -> int:
        """Denoiser calls per image batch (each may be a batch of 2N with classifier-free guidance)."""
        return k_samplers.network_evaluations(self.sampler, self.steps)

    def describe(self) -> dict:
        """What the samples were made with: the solver's name, its options and its network evaluations."""
        options = {"steps": self.steps, "schedule": self.schedule, "quantize": self.quantize}
        options |= {"clip_denoised": True} if self.clip_denoised else {}
        options |= {k: v for k, v in (("sigma_min", self.sigma_min), ("sigma_max", self.sigma_max)) if v}
        options |= ({"rho": self.rho} if self.rho is not None else {}) | self.options
        return {"solver": self.sampler, "options": options, "network_evaluations": self.network_evaluations}

    # --- the schedule ---------------------------------------------------------------------------------------

    def _range(self, denoiser) -> tuple[float, float]:
        """(sigma_min, sigma_max) of the schedule on ``denoiser``; ConfigError when it cannot be used."""
        lo = self.sigma_min if self.sigma_min is not None else float(denoiser.sigma_min)
        hi = self.sigma_max if self.sigma_max is not None else float(denoiser.sigma_max)
        if lo >= hi:
            raise ConfigError(
                f"solver.sigma_min={lo:g} >= solver.sigma_max={hi:g} (the unset one is the model's): need min < max"
            )
        trained_lo, trained_hi = float(denoiser.sigma_min), float(denoiser.sigma_max)
        if self.quantize and (lo < trained_lo * (1 - _RANGE_SLACK) or hi > trained_hi * (1 + _RANGE_SLACK)):
            raise ConfigError(
                f"solver sigmas [{lo:g}, {hi:g}] leave the model's trained range [{trained_lo:g}, "
                f"{trained_hi:g}] with solver.quantize=true: narrow sigma_min/sigma_max or set quantize=false"
            )
        return lo, hi

    def sigmas(self, denoiser) -> Tensor:
        """The [steps + 1] decreasing float64 sigmas on ``denoiser``, ending in 0."""
        if self.schedule == "model":
            if not hasattr(denoiser, "get_sigmas"):
                raise ConfigError(
                    f"solver.schedule=model: {type(denoiser).__name__} has no trained levels; use karras"
                )
            return denoiser.get_sigmas(self.steps).to(torch.float64)
        lo, hi = self._range(denoiser)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # k-diffusion computes in the default dtype
        try:
            if self.schedule == "karras":
                return get_sigmas_karras(self.steps, lo, hi, rho=7.0 if self.rho is None else self.rho)
            if self.schedule == "exponential":
                return get_sigmas_exponential(self.steps, lo, hi)
            return get_sigmas_polyexponential(self.steps, lo, hi, rho=1.0 if self.rho is None else self.rho)
        finally:
            torch.set_default_dtype(previous)

    def check(self, process_or_denoiser) -> None:
        """Raise ConfigError now if the schedule cannot be used on the model (before any sampling work).

        :param process_or_denoiser: a denoiser (with ``sigma_min``/``sigma_max``) or the formulation the model
            was trained with (its ``denoiser(None)`` gives the trained levels).
        """
        self.sigmas(_as_denoiser(process_or_denoiser))

    # --- sampling -------------------------------------------------------------------------------------------

    def __call__(
        self,
        denoiser: Callable[..., Tensor],
        x_T: Tensor,
        extra_args: dict | None = None,
        noise=None,
        progress: bool = False,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """
        :param denoiser: ``D(x, sigma, **extra_args)`` with ``sigma_min``/``sigma_max`` (and ``get_sigmas`` for
            the model schedule), e.g. ``GaussianDiffusion.denoiser(net, quantize=self.quantize)``.
        :param x_T: an [N x C x H x W] Tensor of standard normal noise.
        :param noise: the per-image noise (``noise.draw()`` or ``noise(k)`` gives the next [N x C x H x W] draw);
            required when the sampler is stochastic.
        :param callback: called after every step as ``callback(k, x, denoised)``.
        :return: an [N x C x H x W] Tensor of samples.
        """
        if self.stochastic and noise is None:
            raise ConfigError(
                f"solver.sampler={self.sampler} draws fresh noise and no per-image noise was given, so the images "
                "would not be reproducible: pass noise= (generate does), or use a deterministic sampler or eta=0"
            )
        sigmas = self.sigmas(denoiser).to(device=x_T.device, dtype=x_T.dtype)
        options = dict(self.options)
        if (
            noise is not None
            and "noise_sampler" in inspect.signature(k_samplers.SAMPLERS[self.sampler]).parameters
        ):
            draws = [0]

            def noise_sampler(sigma, sigma_next):
                draws[0] += 1
                out = noise.draw() if hasattr(noise, "draw") else noise(draws[0] - 1)
                return out.to(device=x_T.device, dtype=x_T.dtype)

            options["noise_sampler"] = noise_sampler
        k_callback = None
        if callback is not None:

            def k_callback(info):
                callback(info["i"], info["x"], info["denoised"])

        x = x_T * sigmas[0]
        return k_samplers.SAMPLERS[self.sampler](
            denoiser,
            x,
            sigmas,
            extra_args=extra_args or {},
            callback=k_callback,
            disable=not progress,
            **options,
        )

    def __repr__(self) -> str:
        d = self.describe()
        opts = ", ".join(f"{k}={v!r}" for k, v in d["options"].items())
        return f"KSampler({self.sampler}, {opts}; {d['network_evaluations']} network evaluations)"


def _as_denoiser(obj):
    if hasattr(obj, "sigma_min") and hasattr(obj, "sigma_max") and callable(obj):
        return obj
    if hasattr(obj, "denoiser"):
        return obj.denoiser(None)
    raise ConfigError(
        f"{type(obj).__name__} has no continuous noise levels: a continuous sampler cannot run on it"
    )
