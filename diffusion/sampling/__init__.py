"""Sampling: the solvers, the guidance wrappers and ``generate``.

The continuous-sigma samplers and schedules are importable from here under k-diffusion's names
(``sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``,
``get_sigmas_karras/exponential/polyexponential``); importing this package loads only torch and numpy, not the
networks or the config store.
"""

from diffusion.sampling.k_samplers import (
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from diffusion.sampling.sigmas import get_sigmas_exponential, get_sigmas_karras, get_sigmas_polyexponential

__all__ = [
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "get_sigmas_polyexponential",
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
