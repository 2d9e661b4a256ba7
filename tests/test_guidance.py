"""Classifier guidance against guided_sampling.pt: a closed-form toy classifier steering the toy network of
diffusion.pt through the ClassifierGuidance wrapper of its denoiser, in the mean form (guided-diffusion's
condition_mean) and the score form (its condition_score), single steps and whole chains."""

import math
from pathlib import Path

import pytest
import torch
from test_gaussian_diffusion import rel_err, stand_in
from torch import nn

from diffusion.process.gaussian import GaussianDiffusion
from diffusion.sampling.guidance import ClassifierGuidance, classifier_cond_fn

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
REF = torch.load(FIXTURES / "guided_sampling.pt", weights_only=True)
TOL = 1e-5


class ToyClassifier(nn.Module):
    """logits[n, k] = sum_c W[k, c] * mean_hw tanh(x[n, c]) + 0.01 * t[n] * b[k], as the fixture defines it."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.W, self.b = nn.Parameter(W.clone()), nn.Parameter(b.clone())
        self.num_classes = W.shape[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        features = torch.tanh(x).mean(dim=(2, 3))  # (N, C)
        return features @ self.W.T + 0.01 * t.float()[:, None] * self.b


# The analytic stand-in network of diffusion.pt, with its learned-range variance head; it ignores y.
toy_model = stand_in(learns_sigma=True)


def make_process(respacing=None) -> GaussianDiffusion:
    config = REF["config"]
    assert (config["mean"], config["var"], config["rescale_timesteps"]) == ("EPSILON", "LEARNED_RANGE", False)
    return GaussianDiffusion(
        steps=config["steps"],
        noise_schedule=config["schedule"],
        model_mean_type="epsilon",
        model_var_type="learned_range",
        timestep_respacing=respacing,
    )


def steered(process: GaussianDiffusion, cond_fn, form: str, clip: bool = True) -> ClassifierGuidance:
    """The toy network's denoiser on ``process``, guided by ``cond_fn`` in the given form."""
    return ClassifierGuidance(process.denoiser(toy_model, clip_denoised=clip), cond_fn, form)


@pytest.fixture
def classifier():
    return ToyClassifier(REF["W"], REF["b"])


@pytest.fixture
def cond_fn(classifier):
    return classifier_cond_fn(classifier, REF["y"], scale=REF["classifier_scale"])


def closed_form_cond_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The README's formula for the toy's scaled gradient, written out (a check on the autograd path)."""
    W, b, y = REF["W"], REF["b"], REF["y"]
    th = torch.tanh(x)
    p = torch.softmax(th.mean(dim=(2, 3)) @ W.T + 0.01 * t.float()[:, None] * b, dim=-1)  # (N, K)
    direction = W[y] - p @ W  # (N, C)
    return REF["classifier_scale"] * direction[:, :, None, None] * (1 - th**2) / (x.shape[2] * x.shape[3])


def test_process_is_the_fixtures():
    assert rel_err(torch.as_tensor(make_process().betas), REF["betas"]) <= 1e-12  # float64 rounding only


def test_toy_classifier_logits(classifier):
    assert rel_err(classifier(REF["x_t"], REF["t"]), REF["logits"]) <= TOL


def test_cond_fn_matches_reference_and_closed_form(cond_fn):
    with torch.no_grad():
        grad = cond_fn(REF["x_t"], REF["t"])
    assert rel_err(grad, REF["cond_fn"]) <= TOL
    assert rel_err(closed_form_cond_fn(REF["x_t"], REF["t"]), REF["cond_fn"]) <= TOL


def test_cond_fn_is_float32_under_autocast_and_leaves_the_classifier_alone(classifier, cond_fn):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        grad = cond_fn(REF["x_t"].bfloat16(), REF["t"])
    assert grad.dtype == torch.float32
    # Only the input's rounding to bfloat16 differs from the float32 reference.
    assert rel_err(grad, REF["cond_fn"]) < 1e-2
    assert classifier.W.grad is None and classifier.b.grad is None


def test_cond_fn_rejects_bad_labels(classifier):
    with pytest.raises(ValueError, match="out of range"):
        classifier_cond_fn(classifier, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"\[N\]"):
        classifier_cond_fn(classifier, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="3 images for 2 labels"):
        classifier_cond_fn(classifier, torch.tensor([0, 1]))(REF["x_t"], REF["t"])


def test_p_mean_variance():
    with torch.no_grad():
        out = make_process().p_mean_variance(toy_model, REF["x_t"], REF["t"], clip_denoised=True)
    for key, ref in REF["p_mean_variance"].items():
        assert rel_err(out[key], ref) <= TOL, key


def test_condition_mean(cond_fn):
    process = make_process()
    with torch.no_grad():
        out = process.p_mean_variance(toy_model, REF["x_t"], REF["t"])
        pred = steered(process, cond_fn, "mean").predict(REF["x_t"], REF["t"])
        guided = process.p_mean_variance_from_prediction(pred, REF["x_t"], REF["t"])
    assert rel_err(guided["mean"], REF["condition_mean"]) <= TOL
    assert rel_err(guided["mean"], out["mean"]) > 1e-3  # guidance moved it well beyond the tolerance
    assert torch.equal(guided["pred_xstart"], out["pred_xstart"]) and torch.equal(
        guided["variance"], out["variance"]
    )


def test_condition_score(cond_fn):
    process = make_process()
    with torch.no_grad():
        pred = steered(process, cond_fn, "score").predict(REF["x_t"], REF["t"])
        guided = process.p_mean_variance_from_prediction(pred, REF["x_t"], REF["t"])
    assert rel_err(guided["mean"], REF["condition_score"]["mean"]) <= TOL
    assert rel_err(guided["pred_xstart"], REF["condition_score"]["pred_xstart"]) <= TOL
    # eps is the one that takes the guided x_0 to x_t.
    assert rel_err(process.q_sample(guided["pred_xstart"], REF["t"], guided["eps"]), REF["x_t"]) <= TOL


def test_guided_ancestral_step(cond_fn):
    ref = REF["p_sample"]
    with torch.no_grad():
        process = make_process()
        pred = steered(process, cond_fn, "mean").predict(REF["x_t"], REF["t"])
        sample = process.ancestral_step(pred, REF["x_t"], REF["t"], ref["noise"])
    assert rel_err(sample, ref["sample"]) <= TOL
    assert rel_err(pred.denoised, ref["pred_xstart"]) <= TOL


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_guided_ddim_step(cond_fn, eta):
    ref = REF[f"ddim_step_eta{eta}"]
    with torch.no_grad():
        process = make_process()
        pred = steered(process, cond_fn, "score").predict(REF["x_t"], REF["t"])
        sample = process.ddim_step(pred, REF["x_t"], REF["t"], eta, ref["noise"])
    assert rel_err(sample, ref["sample"]) <= TOL
    assert rel_err(pred.denoised, ref["pred_xstart"]) <= TOL


@pytest.mark.parametrize("solver", ["ancestral", "ddim"])
def test_zero_scale_guidance_is_the_unguided_step(classifier, solver):
    process, x, t, noise = make_process(), REF["x_t"], REF["t"], REF["p_sample"]["noise"]
    off = classifier_cond_fn(classifier, REF["y"], scale=0.0)
    with torch.no_grad():
        if solver == "ancestral":
            pred = steered(process, off, "mean").predict(x, t)
            guided = {"sample": process.ancestral_step(pred, x, t, noise), "pred_xstart": pred.denoised}
            plain = process.p_sample(toy_model, x, t, noise=noise)
        else:
            pred = steered(process, off, "score").predict(x, t)
            guided = {"sample": process.ddim_step(pred, x, t, 0.5, noise), "pred_xstart": pred.denoised}
            plain = process.ddim_sample(toy_model, x, t, eta=0.5, noise=noise)
    # Only float32 rounding differs (the guided DDIM step goes x_0 -> eps -> x_0 once more).
    assert rel_err(guided["sample"], plain["sample"]) <= TOL
    assert rel_err(guided["pred_xstart"], plain["pred_xstart"]) <= TOL


def dpm_solver_first_order_step(process, x, t_from: int, t_to: int | None, denoised):
    """DPM-Solver++'s first step from original timestep t_from to t_to (diffusion/solvers.py DPMSolverPP)."""
    if t_to is None:
        return denoised  # the step from t = 0 ends at sigma = 0
    alpha_bar = torch.as_tensor(process.alphas_cumprod)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    h = float(torch.log(alpha[t_to] / sigma[t_to]) - torch.log(alpha[t_from] / sigma[t_from]))
    return float(sigma[t_to] / sigma[t_from]) * x - float(alpha[t_to] * math.expm1(-h)) * denoised


def test_dpm_solver_score_guidance_equals_guided_ddim(cond_fn):
    """DPM-Solver++'s first-order step is DDIM's with eta 0, so with the corrected denoised estimate of
    the score form it must reproduce the reference's guided DDIM step, timestep by timestep."""
    process, x, t = make_process(), REF["x_t"], REF["t"]
    ref = REF["ddim_step_eta0.0"]
    with torch.no_grad():
        denoised = steered(process, cond_fn, "score").predict(x, t).denoised
    assert rel_err(denoised, ref["pred_xstart"]) <= TOL
    for n, index in enumerate(t.tolist()):
        t_to = index - 1 if index else None
        sample = dpm_solver_first_order_step(process, x[n], index, t_to, denoised[n])
        assert rel_err(sample, ref["sample"][n]) <= TOL, index


# --- whole chains ---------------------------------------------------------------------------------------------


# The fixture's two chains and the respacing each runs on.
CHAINS = {"ddim_loop_10": "ddim10", "p_loop_10": "10"}


def guided_chain(name: str, cond_fn) -> torch.Tensor:
    """The fixture's chain `name` from its x_T through every respaced step, noisiest first, as the reference's
    sample loops run it (the ancestral chain with the recorded noises)."""
    ref = REF[name]
    process = make_process(CHAINS[name])
    assert torch.equal(process.timestep_map, ref["timestep_map"])
    assert rel_err(torch.as_tensor(process.betas), ref["betas"]) <= 1e-12
    denoiser = steered(process, cond_fn, "score" if name == "ddim_loop_10" else "mean")
    x = ref["x_T"]
    for i, index in enumerate(range(process.num_timesteps - 1, -1, -1)):
        t = torch.full((x.shape[0],), index, dtype=torch.long)
        with torch.no_grad():
            pred = denoiser.predict(x, t)
            if name == "ddim_loop_10":
                x = process.ddim_step(pred, x, t, 0.0, None)
            else:
                x = process.ancestral_step(pred, x, t, ref["noises"][i])
    return x


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_guided_chain(cond_fn, name):
    assert rel_err(guided_chain(name, cond_fn), REF[name]["sample"]) <= TOL


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chain_with_respaced_indices_would_fail(classifier, cond_fn, name):
    """The classifier must see original timesteps: handing it the respaced ones moves the chains far off."""
    process = make_process(CHAINS[name])
    respaced_of = {int(o): i for i, o in enumerate(process.timestep_map)}

    def respaced_cond_fn(x, t):
        return cond_fn(x, torch.tensor([respaced_of[int(v)] for v in t]))

    assert rel_err(guided_chain(name, respaced_cond_fn), REF[name]["sample"]) > 1e-2


def test_guidance_gradient_sees_original_timesteps():
    process = make_process("ddim10")
    seen = []

    def recording_cond_fn(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    ClassifierGuidance(process.denoiser(toy_model), recording_cond_fn, "mean").predict(
        REF["x_t"], torch.tensor([0, 3, 9])
    )
    assert seen == [[0, 30, 90]]


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_guidance_steers_toward_the_requested_classes(classifier, name):
    """Along both chains, a larger classifier scale ends at images the classifier finds likelier to be y."""
    log_probs = []
    for scale in (0.0, 4.0, 20.0, 100.0):
        x = guided_chain(name, classifier_cond_fn(classifier, REF["y"], scale))
        with torch.no_grad():
            logits = classifier(x, torch.zeros(len(x), dtype=torch.long))
        log_probs.append(torch.log_softmax(logits, -1).gather(1, REF["y"][:, None])[:, 0])
    for lower, higher in zip(log_probs, log_probs[1:]):
        assert torch.all(higher > lower + 1e-3)
