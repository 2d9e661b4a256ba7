"""ADM's denoiser (the continuous face of GaussianDiffusion(...).denoiser) vs k-diffusion's
DiscreteEpsDDPMDenoiser, OpenAIDenoiser and DiscreteVDDPMDenoiser on a small network."""

from __future__ import annotations

import pytest
import torch
from k_reference import reference, rel_err, tiny_net

from diffusion.process.gaussian import GaussianDiffusion
from diffusion.sampling.k_samplers import sample_euler

TOL = 1e-6
# The reference's schedule: DDPM's linear betas over 1000 steps, GaussianDiffusion's default.
MEAN_TYPE = {"eps": "epsilon", "v": "v", "openai": "epsilon"}


def _params(prefix):
    tensors, _ = reference()
    return {k: tensors[f"{prefix}/{k}"] for k in ("weight", "bias", "t_sin", "t_lin")}


def _build(kind, quantize, net=None):
    var_type = "learned_range" if kind == "openai" else "fixed_small"
    process = GaussianDiffusion(model_mean_type=MEAN_TYPE[kind], model_var_type=var_type)
    if net is None:
        net = tiny_net(_params("net_2c" if kind == "openai" else "net_c"))
    return process.denoiser(net, quantize=quantize)


def test_schedule_is_the_reference_one():
    tensors, _ = reference()
    torch.testing.assert_close(
        _build("eps", True).sigmas,
        ((1 - tensors["discrete/alphas_cumprod"]) / tensors["discrete/alphas_cumprod"]).sqrt(),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize("quantize", [True, False])
@pytest.mark.parametrize("kind", ["eps", "v", "openai"])
def test_wrappers_match_k_diffusion(kind, quantize):
    # OpenAIDenoiser casts alphas_cumprod to float32, ADM's denoiser keeps float64: within the tolerance.
    tensors, _ = reference()
    wrapper = _build(kind, quantize)
    x = tensors["discrete/x"]
    got = torch.stack([wrapper(x, sigma) for sigma in tensors["discrete/sigma_sets"]])
    assert got.dtype == torch.float64
    assert rel_err(got, tensors[f"wrapper/{kind}/quantize_{quantize}"]) <= TOL


def test_network_inputs_and_timesteps():
    seen = {}

    def net(x, t):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    wrapper = _build("eps", True, net)
    x = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    sigma = wrapper.sigmas[[10, 700]]
    out = wrapper(x, sigma)
    assert seen["t"].tolist() == [10, 700]
    torch.testing.assert_close(seen["x"][:, 0, 0, 0], 1 / (sigma**2 + 1).sqrt())
    torch.testing.assert_close(out, x)  # eps = 0 -> denoised = x
    # Interpolated: a sigma between two trained levels gives the fractional timestep.
    _build("eps", False, net)(x, wrapper.schedule.t_to_sigma(torch.tensor([2.5, 9.0])))
    torch.testing.assert_close(seen["t"], torch.tensor([2.5, 9.0], dtype=torch.float64))
    # A respaced process (every 10th step): t is the respaced index mapped to the original step.
    process = GaussianDiffusion(model_var_type="fixed_small", timestep_respacing="100")
    respaced = process.denoiser(net, quantize=True)
    assert len(respaced.sigmas) == 100
    respaced(x, respaced.sigmas[[3, 99]])
    assert seen["t"].tolist() == [process.timestep_map[3], process.timestep_map[99]]


def test_predictions_recover_x0_for_a_perfect_network():
    """A network that outputs the exact eps / v / x0 for known (x0, eps) makes every variant return x0."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    sigmas = _build("eps", True).sigmas
    sigma = sigmas[[0, 400, 999]]
    s = sigma[:, None, None, None]
    x = x0 + s * eps
    a = 1 / (1 + s**2)  # abar of that level
    targets = {"epsilon": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * x0, "x0": x0}
    for mean_type, target in targets.items():
        process = GaussianDiffusion(model_mean_type=mean_type, model_var_type="fixed_small")
        wrapper = process.denoiser(lambda x, t, target=target: target)
        torch.testing.assert_close(wrapper(x, sigma), x0, rtol=1e-10, atol=1e-10)
    # learned variance: the extra channels are dropped; a wrong channel count is refused.
    process = GaussianDiffusion(model_var_type="learned_range")
    with pytest.raises(ValueError, match="model output has shape"):
        process.denoiser(lambda x, t: torch.cat([eps, 100 + eps]))(x, sigma)
    wrapper = process.denoiser(lambda x, t: torch.cat([eps, 100 + eps], dim=1))
    torch.testing.assert_close(wrapper(x, sigma), x0, rtol=1e-10, atol=1e-10)


def test_wrapper_exposes_schedule_and_samples():
    wrapper = _build("eps", quantize=False)
    sigmas = wrapper.get_sigmas(6)
    assert sigmas.shape == (7,) and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(wrapper.sigma_max) and sigmas[-2] == pytest.approx(wrapper.sigma_min)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * float(
        sigmas[0]
    )
    out = sample_euler(wrapper, x, sigmas, disable=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
