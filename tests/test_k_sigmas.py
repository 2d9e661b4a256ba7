"""Noise schedules and the discrete timestep schedule against k-diffusion's recorded numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from k_reference import reference, rel_err

from diffusion.sampling.sigmas import (
    DiscreteSchedule,
    get_sigmas_exponential,
    get_sigmas_karras,
    get_sigmas_polyexponential,
)

TOL = 1e-6
SCHEDULES = reference()[1]["schedules"]


@pytest.fixture
def float64_default():
    # k-diffusion's schedules use torch's default dtype; the reference was recorded with float64 as default.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("case", SCHEDULES, ids=[c["tag"] for c in SCHEDULES])
def test_schedules_match_k_diffusion(case, float64_default):
    tensors, _ = reference()
    n, smin, smax, rho, tag = case["n"], case["sigma_min"], case["sigma_max"], case["rho"], case["tag"]
    got = {
        "karras": get_sigmas_karras(n, smin, smax, rho=rho),
        "exponential": get_sigmas_exponential(n, smin, smax),
        "polyexponential": get_sigmas_polyexponential(n, smin, smax, rho=rho),
    }
    for kind, sigmas in got.items():
        expected = tensors[f"schedule/{kind}/{tag}"]
        assert sigmas.shape == (n + 1,)
        assert sigmas.dtype == torch.float64
        assert rel_err(sigmas, expected) <= TOL, kind
        assert sigmas[-1] == 0
        assert sigmas[0] == pytest.approx(smax, rel=1e-12)
        assert sigmas[n - 1] == pytest.approx(smin if n > 1 else smax, rel=1e-12)


def test_schedule_shapes_and_properties():
    karras = get_sigmas_karras(10, 0.01, 50.0)
    assert bool((karras[:-1][1:] < karras[:-1][:-1]).all())
    exp = get_sigmas_exponential(5, 0.1, 10.0).double()
    np.testing.assert_allclose(np.diff(np.log(exp[:-1].numpy())), -math.log(100) / 4, rtol=1e-6)
    # polyexponential with rho=1 is the exponential schedule.
    torch.testing.assert_close(
        get_sigmas_polyexponential(5, 0.1, 10.0, rho=1.0), get_sigmas_exponential(5, 0.1, 10.0)
    )
    with pytest.raises(ValueError):
        get_sigmas_karras(0, 0.1, 1.0)
    with pytest.raises(ValueError):
        get_sigmas_exponential(3, 2.0, 1.0)


def _schedule(quantize=True):
    tensors, _ = reference()
    return DiscreteSchedule(tensors["discrete/alphas_cumprod"], quantize=quantize)


def test_discrete_schedule_sigmas():
    tensors, _ = reference()
    sched = _schedule()
    abar = tensors["discrete/alphas_cumprod"]
    torch.testing.assert_close(sched.sigmas, ((1 - abar) / abar).sqrt(), rtol=1e-15, atol=0)
    assert sched.sigmas.dtype == torch.float64
    assert float(sched.sigma_min) == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-12)
    assert sched.sigma_max == sched.sigmas[-1]
    # A numpy array works too and gives the same float64 sigmas.
    torch.testing.assert_close(DiscreteSchedule(abar.numpy()).sigmas, sched.sigmas, rtol=0, atol=0)


@pytest.mark.parametrize("n", ["4", "8", "13", "all"])
def test_discrete_get_sigmas_matches_k_diffusion(n):
    tensors, _ = reference()
    got = _schedule().get_sigmas(None if n == "all" else int(n))
    assert rel_err(got, tensors[f"discrete/get_sigmas/{n}"]) <= TOL
    assert got[-1] == 0


def test_discrete_sigma_to_t_matches_k_diffusion():
    tensors, _ = reference()
    sched = _schedule()
    sigmas = tensors["discrete/sigma_sets"].reshape(-1)
    quantized = sched.sigma_to_t(sigmas, quantize=True)
    assert quantized.dtype == torch.int64
    assert torch.equal(quantized, tensors["discrete/sigma_to_t/quantized"])
    assert torch.equal(sched.sigma_to_t(sigmas), quantized)  # the constructor's default
    interpolated = sched.sigma_to_t(sigmas, quantize=False)
    assert rel_err(interpolated, tensors["discrete/sigma_to_t/interpolated"]) <= TOL
    # Shape is preserved.
    assert sched.sigma_to_t(tensors["discrete/sigma_sets"], quantize=False).shape == (3, 4)


def test_discrete_t_to_sigma_matches_k_diffusion():
    tensors, _ = reference()
    got = _schedule().t_to_sigma(tensors["discrete/t_values"])
    assert rel_err(got, tensors["discrete/t_to_sigma"]) <= TOL


def test_t_to_sigma_and_sigma_to_t_are_inverse():
    sched = _schedule()
    t = torch.tensor([0.0, 3.5, 17.25, 640.0, 998.9], dtype=torch.float64)
    torch.testing.assert_close(
        sched.sigma_to_t(sched.t_to_sigma(t), quantize=False), t, rtol=1e-10, atol=1e-9
    )
    # Out-of-range sigmas clamp to the end timesteps.
    out = sched.sigma_to_t(torch.tensor([1e-6, 1e6], dtype=torch.float64), quantize=False)
    torch.testing.assert_close(out, torch.tensor([0.0, 999.0], dtype=torch.float64))


def test_discrete_schedule_rejects_bad_alphas():
    with pytest.raises(ValueError):
        DiscreteSchedule(torch.tensor([0.5, 0.9], dtype=torch.float64))  # increasing
    with pytest.raises(ValueError):
        DiscreteSchedule(torch.tensor([1.0, 0.5], dtype=torch.float64))
