"""The continuous-sigma samplers against k-diffusion's recorded numbers, plus behaviour checks."""

from __future__ import annotations

import math

import pytest
import torch
from k_reference import Replay, mixture_denoiser, reference, rel_err

from diffusion.sampling import k_samplers as ks
from diffusion.sampling.sigmas import get_sigmas_karras

TOL = 1e-6
CASES = reference()[1]["sampler_cases"]
CHURN = {"euler", "heun", "dpm_2"}


def _mixture():
    tensors, _ = reference()
    return {k: tensors[f"mixture/{k}"] for k in ("means", "stds", "weights")}


def _run_case(case: str):
    """Runs our sampler for a recorded case; returns (x, sigma_hats, denoiser calls, noise draws)."""
    tensors, _ = reference()
    spec = CASES[case]
    denoise = mixture_denoiser(_mixture())
    calls = [0]

    def model(x, sigma):
        calls[0] += 1
        assert sigma.shape == (x.shape[0],)
        return denoise(x, sigma)

    replay = Replay(tensors["sampler/noise"])
    options = dict(spec["options"])
    if ks.is_stochastic(spec["sampler"], **options) or spec["sampler"] in CHURN:
        options["noise_sampler"] = replay
    sigma_hats = []
    x = ks.SAMPLERS[spec["sampler"]](
        model,
        tensors["sampler/x_init"].clone(),
        tensors["sampler/sigmas"],
        callback=lambda info: sigma_hats.append(float(info["sigma_hat"])),
        disable=True,
        **options,
    )
    return x, torch.tensor(sigma_hats, dtype=torch.float64), calls[0], replay.used


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_k_diffusion(case):
    tensors, _ = reference()
    x, sigma_hats, calls, used = _run_case(case)
    assert x.dtype == torch.float64
    assert rel_err(x, tensors[f"sampler/{case}/x"]) <= TOL
    assert rel_err(sigma_hats, tensors[f"sampler/{case}/sigma_hat"]) <= TOL
    assert calls == CASES[case]["calls"]
    # Same number of noise draws as k-diffusion's run (randn_like or noise_sampler calls).
    assert used == CASES[case]["noise_used"]


def test_reference_cases_cover_every_sampler_and_options():
    samplers = {spec["sampler"] for spec in CASES.values()}
    assert samplers == set(ks.SAMPLERS)
    solver_types = {
        spec["options"].get("solver_type") for spec in CASES.values() if spec["sampler"] == "dpmpp_2m_sde"
    }
    assert {"midpoint", "heun"} <= solver_types
    assert any(spec["options"].get("s_churn", 0) > 0 for spec in CASES.values())
    assert any(spec["options"].get("eta", 1.0) not in (1.0,) for spec in CASES.values())


@pytest.mark.parametrize("name", sorted(ks.SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_network_evaluations_counts_calls(name, steps):
    calls = [0]

    def model(x, sigma):
        calls[0] += 1
        return torch.zeros_like(x)

    sigmas = get_sigmas_karras(steps, 0.1, 10.0).double()
    x = torch.randn(2, 3, dtype=torch.float64) * 10
    options = {"s_churn": 1.0} if name in CHURN else {}
    ks.SAMPLERS[name](model, x, sigmas, disable=True, **options)
    assert calls[0] == ks.network_evaluations(name, steps)


@pytest.mark.parametrize("name", ["heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "euler", "lms"])
def test_network_evaluations_without_final_zero(name):
    calls = [0]

    def model(x, sigma):
        calls[0] += 1
        return torch.zeros_like(x)

    sigmas = get_sigmas_karras(4, 0.1, 10.0).double()[:-1]  # 3 steps ending at sigma_min, not 0
    ks.SAMPLERS[name](model, torch.ones(1, 2, dtype=torch.float64), sigmas, disable=True)
    assert calls[0] == ks.network_evaluations(name, 3, final_zero=False)


def test_network_evaluations_known_values_and_errors():
    assert ks.network_evaluations("heun", 10) == 19
    assert ks.network_evaluations("dpmpp_2m", 10) == 10
    assert ks.network_evaluations("heun", 10, final_zero=False) == 20
    with pytest.raises(KeyError):
        ks.network_evaluations("ddim", 10)
    with pytest.raises(ValueError):
        ks.network_evaluations("euler", -1)


def test_stochastic_flags():
    assert ks.STOCHASTIC_SAMPLERS == {
        "euler_ancestral",
        "dpm_2_ancestral",
        "dpmpp_2s_ancestral",
        "dpmpp_2m_sde",
        "dpmpp_3m_sde",
    }
    assert not ks.is_stochastic("euler")
    assert ks.is_stochastic("euler", s_churn=0.5)
    assert not ks.is_stochastic("dpmpp_2m_sde", eta=0.0)
    assert not ks.is_stochastic("lms")
    with pytest.raises(KeyError):
        ks.is_stochastic("nope")


@pytest.mark.parametrize("name", sorted(ks.SAMPLERS))
def test_point_mass_data_is_recovered_exactly(name):
    """For data concentrated at mu, D(x, sigma) = mu and every sampler must land on mu, noise or not."""
    mu = torch.tensor([[1.5, -0.5, 2.0]], dtype=torch.float64).expand(3, 3)
    sigmas = get_sigmas_karras(6, 0.05, 20.0).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, generator=gen, dtype=torch.float64) * 20
    noise = lambda sigma, sigma_next: torch.randn(3, 3, generator=gen, dtype=torch.float64)  # noqa: E731
    options = {}
    if name in CHURN:
        options = {"s_churn": 1.0, "noise_sampler": noise}
    elif name in ks.STOCHASTIC_SAMPLERS:
        options = {"noise_sampler": noise}
    out = ks.SAMPLERS[name](lambda x, sigma: mu.clone(), x, sigmas, disable=True, **options)
    torch.testing.assert_close(out, mu, rtol=0, atol=1e-10)


def test_euler_single_step_to_zero_returns_denoised():
    mixture = {k: v for k, v in _mixture().items()}
    denoise = mixture_denoiser(mixture)
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4
    sigmas = torch.tensor([4.0, 0.0], dtype=torch.float64)
    out = ks.sample_euler(lambda x, s: denoise(x, s), x, sigmas, disable=True)
    expected = denoise(x, torch.full((5,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def _gaussian_ode_error(name: str, steps: int) -> float:
    """Error of sampler ``name`` against the closed-form probability-flow ODE of x0 ~ N(mu, s^2 I).

    For one Gaussian, x(sigma) - mu scales as sqrt(s^2 + sigma^2), so the exact end point is known.
    """
    mu, s, sigma_max, sigma_min = 0.7, 0.5, 10.0, 0.01
    x_t = torch.tensor([[3.0, -8.0], [12.0, 0.5]], dtype=torch.float64)

    def denoise(x, sigma):
        sig2 = sigma.reshape(-1, 1) ** 2
        return mu + s**2 / (s**2 + sig2) * (x - mu)

    # End at sigma_min (no step to 0) so that the ODE stays smooth up to the last step.
    sigmas = get_sigmas_karras(steps + 1, sigma_min, sigma_max).double()[:-1]
    options = {"eta": 0.0} if name in ks.STOCHASTIC_SAMPLERS else {}
    out = ks.SAMPLERS[name](denoise, x_t, sigmas, disable=True, **options)
    exact = mu + (x_t - mu) * math.sqrt(s**2 + sigma_min**2) / math.sqrt(s**2 + sigma_max**2)
    return float((out - exact).abs().max())


@pytest.mark.parametrize(
    ("name", "min_ratio", "max_error"),
    [
        ("euler", 1.8, 0.04),
        ("heun", 3.5, 5e-3),
        ("dpm_2", 3.5, 5e-3),
        ("lms", 5.0, 2e-3),
        ("dpmpp_2m", 3.5, 5e-3),
        ("dpmpp_2m_sde", 3.5, 5e-3),
    ],
)
def test_ode_samplers_converge(name, min_ratio, max_error):
    """Doubling the steps shrinks the error by about 2**order (1 for euler, 2 or more for the others)."""
    errors = [_gaussian_ode_error(name, steps) for steps in (8, 16, 32)]
    assert errors[-1] < max_error, errors
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert coarse / fine > min_ratio, errors


def test_dpmpp_3m_sde_ode_converges():
    # The third-order error is not monotone in the step count at these sizes (its sign flips), so only check
    # that
    # it ends small and far below the 8-step error.
    errors = [_gaussian_ode_error("dpmpp_3m_sde", steps) for steps in (8, 32)]
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 20, errors


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m():
    tensors, _ = reference()
    denoise = mixture_denoiser(_mixture())
    x, sigmas = tensors["sampler/x_init"], tensors["sampler/sigmas"]
    ode = ks.sample_dpmpp_2m(denoise, x, sigmas, disable=True)
    sde = ks.sample_dpmpp_2m_sde(denoise, x, sigmas, eta=0.0, solver_type="midpoint", disable=True)
    torch.testing.assert_close(sde, ode, rtol=1e-12, atol=1e-12)


def test_eta0_is_deterministic():
    def fail(sigma, sigma_next):
        raise AssertionError("noise drawn with eta=0")

    sigmas = get_sigmas_karras(5, 0.1, 10.0).double()
    x = torch.ones(2, 2, dtype=torch.float64) * 5
    for name in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        ks.SAMPLERS[name](lambda x, s: 0.5 * x, x, sigmas, disable=True, eta=0.0, noise_sampler=fail)
    # The ancestral samplers still draw (as k-diffusion does, keeping the RNG stream aligned) but scale it by
    # 0.
    for name in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"):
        outs = [
            ks.SAMPLERS[name](
                lambda x, s: 0.5 * x,
                x,
                sigmas,
                disable=True,
                eta=0.0,
                noise_sampler=lambda a, b, v=value: torch.full_like(x, v),
            )
            for value in (1.0, -3.0)
        ]
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_callback_and_extra_args():
    seen, extras = [], []

    def model(x, sigma, *, scale):
        extras.append(scale)
        return x * scale

    sigmas = get_sigmas_karras(3, 0.1, 10.0).double()
    ks.sample_heun(
        model,
        torch.ones(1, 2, dtype=torch.float64),
        sigmas,
        extra_args={"scale": 0.5},
        callback=seen.append,
        disable=True,
    )
    assert [info["i"] for info in seen] == [0, 1, 2]
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert float(seen[1]["sigma"]) == pytest.approx(float(sigmas[1]))
    assert extras == [0.5] * ks.network_evaluations("heun", 3)


@pytest.mark.parametrize("name", sorted(ks.SAMPLERS))
def test_unknown_option_raises_type_error(name):
    sigmas = get_sigmas_karras(2, 0.1, 1.0).double()
    with pytest.raises(TypeError):
        ks.SAMPLERS[name](
            lambda x, s: x, torch.ones(1, 1, dtype=torch.float64), sigmas, disable=True, bogus=1
        )


def test_bad_solver_type_raises():
    sigmas = get_sigmas_karras(2, 0.1, 1.0).double()
    with pytest.raises(ValueError, match="solver_type"):
        ks.sample_dpmpp_2m_sde(lambda x, s: x, torch.ones(1, 1), sigmas, solver_type="rk4", disable=True)


def test_lms_order_too_high_for_history_is_capped():
    """order larger than the number of steps works: early steps use the history they have."""
    sigmas = get_sigmas_karras(3, 0.1, 10.0).double()
    out_hi = ks.sample_lms(
        lambda x, s: 0.3 * x, torch.ones(1, 2, dtype=torch.float64), sigmas, order=10, disable=True
    )
    out_3 = ks.sample_lms(
        lambda x, s: 0.3 * x, torch.ones(1, 2, dtype=torch.float64), sigmas, order=3, disable=True
    )
    torch.testing.assert_close(out_hi, out_3)


def test_dpm_2_ancestral_adds_noise_when_sigma_down_hits_zero():
    """Deliberate difference from k-diffusion: with eta so large that sigma_down == 0, noise is added."""
    sigmas = torch.tensor([2.0, 1.9], dtype=torch.float64)
    draws = []

    def noise(sigma, sigma_next):
        draws.append((float(sigma), float(sigma_next)))
        return torch.ones(1, 2, dtype=torch.float64)

    out = ks.sample_dpm_2_ancestral(
        lambda x, s: torch.zeros_like(x),
        torch.ones(1, 2, dtype=torch.float64),
        sigmas,
        eta=10.0,
        noise_sampler=noise,
        disable=True,
    )
    # sigma_up is capped at sigma_next = 1.9, sigma_down = 0: x -> D = 0, then 1.9 * noise.
    assert draws == [(2.0, 1.9)]
    torch.testing.assert_close(out, torch.full((1, 2), 1.9, dtype=torch.float64))


def test_default_noise_is_torch_randn_like_stream():
    """Without a noise_sampler, churn samplers consume the global RNG like k-diffusion: a draw per step."""
    sigmas = get_sigmas_karras(4, 0.1, 10.0).double()
    x = torch.zeros(2, 3, dtype=torch.float64)
    torch.manual_seed(123)
    out_default = ks.sample_euler(lambda x, s: 0.5 * x, x, sigmas, s_churn=1.0, disable=True)
    torch.manual_seed(123)
    draws = [torch.randn_like(x) for _ in range(4)]
    replay = iter(draws)
    out_replay = ks.sample_euler(
        lambda x, s: 0.5 * x, x, sigmas, s_churn=1.0, noise_sampler=lambda a, b: next(replay), disable=True
    )
    torch.testing.assert_close(out_default, out_replay, rtol=0, atol=0)
    assert not torch.equal(out_default, torch.zeros_like(out_default))
