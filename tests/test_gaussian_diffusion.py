"""The Gaussian diffusion process against numbers produced by openai/guided-diffusion, plus identities the
reference does not cover (v-prediction, learned log-variance, plain KL, respacing) and bad input."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.process.gaussian import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    space_timesteps,
)

REF = torch.load(Path(__file__).parent / "fixtures" / "reference" / "diffusion.pt", weights_only=True)
TOL = 1e-5
X_START, T, NOISE = REF["x_start"], REF["t"], REF["noise"]
MEAN_TYPES = {"EPSILON": "epsilon", "START_X": "x0"}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def stand_in(learns_sigma: bool):
    """The fixture's analytic network (README): smooth in x, and sensitive to the timestep it is given."""

    def model(x, t, **_):
        tf = t.float().view(-1, *([1] * (x.dim() - 1)))
        eps = 0.3 * x + 0.1 * torch.sin(3 * x) + 0.001 * tf
        if learns_sigma:
            return torch.cat([eps, torch.tanh(x - 0.0005 * tf)], dim=1)
        return eps

    return model


def process_for(config: dict, **overrides) -> GaussianDiffusion:
    kwargs = dict(
        steps=config["steps"],
        noise_schedule=config["schedule"],
        model_mean_type=MEAN_TYPES[config["mean"]],
        model_var_type=config["var"].lower(),
        loss_type=config["loss"].lower(),
    )
    return GaussianDiffusion(**{**kwargs, **overrides})


# --- schedules and respacing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_named_schedules_match_reference(name):
    ours = get_named_beta_schedule(name, 1000)
    assert ours.dtype == np.float64
    np.testing.assert_array_equal(ours, REF["schedules"][name].numpy())


def test_linear_schedule_scales_its_endpoints_with_the_step_count():
    betas = get_named_beta_schedule("linear", 100)
    assert betas[0] == pytest.approx(0.001) and betas[-1] == pytest.approx(0.2)


@pytest.mark.parametrize("spec", list(REF["respacing"]))
def test_space_timesteps_matches_reference(spec):
    assert space_timesteps(1000, spec) == REF["respacing"][spec]


def test_space_timesteps_accepts_counts_as_int_or_sequence():
    assert space_timesteps(1000, [10, 15, 20]) == REF["respacing"]["10,15,20"]
    assert space_timesteps(1000, 50) == REF["respacing"]["50"]
    assert space_timesteps(10, "ddim5") == [0, 2, 4, 6, 8]
    assert space_timesteps(10, "3") == [0, 4, 9]


# --- every configuration in the fixture -------------------------------------------------------------------------


@pytest.fixture(params=sorted(REF["cases"]))
def case(request):
    case = REF["cases"][request.param]
    diffusion = process_for(case["config"])
    return case, diffusion, stand_in(diffusion.learns_sigma)


def test_q_sample_matches_reference(case):
    ref, diffusion, _ = case
    assert rel_err(diffusion.q_sample(X_START, T, NOISE), ref["q_sample"]) <= TOL


def test_q_posterior_matches_reference(case):
    ref, diffusion, _ = case
    ours = diffusion.q_posterior_mean_variance(X_START, ref["q_sample"], T)
    for value, key in zip(ours, ["mean", "variance", "log_variance"]):
        assert value.shape == X_START.shape
        assert rel_err(value, ref["q_posterior"][key]) <= TOL, key


def test_training_losses_match_reference(case):
    ref, diffusion, model = case
    terms = diffusion.training_losses(model, X_START, T, noise=NOISE)
    assert set(terms) == set(ref["training_losses"])
    for key, value in ref["training_losses"].items():
        assert terms[key].shape == (5,)
        assert rel_err(terms[key], value) <= TOL, key


def test_p_mean_variance_matches_reference(case):
    ref, diffusion, model = case
    out = diffusion.p_mean_variance(model, ref["q_sample"], T, clip_denoised=True)
    for key, value in ref["p_mean_variance"].items():
        assert rel_err(out[key], value) <= TOL, key


def test_p_sample_matches_reference(case):
    ref, diffusion, model = case
    out = diffusion.p_sample(model, ref["q_sample"], T, noise=ref["p_sample"]["noise"])
    assert rel_err(out["sample"], ref["p_sample"]["sample"]) <= TOL
    assert rel_err(out["pred_xstart"], ref["p_sample"]["pred_xstart"]) <= TOL


def test_p_sample_adds_no_noise_at_t0(case):
    ref, diffusion, model = case
    out = diffusion.p_mean_variance(model, ref["q_sample"], T)
    sample = diffusion.p_sample(model, ref["q_sample"], T, noise=NOISE)["sample"]
    torch.testing.assert_close(sample[0], out["mean"][0], rtol=0, atol=0)
    assert not torch.allclose(sample[1:], out["mean"][1:])


# --- respaced process (DDIM) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spaced():
    return GaussianDiffusion(1000, "cosine", "epsilon", "learned_range", timestep_respacing="ddim25")


def test_respaced_betas_and_timestep_map_match_reference(spaced):
    np.testing.assert_allclose(spaced.betas, REF["spaced"]["betas"].numpy(), rtol=1e-12, atol=0)
    assert spaced.timestep_map.tolist() == REF["spaced"]["timestep_map"].tolist()
    assert spaced.num_timesteps == 25 and spaced.original_num_steps == 1000


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_reference(spaced, eta):
    ref = REF["spaced"][f"ddim_step_eta{eta}"]
    x = REF["spaced"]["ddim_loop_eta0"]["x_T"]
    out = spaced.ddim_sample(stand_in(True), x, ref["t"], eta=eta, noise=ref["noise"])
    assert rel_err(out["sample"], ref["sample"]) <= TOL
    assert rel_err(out["pred_xstart"], ref["pred_xstart"]) <= TOL


def test_ddim_reverse_step_matches_reference(spaced):
    ref = REF["spaced"]["ddim_reverse_step"]
    x = REF["spaced"]["ddim_loop_eta0"]["x_T"]
    out = spaced.ddim_reverse_sample(stand_in(True), x, ref["t"])
    assert rel_err(out["sample"], ref["sample"]) <= TOL
    assert rel_err(out["pred_xstart"], ref["pred_xstart"]) <= TOL


def test_respacing_to_50_matches_reference():
    ref = REF["spaced"]["p_loop_50_linear"]
    diffusion = GaussianDiffusion(1000, "linear", "epsilon", "learned_range", timestep_respacing="50")
    assert diffusion.timestep_map.tolist() == ref["timestep_map"].tolist()
    np.testing.assert_allclose(diffusion.betas, ref["betas"].numpy(), rtol=1e-12, atol=0)
    kept = GaussianDiffusion(1000, "linear", "epsilon", "learned_range").respace_to(
        ref["timestep_map"].tolist()
    )
    assert kept.timestep_map.tolist() == ref["timestep_map"].tolist()
    np.testing.assert_allclose(kept.betas, ref["betas"].numpy(), rtol=1e-12, atol=0)


def test_calc_bpd_loop_matches_reference():
    ref = REF["bpd_100_linear"]
    diffusion = GaussianDiffusion(100, "linear", "epsilon", "learned_range")
    out = diffusion.calc_bpd_loop(stand_in(True), ref["x_start"], noises=ref["noises"])
    for key in ["total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"]:
        assert out[key].shape == ref[key].shape, key
        assert rel_err(out[key], ref[key]) <= TOL, key


def test_network_is_called_with_original_timesteps(spaced):
    seen = []

    def spy(x, t):
        seen.append(t.clone())
        return stand_in(True)(x, t)

    t = torch.tensor([0, 1, 24])
    spaced.p_mean_variance(spy, torch.zeros(3, 3, 8, 8), t)
    assert seen[0].dtype == torch.long and seen[0].tolist() == [0, 40, 960]
    assert spaced.original_timesteps(t).tolist() == [0, 40, 960]


def test_rescale_timesteps_gives_the_network_float_times_on_a_1000_scale():
    diffusion = GaussianDiffusion(
        100, "linear", "epsilon", "fixed_small", rescale_timesteps=True, timestep_respacing="10"
    )
    seen = []
    diffusion.model_output(lambda x, t: seen.append(t) or x, torch.zeros(2, 1, 4, 4), torch.tensor([1, 9]))
    assert seen[0].dtype == torch.float32
    assert seen[0].tolist() == pytest.approx([110.0, 990.0])


def test_model_kwargs_reach_the_network():
    diffusion = GaussianDiffusion(10, "cosine", "epsilon", "fixed_small")
    received = {}

    def model(x, t, y=None):
        received["y"] = y
        return torch.zeros_like(x)

    diffusion.training_losses(model, torch.zeros(2, 1, 4, 4), torch.tensor([0, 5]), model_kwargs={"y": 7})
    assert received["y"] == 7


def test_respaced_betas_keep_alphas_cumprod_of_the_kept_steps():
    base = GaussianDiffusion(1000, "cosine", "epsilon", "fixed_small")
    spaced = base.respace("10,15,20")
    kept = REF["respacing"]["10,15,20"]
    # The last cosine alpha_bar is ~1e-9, so the product of 45 ratios keeps ~1e-11 of relative round-off there.
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10)
    assert spaced.timestep_map.tolist() == kept


def test_respace_is_over_the_original_steps_with_the_same_settings(spaced):
    again = spaced.respace("ddim50")
    assert again.timestep_map.tolist() == REF["respacing"]["ddim50"]
    assert (again.model_mean_type, again.model_var_type, again.original_num_steps) == (
        "epsilon",
        "learned_range",
        1000,
    )
    full = spaced.respace(None)
    np.testing.assert_array_equal(full.betas, REF["schedules"]["cosine"].numpy())


def test_builds_from_hydra_config():
    cfg = OmegaConf.create(
        {
            "_target_": "diffusion.process.gaussian.GaussianDiffusion",
            "steps": 100,
            "noise_schedule": "cosine",
            "model_var_type": "fixed_large",
            "timestep_respacing": [5, 5],
        }
    )
    diffusion = instantiate(cfg)
    assert diffusion.timestep_map.tolist() == space_timesteps(100, [5, 5])
    assert diffusion.num_timesteps == 10 and not diffusion.learns_sigma


# --- configurations beyond the reference ------------------------------------------------------------------------


def test_v_parameterisation_round_trips():
    diffusion = GaussianDiffusion(1000, "cosine", "v", "fixed_small")
    x_t = diffusion.q_sample(X_START, T, NOISE)
    v = diffusion.v_from_xstart_eps(X_START, NOISE, T)
    pred_xstart, eps = diffusion.predict_xstart_eps(v, x_t, T)
    torch.testing.assert_close(pred_xstart, X_START, rtol=0, atol=2e-6)
    torch.testing.assert_close(eps, NOISE, rtol=0, atol=2e-6)


def test_v_training_loss_is_zero_for_the_true_v():
    diffusion = GaussianDiffusion(1000, "linear", "v", "learned_range")
    true_v = diffusion.v_from_xstart_eps(X_START, NOISE, T)
    oracle = lambda x, t: torch.cat([true_v, torch.zeros_like(x)], dim=1)  # noqa: E731
    terms = diffusion.training_losses(oracle, X_START, T, noise=NOISE)
    assert terms["mse"].abs().max().item() < 1e-12
    # The mean is exact, so the bound only measures the (untrained) variance: non-negative, positive at t=0.
    assert set(terms) == {"loss", "mse", "vb"} and (terms["vb"] >= 0).all() and terms["vb"][0] > 0


def test_v_process_equals_epsilon_process_for_the_equivalent_network():
    eps_process = GaussianDiffusion(1000, "cosine", "epsilon", "learned_range")
    v_process = GaussianDiffusion(1000, "cosine", "v", "learned_range")
    eps_model = stand_in(True)

    def v_model(x, t):
        out = eps_model(x, t)
        eps, var = out.chunk(2, dim=1)
        x0, _ = eps_process.predict_xstart_eps(out, x, t)
        return torch.cat([v_process.v_from_xstart_eps(x0, eps, t), var], dim=1)

    x_t = eps_process.q_sample(X_START, T, NOISE)
    ours = v_process.p_mean_variance(v_model, x_t, T)
    ref = eps_process.p_mean_variance(eps_model, x_t, T)
    for key in ["mean", "log_variance", "pred_xstart", "eps"]:
        assert rel_err(ours[key], ref[key]) <= TOL, key


def _log_variance_network(range_process: GaussianDiffusion):
    """A 'learned' network whose log-variance output equals what learned_range makes of the stand-in."""
    base = stand_in(True)

    def model(x, t):
        out = base(x, t)
        return torch.cat([out[:, :3], range_process.p_mean_variance(base, x, t)["log_variance"]], dim=1)

    return model


def test_learned_variance_reads_the_output_as_log_variance():
    learned = GaussianDiffusion(1000, "linear", "epsilon", "learned")
    x_t = learned.q_sample(X_START, T, NOISE)
    out = learned.p_mean_variance(stand_in(True), x_t, T)
    expected_log_var = torch.tanh(x_t - 0.0005 * T.float().view(-1, 1, 1, 1))
    torch.testing.assert_close(out["log_variance"], expected_log_var, rtol=0, atol=0)
    torch.testing.assert_close(out["variance"], expected_log_var.exp())


def test_learned_variance_matches_learned_range_given_the_same_log_variance():
    ref = REF["cases"]["rescaled_mse_learned"]
    learned = process_for(ref["config"], model_var_type="learned")
    model = _log_variance_network(process_for(ref["config"]))
    terms = learned.training_losses(model, X_START, T, noise=NOISE)
    for key, value in ref["training_losses"].items():
        assert rel_err(terms[key], value) <= TOL, key
    out = learned.p_mean_variance(model, ref["q_sample"], T)
    for key, value in ref["p_mean_variance"].items():
        assert rel_err(out[key], value) <= TOL, key


def test_plain_kl_is_the_rescaled_kl_over_T():
    ref = REF["cases"]["kl_learned"]
    kl = process_for(ref["config"], loss_type="kl")
    terms = kl.training_losses(stand_in(True), X_START, T, noise=NOISE)
    assert set(terms) == {"loss"}
    assert rel_err(terms["loss"] * 1000, ref["training_losses"]["loss"]) <= TOL


def test_plain_mse_leaves_the_bound_unscaled():
    ref = REF["cases"]["rescaled_mse_learned"]
    terms = process_for(ref["config"], loss_type="mse").training_losses(
        stand_in(True), X_START, T, noise=NOISE
    )
    # rescaled_mse scales vb by T/1000 = 1 at T=1000; on a 100-step process it must differ by exactly 10x.
    assert rel_err(terms["vb"], ref["training_losses"]["vb"]) <= TOL
    short = dict(steps=100, noise_schedule="linear", model_var_type="learned_range")
    t = torch.tensor([0, 1, 25, 60, 99])
    plain = GaussianDiffusion(**short, loss_type="mse").training_losses(
        stand_in(True), X_START, t, noise=NOISE
    )
    scaled = GaussianDiffusion(**short, loss_type="rescaled_mse").training_losses(
        stand_in(True), X_START, t, noise=NOISE
    )
    torch.testing.assert_close(scaled["vb"], plain["vb"] / 10)
    torch.testing.assert_close(scaled["loss"], scaled["mse"] + scaled["vb"])


def test_hybrid_loss_trains_the_mean_through_mse_only():
    diffusion = GaussianDiffusion(1000, "linear", "epsilon", "learned_range")
    mean_w = torch.tensor(0.3, requires_grad=True)
    var_w = torch.tensor(0.2, requires_grad=True)
    model = lambda x, t: torch.cat([mean_w * x, torch.tanh(var_w * x)], dim=1)  # noqa: E731
    terms = diffusion.training_losses(model, X_START, T, noise=NOISE)
    mean_grad_vb, var_grad_vb = _grads(terms["vb"].sum(), [mean_w, var_w])
    assert mean_grad_vb == 0 and var_grad_vb != 0
    mean_grad_mse, var_grad_mse = _grads(terms["mse"].sum(), [mean_w, var_w])
    assert mean_grad_mse != 0 and var_grad_mse == 0


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[float]:
    # A parameter the loss does not reach gets None, or an exact 0 when it only meets the graph in a cat.
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [0.0 if g is None else g.item() for g in grads]


def test_x0_process_predicts_its_output_and_clips():
    diffusion = GaussianDiffusion(1000, "cosine", "x0", "fixed_small")
    x_t = diffusion.q_sample(X_START, T, NOISE)
    wide = 3 * X_START
    raw, eps = diffusion.predict_xstart_eps(wide, x_t, T)
    torch.testing.assert_close(raw, wide, rtol=0, atol=0)
    torch.testing.assert_close(diffusion.q_sample(raw, T, eps), x_t, rtol=1e-5, atol=1e-5)
    clipped, _ = diffusion.predict_xstart_eps(wide, x_t, T, clip_denoised=True)
    assert clipped.abs().max() <= 1 and clipped.abs().max() == 1


def test_denoised_fn_is_applied_before_clipping():
    diffusion = GaussianDiffusion(1000, "cosine", "x0", "fixed_small")
    x_t = diffusion.q_sample(X_START, T, NOISE)
    pred, _ = diffusion.predict_xstart_eps(X_START, x_t, T, clip_denoised=True, denoised_fn=lambda x: x * 10)
    torch.testing.assert_close(pred, (X_START * 10).clamp(-1, 1))


def test_ddim_reverse_inverts_a_deterministic_step(spaced):
    """DDIM is invertible up to the model's change between neighbouring steps, which the stand-in keeps small."""
    x_t = spaced.q_sample(X_START[:4], torch.full((4,), 10), NOISE[:4])
    model = stand_in(True)
    up = spaced.ddim_reverse_sample(model, x_t, torch.full((4,), 10), clip_denoised=False)["sample"]
    back = spaced.ddim_sample(model, up, torch.full((4,), 11), clip_denoised=False)["sample"]
    assert rel_err(back, x_t) < 0.02


def test_normal_kl_and_decoder_likelihood_match_closed_forms():
    m1, lv1, m2, lv2 = torch.tensor(0.5), torch.tensor(-1.0), torch.tensor(-0.2), torch.tensor(0.3)
    s1, s2 = math.exp(0.5 * -1.0), math.exp(0.5 * 0.3)
    expected = math.log(s2 / s1) + (s1**2 + 0.7**2) / (2 * s2**2) - 0.5
    assert normal_kl(m1, lv1, m2, lv2).item() == pytest.approx(expected, rel=1e-6)
    # A narrow Gaussian centred on a bin puts almost all its mass in that bin; the edge bins own the tails.
    x = torch.tensor([-1.0, 0.0, 1.0])
    log_p = discretized_gaussian_log_likelihood(x, x, torch.full((3,), math.log(1e-4)))
    assert log_p.exp().tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    wide = discretized_gaussian_log_likelihood(x, torch.zeros(3), torch.zeros(3)).exp()
    assert wide[0].item() == pytest.approx(0.5 * (1 + math.erf((-1 + 1 / 255) / math.sqrt(2))), abs=1e-3)


def test_float64_inputs_stay_float64():
    ref = REF["cases"]["improved_cosine"]
    diffusion = process_for(ref["config"])
    terms = diffusion.training_losses(stand_in(True), X_START.double(), T, noise=NOISE.double())
    assert terms["loss"].dtype == torch.float64
    assert rel_err(terms["loss"].float(), ref["training_losses"]["loss"]) <= 1e-4


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise_schedule="quadratic"), "noise_schedule"),
        (dict(model_mean_type="previous_x"), "model_mean_type"),
        (dict(model_var_type="fixed"), "model_var_type"),
        (dict(loss_type="l1"), "loss_type"),
        (dict(steps=0), "num_steps"),
        (dict(steps=10), "betas outside"),
        (dict(timestep_respacing="ddim999"), "ddim999"),
        (dict(timestep_respacing="2000"), "cannot keep 2000"),
        (dict(timestep_respacing="ten"), "comma-separated integers"),
        (dict(timestep_respacing=[5, -1]), "non-negative"),
        (dict(timestep_respacing="1"), "at least 2"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(**kwargs)


def test_wrong_output_channels_raise_value_error():
    diffusion = GaussianDiffusion(100, "linear", "epsilon", "learned_range")
    with pytest.raises(ValueError, match=r"learned_range.*\[5 x 6"):
        diffusion.p_mean_variance(stand_in(False), X_START, T % 100)


def test_bad_sampling_arguments_raise_value_error(spaced):
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="eta"):
        spaced.ddim_sample(stand_in(True), x, torch.tensor([3]), eta=-0.1)
    with pytest.raises(ValueError, match="noises holds 3 entries"):
        spaced.calc_bpd_loop(stand_in(True), x, noises=torch.zeros(3, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="distinct indices in \\[0, 1000\\)"):
        spaced.respace_to([0, 5, 5])
    with pytest.raises(ValueError, match="keeps 1 step"):
        spaced.respace_to([7])
