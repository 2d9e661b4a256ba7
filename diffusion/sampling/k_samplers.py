"""Samplers in continuous noise levels, interchangeable with k-diffusion's ``sample_*`` functions.

Every sampler integrates from ``sigmas[0]`` down to ``sigmas[-1]`` for a denoiser ``model(x, sigma,
**extra_args)`` in the variance-exploding convention ``x = x0 + sigma * eps``: ``x`` is a ``[N, ...]`` tensor,
``sigma`` a ``[N]`` tensor (one noise level per image) and the model returns the estimate of ``x0`` with
``x``'s shape.

All samplers share k-diffusion's signature ``sample_<name>(model, x, sigmas, extra_args=None, callback=None,
disable=None, **options)`` with the same options and defaults, so a caller may swap one library for the other.
``sigmas`` is a 1-D tensor of decreasing noise levels, normally ending in 0 (see
``diffusion.sampling.sigmas``).

Noise: the stochastic samplers draw noise through ``noise_sampler(sigma, sigma_next) -> Tensor`` (a standard
normal tensor shaped like ``x``). The platform always passes its own per-image noise sampler; without one the
samplers draw ``torch.randn_like(x)``, including dpmpp_2m_sde and dpmpp_3m_sde, where k-diffusion defaults to
a Brownian tree (which needs torchsde).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import trange

__all__ = [
    "SAMPLERS",
    "STOCHASTIC_SAMPLERS",
    "ancestral_step",
    "is_stochastic",
    "network_evaluations",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
]

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _expand(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshapes a scalar or ``[N]`` sigma so that it broadcasts against ``x`` of shape ``[N, ...]``."""
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def _derivative(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, ``(x - D(x, sigma)) / sigma``; all tensors ``[N, ...]``."""
    return (x - denoised) / _expand(sigma, x)


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """Splits a step from ``sigma_from`` to ``sigma_to`` (0-d tensors) into an ODE part and fresh noise.

    Returns ``(sigma_down, sigma_up)`` with ``sigma_down**2 + sigma_up**2 == sigma_to**2``: the sampler moves
    the ODE down to ``sigma_down`` and then adds noise of standard deviation ``sigma_up``. ``eta=1`` is
    DDPM-like ancestral sampling, ``eta=0`` is the deterministic ODE step (``sigma_up`` is then the float 0).
    """
    if not eta:
        return sigma_to, 0.0
    # The posterior variance of a DDPM step, scaled by eta, capped so that sigma_down stays real.
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _randn_sampler(x: torch.Tensor) -> NoiseSampler:
    """Default noise sampler: an independent ``torch.randn_like(x)`` draw per call (global torch RNG)."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def _churn_gamma(sigmas: torch.Tensor, i: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """Karras et al. (2022) Algorithm 2's gamma_i: how much to raise sigma before step ``i``."""
    if s_tmin <= sigmas[i] <= s_tmax:
        return min(s_churn / (len(sigmas) - 1), 2**0.5 - 1)
    return 0.0


def _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler):
    """Adds the churn noise of Karras et al. (2022) Algorithm 2 before step ``i``; returns ``(x, sigma_hat)``.

    The noise is drawn on every step, also when gamma is 0, because k-diffusion draws ``randn_like`` there
    unconditionally: so the default sampler consumes the global RNG exactly as k-diffusion does, and a
    replayed list of draws lines up with k-diffusion's.
    """
    gamma = _churn_gamma(sigmas, i, s_churn, s_tmin, s_tmax)
    sigma_hat = sigmas[i] * (gamma + 1)
    eps = noise_sampler(sigmas[i], sigma_hat) * s_noise
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    noise_sampler=None,
):
    """Euler steps of the probability-flow ODE with optional churn (Karras et al. 2022, Algorithm 2).

    Args:
        model: denoiser ``model(x [N, ...], sigma [N], **extra_args) -> [N, ...]``.
        x: ``[N, ...]`` start sample at noise level ``sigmas[0]``.
        sigmas: ``[steps + 1]`` decreasing noise levels.
        s_churn, s_tmin, s_tmax, s_noise: churn amount, the sigma range it applies to, and the noise scale.
        noise_sampler: ``(sigma, sigma_hat) -> [N, ...]`` standard normal draws for the churn, called once
            per step (an addition to k-diffusion, always using ``torch.randn_like(x)``, also the default).
    Returns:
        ``[N, ...]`` sample at noise level ``sigmas[-1]``.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _randn_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = _derivative(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """Ancestral Euler sampling: an ODE step down to ``sigma_down``, then noise up to ``sigma_next``.

    Args:
        model, x, sigmas: as in :func:`sample_euler` (``x`` is ``[N, ...]``, ``sigmas`` is ``[steps + 1]``).
        eta: amount of ancestral noise (0 gives plain Euler).
        s_noise: scale of the added noise.
        noise_sampler: ``(sigma, sigma_next) -> [N, ...]`` standard normal draws; default
            ``torch.randn_like(x)``.
    Returns:
        ``[N, ...]`` sample at ``sigmas[-1]``.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _randn_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + _derivative(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    noise_sampler=None,
):
    """Heun (trapezoidal) steps with optional churn (Karras et al. 2022, Algorithm 2).

    Two denoiser calls per step, one for the final step to sigma=0 (which is an Euler step, as the ODE's
    derivative is undefined there). Arguments and return value as in :func:`sample_euler`.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _randn_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = _derivative(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_pred = x + d * dt
            d_pred = _derivative(x_pred, sigmas[i + 1], model(x_pred, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_pred) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    noise_sampler=None,
):
    """Midpoint steps, midpoint at the geometric mean of the sigmas (DPM-Solver-2 style), with churn.

    Two denoiser calls per step, one for the final step to sigma=0 (an Euler step). Arguments and return value
    as in :func:`sample_euler`.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _randn_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = _derivative(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            x = _dpm_2_step(model, x, d, sigma_hat, sigmas[i + 1], s_in, extra_args)
    return x


def _dpm_2_step(model, x, d, sigma, sigma_next, s_in, extra_args):
    """One DPM-Solver-2 style step from ``sigma`` to ``sigma_next`` (> 0) given the derivative ``d`` at ``x``.

    The midpoint is taken in log sigma (geometric mean), where the ODE is closer to linear.
    """
    sigma_mid = (0.5 * (sigma.log() + sigma_next.log())).exp()
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = _derivative(x_mid, sigma_mid, model(x_mid, sigma_mid * s_in, **extra_args))
    return x + d_mid * (sigma_next - sigma)


@torch.no_grad()
def sample_dpm_2_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """Ancestral sampling with DPM-Solver-2 style midpoint steps.

    Arguments and return value as in :func:`sample_euler_ancestral`. Differs from k-diffusion in one corner
    case: when ``eta`` is so large that ``sigma_down`` is 0 before the last step, k-diffusion skips the noise
    while this function adds it (as euler_ancestral does), so the sample stays at noise level ``sigma_next``.
    For eta <= 1 ``sigma_down > 0`` whenever ``sigma_next > 0`` and both agree.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _randn_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d = _derivative(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm_2_step(model, x, d, sigmas[i], sigma_down, s_in, extra_args)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Adams-Bashforth weights for step ``i`` of LMS on the (non-uniform) grid ``sigmas``.

    Weight ``j`` is the integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial that is 1 at
    ``sigmas[i - j]`` and 0 at the other ``order - 1`` past nodes. The integrand is a polynomial of degree
    ``order - 1``, so Gauss-Legendre quadrature with ``order`` nodes is exact (k-diffusion uses scipy's
    adaptive quad, which agrees to rounding).
    """
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    nodes, weights = np.polynomial.legendre.leggauss(order)
    lo, hi = sigmas[i], sigmas[i + 1]
    tau = lo + (nodes + 1) * (hi - lo) / 2
    past = [sigmas[i - k] for k in range(order)]
    coeffs = []
    for j in range(order):
        basis = np.ones_like(tau)
        for k in range(order):
            if k != j:
                basis *= (tau - past[k]) / (past[j] - past[k])
        coeffs.append(float(np.sum(weights * basis) * (hi - lo) / 2))
    return coeffs


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams-Bashforth in sigma) on the probability-flow ODE, ``order`` past derivatives.

    One denoiser call per step; the first steps use a lower order until enough history exists. Arguments as in
    :func:`sample_euler`; returns the ``[N, ...]`` sample at ``sigmas[-1]``.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigmas_np = sigmas.detach().cpu().double().numpy()
    history = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        history.append(_derivative(x, sigmas[i], denoised))
        if len(history) > order:
            history.pop(0)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        coeffs = _lms_coefficients(sigmas_np, i, min(i + 1, order))
        # coeffs[j] goes with the derivative j steps back, the newest being history[-1].
        x = x + sum(c * d for c, d in zip(coeffs, reversed(history), strict=False))
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """Ancestral sampling with DPM-Solver++(2S) single-step second-order steps (Lu et al. 2022).

    Two denoiser calls per step, one for the step to sigma=0. Arguments and return value as in
    :func:`sample_euler_ancestral`.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _randn_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigma_down == 0:
            x = x + _derivative(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            # Work in lambda = -log(sigma); the data-prediction update is exact for a constant denoiser.
            t, t_next = -sigmas[i].log(), -sigma_down.log()
            h = t_next - t
            s = t + 0.5 * h
            sigma_s = (-s).exp()
            x_s = (sigma_s / sigmas[i]) * x - torch.expm1(-0.5 * h) * denoised
            denoised_s = model(x_s, sigma_s * s_in, **extra_args)
            x = (sigma_down / sigmas[i]) * x - torch.expm1(-h) * denoised_s
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M): second-order multistep in log sigma, one denoiser call per step (Lu et al. 2022).

    The first step and the step to sigma=0 are first order. Arguments as in :func:`sample_euler`; returns the
    ``[N, ...]`` sample at ``sigmas[-1]``.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            # The exponential-integrator update at sigma_next=0 reduces to the denoised estimate.
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            estimate = denoised
            if old_denoised is not None:
                h_last = sigmas[i - 1].log() - sigmas[i].log()
                r = h_last / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * estimate
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    solver_type="midpoint",
):
    """DPM-Solver++(2M) SDE: second-order multistep with ``eta``-scaled stochasticity (``eta=0`` is the ODE).

    Args:
        model, x, sigmas: as in :func:`sample_euler` (``x`` is ``[N, ...]``, ``sigmas`` is ``[steps + 1]``).
        eta, s_noise: amount of stochasticity and scale of the added noise.
        noise_sampler: ``(sigma, sigma_next) -> [N, ...]`` standard normal draws. Default:
            ``torch.randn_like(x)`` per call (k-diffusion defaults to a Brownian tree; the platform always
            passes its own sampler).
        solver_type: ``'midpoint'`` or ``'heun'``, the second-order correction's form.
    Returns:
        ``[N, ...]`` sample at ``sigmas[-1]``.
    """
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _randn_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    h_last = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            eta_h = eta * h
            # phi = 1 - exp(-(1 + eta) h): the weight of the denoised estimate in the first-order update.
            phi = -torch.expm1(-h - eta_h)
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + phi * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                noise_std = sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt()
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * noise_std * s_noise
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """DPM-Solver++(3M) SDE: third-order multistep with ``eta``-scaled stochasticity (``eta=0`` is the ODE).

    One denoiser call per step; the first two steps use lower orders. Arguments and return value as in
    :func:`sample_dpmpp_2m_sde` (default noise: ``torch.randn_like(x)``, not k-diffusion's Brownian tree).
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _randn_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None
    h_1, h_2 = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised
            phi_2 = torch.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                # Divided differences of the denoised history, rescaled to the current step size.
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                noise_std = sigmas[i + 1] * (-torch.expm1(-2 * h * eta)).sqrt()
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * noise_std * s_noise
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
}

# Samplers that add fresh noise at their default options and therefore take a ``noise_sampler``.
# euler, heun and dpm_2 only do so with s_churn > 0 (see is_stochastic).
STOCHASTIC_SAMPLERS: frozenset[str] = frozenset(
    {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}
)
_CHURN_SAMPLERS = frozenset({"euler", "heun", "dpm_2"})
# Samplers that call the denoiser twice per step except on a step to sigma=0.
_TWO_CALL_SAMPLERS = frozenset({"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral"})


def is_stochastic(name: str, **options) -> bool:
    """Whether sampler ``name`` with ``options`` draws noise (so wants the platform's ``noise_sampler``)."""
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
    if name in _CHURN_SAMPLERS:
        return options.get("s_churn", 0.0) > 0
    if name in STOCHASTIC_SAMPLERS:
        return bool(options.get("eta", 1.0))
    return False


def network_evaluations(name: str, steps: int, final_zero: bool = True) -> int:
    """Number of denoiser calls sampler ``name`` makes for ``steps = len(sigmas) - 1``.

    Assumes that only the last sigma may be 0 (``final_zero`` says whether it is, as for every schedule in
    ``diffusion.sampling.sigmas``) and, for the ancestral two-call samplers, eta <= 1 (so the step goes to a
    nonzero ``sigma_down`` whenever ``sigma_next > 0``).
    """
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if name in _TWO_CALL_SAMPLERS:
        # The step to sigma=0 is a single Euler step.
        return 2 * steps - 1 if (final_zero and steps > 0) else 2 * steps
    return steps
