"""EDM, Flow (SiT / SD3 densities) and Min-SNR weights: equality with the anchors' own numbers, and behaviour.

The reference numbers come from scripts/reference_formulations.py (see fixtures/formulations/reference.json).
Values are compared with |ours - ref| <= 1e-6 * max(1, |ref|): absolute for O(1) numbers, relative where the
reference itself is large (EDM's loss weight reaches 1/sigma^2 at small sigma).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_net import TinyNet

from diffusion.process.edm import EDM, UncertaintyWeight
from diffusion.process.flow import Flow, sample_flow_sde
from diffusion.process.weighting import min_snr_weights

FIXTURES = Path(__file__).parent / "fixtures" / "formulations"
REF = torch.load(FIXTURES / "reference.pt")
META = json.loads((FIXTURES / "reference.json").read_text())
TOL = 1e-6


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    ours, ref = ours.double().cpu(), ref.double()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = ((ours - ref).abs() / ref.abs().clamp(min=1)).max().item()
    assert err <= TOL, f"{what}: max scaled difference {err:.3g} > {TOL}"


def test_fixture_records_commits():
    assert set(META["commits"]) == {"NVlabs/edm", "willisma/SiT", "TiankaiHang/Min-SNR-Diffusion-Training"}
    assert all(len(c) == 40 for c in META["commits"].values())


# ---- EDM vs NVlabs/edm ---------------------------------------------------------------------------------------------


def test_edm_denoiser_matches_edmprecond():
    D = EDM(time_scale=1.0).denoiser(TinyNet())
    with torch.no_grad():
        assert_close(D(REF["edm.x"], REF["edm.sigma"]), REF["edm.denoised"], "EDMPrecond output")


def test_edm_loss_matches_edmloss():
    edm = EDM(time_scale=1.0)
    net = TinyNet()
    images, noise = REF["edm.loss.images"], REF["edm.loss.noise"]
    sigma = (REF["edm.loss.z"] * 1.2 - 1.2).exp()
    with torch.no_grad():
        out = edm.training_losses(net, images, sigma, noise)
        per_pixel = (
            edm.loss_weight(sigma)[:, None, None, None]
            * (edm.denoiser(net)(images + sigma[:, None, None, None] * noise, sigma) - images) ** 2
        )
    assert_close(per_pixel, REF["edm.loss.per_pixel"], "EDMLoss per pixel")
    assert_close(out["loss"], REF["edm.loss.per_pixel"].mean(dim=(1, 2, 3)), "EDMLoss mean")
    assert torch.allclose(out["loss"], out["weight"] * out["mse"])


def test_edm_zero_network_gives_c_skip_x():
    edm = EDM()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    D = edm.denoiser(lambda x, t, **kw: torch.zeros_like(x))
    expected = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(D(x, sigma), expected[:, None, None, None] * x, rtol=1e-12, atol=0)
    assert (D.sigma_min, D.sigma_max) == (0.002, 80.0)


def test_edm_network_time_and_extra_args():
    seen = {}

    def net(x, t, y=None):
        seen["t"], seen["y"] = t, y
        return torch.zeros_like(x)

    edm = EDM(time_scale=250.0)
    sigma = torch.tensor([math.e**4, 1.0])
    edm.denoiser(net)(torch.zeros(2, 1), sigma, y=torch.tensor([3, 1]))
    torch.testing.assert_close(seen["t"], torch.tensor([250.0, 0.0]))
    assert seen["y"].tolist() == [3, 1]


def test_edm_rejects_doubled_channels():
    with pytest.raises(ValueError, match="out_channels"):
        EDM().denoiser(lambda x, t: torch.cat([x, x], 1))(torch.zeros(2, 3, 2, 2), torch.ones(2))


def test_edm_uncertainty_loss_and_gradients():
    edm = EDM(uncertainty=True)
    assert len(edm.parameters()) == 2 and edm.modules()[0] is edm.uncertainty
    x0 = torch.randn(3, 3, 2, 2)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    noise = torch.randn_like(x0)
    net = TinyNet()
    out = edm.training_losses(net, x0, sigma, noise)
    # u starts at 0, so the loss starts equal to plain EDM's.
    torch.testing.assert_close(out["loss"], EDM().training_losses(net, x0, sigma, noise)["loss"])
    out["loss"].sum().backward()
    assert edm.uncertainty.linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        edm.uncertainty.linear.bias.fill_(0.7)
    out = edm.training_losses(net, x0, sigma, noise)
    torch.testing.assert_close(out["loss"], out["weight"] / math.exp(0.7) * out["mse"] + 0.7)


def test_uncertainty_optimum_is_log_of_weighted_error():
    # For a fixed weighted error e, lambda/exp(u) e + u is minimised at u = ln(e): train u alone and check.
    w = UncertaintyWeight(16)
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    c = torch.zeros(8)
    for _ in range(400):
        u = w(c)
        loss = (3.0 / u.exp() + u).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(w(c), torch.full((8,), math.log(3.0)), atol=1e-2, rtol=0)


# ---- Flow vs willisma/SiT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_flow_path_coefficients_and_conversions_match_sit(path):
    t, x, v = REF["sit.t"], REF["sit.x"], REF["sit.v"]
    flow = Flow(path=path, time_scale=1.0)
    for name, val in zip(("alpha", "d_alpha", "sigma", "d_sigma"), flow.coefficients(t)):
        assert_close(val, REF[f"sit.{path}.{name}"], f"{path} {name}")
    a, da, s, ds = flow.coefficients(t)
    assert_close(da / a * s**2 - s * ds, REF[f"sit.{path}.drift_var"], f"{path} drift variance")
    assert_close(flow.score(v, x, t), REF[f"sit.{path}.score_from_velocity"], f"{path} velocity->score")
    assert_close(flow.noise(v, x, t), REF[f"sit.{path}.noise_from_velocity"], f"{path} velocity->noise")


LOSS_CASES = [
    (p, pred, w)
    for p in ("linear", "gvp")
    for pred in ("velocity", "noise", "score")
    for w in (("none",) if pred == "velocity" else ("none", "velocity", "likelihood"))
]


@pytest.mark.parametrize("path,prediction,weight", LOSS_CASES)
def test_flow_training_losses_match_sit(path, prediction, weight):
    key = f"sit.loss.{path}.{prediction}.{weight}"
    flow = Flow(path=path, prediction=prediction, loss_weight=weight, time_scale=1.0)
    with torch.no_grad():
        out = flow.training_losses(
            TinyNet(),
            REF["sit.loss.x1"],
            REF[key + ".t"],
            REF["sit.loss.noise"],
            {"y": REF["sit.loss.labels"]},
        )
    assert_close(out["loss"], REF[key], key)
    # SiT's interval: the replayed uniform draws are squeezed into [train_eps, 1 - train_eps].
    eps = 0.0 if prediction == "velocity" else 1e-3
    assert_close(
        flow.train_eps + (1 - 2 * flow.train_eps) * REF["sit.loss.rand"].double(), REF[key + ".t"], "t"
    )
    assert flow.train_eps == eps


@pytest.mark.parametrize("path,prediction", [("linear", "velocity"), ("gvp", "noise")])
def test_flow_sde_matches_sit_sampler(path, prediction):
    flow = Flow(path=path, prediction=prediction, time_scale=1.0)
    init = REF["sit.sde.init"].to(REF[f"sit.sde.{path}.{prediction}"].dtype)
    with torch.no_grad():
        x = sample_flow_sde(
            flow,
            TinyNet(),
            init,
            steps=8,
            generator=torch.Generator().manual_seed(123),
            model_kwargs={"y": REF["sit.loss.labels"]},
        )
    assert_close(x, REF[f"sit.sde.{path}.{prediction}"], f"SDE {path} {prediction}")


# ---- densities vs diffusers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["logit_normal", "logit_normal_shifted", "mode"])
def test_density_matches_diffusers(case):
    kw = META["density_cases"][case]
    flow = Flow(density="mode" if case == "mode" else "logit_normal", **kw)
    raw = flow.raw_draws(4096, torch.Generator().manual_seed(META["density_seed"]))
    assert torch.equal(raw, REF[f"density.{case}.raw"]), "same generator must give diffusers' raw draws"
    assert_close(flow.u_from_draws(raw), REF[f"density.{case}.u"], case)
    # Velocity prediction, no shift: t is exactly the complement of diffusers' u (u read as noise fraction).
    assert_close(1 - flow.t_from_draws(raw), REF[f"density.{case}.u"], case + " -> t")


def test_shift_moves_training_towards_noise():
    g = torch.Generator().manual_seed(0)
    t1 = Flow(shift=1.0).sample_levels(20000, torch.Generator().manual_seed(0), "cpu")
    t3 = Flow(shift=3.0).sample_levels(20000, g, "cpu")
    assert t3.dtype == torch.float64
    # Same draws: t' = 1 - 3s/(1 + 2s) with s = 1 - t, pointwise, and always noisier (smaller t).
    s = 1 - t1
    torch.testing.assert_close(t3, 1 - 3 * s / (1 + 2 * s), rtol=0, atol=1e-12)
    assert (t3 <= t1 + 1e-12).all() and t3.mean() < t1.mean() - 0.1


# ---- Min-SNR vs TiankaiHang/Min-SNR-Diffusion-Training ------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine", "zsnr"])
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_min_snr_weights_match_reference(schedule, target):
    ac = REF[f"minsnr.{schedule}.alphas_cumprod"].numpy()
    w = min_snr_weights(ac, REF["minsnr.t"], target=target, gamma=5.0)
    assert_close(w, REF[f"minsnr.{schedule}.{target}"], f"min-snr {schedule} {target}")


def test_min_snr_weights_formula():
    ac = np.array([0.99, 0.5, 0.01])
    t = torch.tensor([0, 1, 2])
    snr = ac / (1 - ac)
    torch.testing.assert_close(min_snr_weights(ac, t, "x0", 5.0).double(), torch.tensor(np.minimum(snr, 5.0)))
    torch.testing.assert_close(min_snr_weights(ac, t, "eps").double(), torch.tensor(np.minimum(snr, 5) / snr))
    torch.testing.assert_close(
        min_snr_weights(ac, t, "v").double(), torch.tensor(np.minimum(snr, 5) / (snr + 1))
    )


# ---- quartiles, config errors ---------------------------------------------------------------------------------------

FORMULATIONS = {
    "edm": lambda: EDM(),
    "flow_uniform": lambda: Flow(),
    "flow_logit_normal": lambda: Flow(
        density="logit_normal", logit_mean=0.4, logit_std=0.8, prediction="noise"
    ),
    "flow_mode_shift": lambda: Flow(density="mode", mode_scale=1.29, shift=3.0),
}


@pytest.mark.parametrize("name", sorted(FORMULATIONS))
def test_quartiles_hold_a_quarter_each(name):
    f = FORMULATIONS[name]()
    levels = f.sample_levels(40000, torch.Generator().manual_seed(5), "cpu")
    q = f.quartile(levels)
    assert q.dtype == torch.long and q.min() >= 0 and q.max() <= 3
    frac = torch.bincount(q, minlength=4).double() / len(q)
    torch.testing.assert_close(frac, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01, rtol=0)
    # Quartile 0 is the least noisy: for EDM the smallest sigmas, for Flow the largest t.
    cleanest = (
        levels[q == 0].mean() < levels[q == 3].mean()
        if name == "edm"
        else levels[q == 0].mean() > levels[q == 3].mean()
    )
    assert cleanest


def test_sample_levels_reproducible():
    for make in FORMULATIONS.values():
        f = make()
        a = f.sample_levels(16, torch.Generator().manual_seed(3), "cpu")
        b = f.sample_levels(16, torch.Generator().manual_seed(3), "cpu")
        assert torch.equal(a, b) and a.shape == (16,)


@pytest.mark.parametrize(
    "cls,kwargs,key",
    [
        (EDM, {"sigma_data": -1}, "diffusion.sigma_data=-1"),
        (EDM, {"P_std": 0}, "diffusion.P_std"),
        (EDM, {"sigma_min": 1.0, "sigma_max": 0.5}, "diffusion.sigma_max"),
        (EDM, {"time_scale": "big"}, "diffusion.time_scale"),
        (EDM, {"uncertainty": "yes"}, "diffusion.uncertainty"),
        (Flow, {"path": "vp"}, "diffusion.path"),
        (Flow, {"prediction": "x0"}, "diffusion.prediction"),
        (Flow, {"density": "cosmap"}, "diffusion.density"),
        (Flow, {"logit_std": -1.0}, "diffusion.logit_std"),
        (Flow, {"mode_scale": 2.0}, "diffusion.mode_scale"),
        (Flow, {"shift": 0.0}, "diffusion.shift"),
        (Flow, {"loss_weight": "snr"}, "diffusion.loss_weight"),
        (Flow, {"train_eps": 0.6}, "diffusion.train_eps"),
    ],
)
def test_bad_config_raises_value_error_naming_key(cls, kwargs, key):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    msg = str(info.value)
    assert msg.startswith(key) and "\n" not in msg


def test_min_snr_bad_target():
    with pytest.raises(ValueError, match="min_snr_target"):
        min_snr_weights(np.array([0.5]), torch.tensor([0]), target="score")


# ---- flow denoiser and sampling on closed-form fields ---------------------------------------------------------------


def gaussian_velocity_net(flow: Flow, mu: float, s: float):
    """Exact network for data N(mu, s^2 I) (s = 0: a point mass at mu), in ``flow.prediction``'s parameterisation."""

    def net(xt, t_net, y=None):
        t = (t_net / flow.time_scale).to(xt.dtype)
        a, da, sg, dsg = (c.reshape(-1, *[1] * (xt.ndim - 1)) for c in flow.coefficients(t))
        var = a**2 * s**2 + sg**2
        x1 = mu + a * s**2 / var * (xt - a * mu)
        eps = sg / var * (xt - a * mu)
        if flow.prediction == "velocity":
            return da * x1 + dsg * eps
        return eps if flow.prediction == "noise" else -eps / sg

    return net


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
def test_flow_denoiser_recovers_x0_from_true_prediction(path, prediction):
    flow = Flow(path=path, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 60.0], dtype=torch.float64)

    def oracle(xt, t_net):
        t = t_net / flow.time_scale
        a, da, s, ds = (c[:, None, None, None] for c in flow.coefficients(t))
        torch.testing.assert_close(xt, a * (x1 + sigma[:, None, None, None] * eps))  # x_t = alpha_t * x_VE
        return {"velocity": da * x1 + ds * eps, "noise": eps, "score": -eps / s}[prediction]

    D = flow.denoiser(oracle)
    torch.testing.assert_close(D(x1 + sigma[:, None, None, None] * eps, sigma), x1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(flow.sigma_from_t(flow.t_from_sigma(sigma)), sigma)


def euler_ve(denoiser, x, sigmas):
    """k-diffusion's Euler ODE sampler: dx/dsigma = (x - D(x, sigma)) / sigma, last step to sigma = 0."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, s * torch.ones(x.shape[0], dtype=x.dtype))) / s
        x = x + d * (s_next - s)
    return x


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_euler_through_seam_lands_on_gaussian_data(path):
    flow = Flow(path=path)
    mu, s = 2.0, 0.5
    D = flow.denoiser(gaussian_velocity_net(flow, mu, s))
    x = D.sigma_max * torch.randn(4000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = euler_ve(D, x, karras_sigmas(100, D.sigma_min, D.sigma_max))
    # The probability-flow ODE of a Gaussian is a per-sample affine map: x(0) = mu + (x_T - mu) s / sqrt(s^2 + T^2).
    exact = mu + (x - mu) * s / math.sqrt(s**2 + D.sigma_max**2)
    # Euler's first-order error at 100 steps shrinks x - mu by ~3%; a wrong sigma <-> t or x0 map is far off.
    assert ((out - exact).abs() <= 0.05 * (exact - mu).abs() + 1e-3).all()
    assert abs(out.mean().item() - mu) < 0.05 and abs(out.std().item() - s) < 0.05


@pytest.mark.parametrize(
    "path,prediction", [("linear", "velocity"), ("gvp", "velocity"), ("linear", "noise")]
)
def test_flow_sde_lands_on_data(path, prediction):
    flow = Flow(path=path, prediction=prediction)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    out = sample_flow_sde(flow, gaussian_velocity_net(flow, 2.0, 0.5), x, steps=100, generator=g)
    assert abs(out.mean().item() - 2.0) < 0.05 and abs(out.std().item() - 0.5) < 0.05
    # Point mass: every sample collapses onto it.
    # Point mass: SiT's "mean" last step from t1 = 0.96 leaves x1 - 0.04 eps exactly; "tweedie" lands on it.
    net = gaussian_velocity_net(flow, -1.0, 0.0)
    point = sample_flow_sde(flow, net, x[:200], steps=100, generator=torch.Generator().manual_seed(3))
    assert (point + 1.0).abs().max() < 0.04 * 4.5 and (point + 1.0).abs().max() > 0.01
    point = sample_flow_sde(
        flow, net, x[:200], steps=100, last_step="tweedie", generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(point, torch.full_like(point, -1.0), atol=1e-6, rtol=0)
