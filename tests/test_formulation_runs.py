"""EDM, EDM2, flow matching and Min-SNR through the one engine: training, exact resume, the loss per quartile of
each formulation's level density, and bad combinations refused in one line."""

import json

import pytest
import torch

from diffusion.engine.training import build_task, train
from diffusion.errors import ConfigError
from diffusion.process.edm import EDM
from diffusion.process.flow import Flow
from diffusion.process.formulation import DensitySampler

from conftest import assert_state_equal, load_ckpt, tiny_cfg

QUIET = ["num_grid_samples=0", "eval=none", "solver=ddim"]
FORMULATIONS = {
    "edm": ["diffusion=edm"],
    "edm2": ["diffusion=edm2"],
    "flow": ["diffusion=flow", "diffusion.density=logit_normal"],
    "min_snr": ["diffusion=improved", "diffusion.loss_weighting=min_snr", "diffusion.steps=8"],
}


def quiet(name):
    # A continuous formulation samples with a continuous solver; these runs make no images at all.
    return [*FORMULATIONS[name], "num_grid_samples=0", "eval=none"] + (
        ["solver=ddim"] if name == "min_snr" else []
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORMULATIONS))
def test_resume_is_exact_for_each_formulation(tmp_path, name):
    over = [*quiet(name), "optim.ema_rates=[0.9]", "logger=none", "log_every=2"]
    if name != "min_snr":
        over.append("solver=euler")
    train(tiny_cfg(*over, "max_steps=6"), tmp_path / "straight")
    train(tiny_cfg(*over, "max_steps=3"), tmp_path / "resumed")
    train(tiny_cfg(*over, "max_steps=6"), tmp_path / "resumed")
    a = load_ckpt(tmp_path / "straight/checkpoints/latest.pt")
    b = load_ckpt(tmp_path / "resumed/checkpoints/latest.pt")
    for key in ("model", "ema", "optimizer", "rng", "step", "formulation"):
        assert_state_equal(a[key], b[key], key)
    if name == "edm2":  # the learned weighting is trained and saved with the network
        (weighting,) = a["formulation"]
        assert weighting["linear.weight"].abs().sum() > 0
    lines = [json.loads(x) for x in open(tmp_path / "straight/metrics.jsonl") if "train/loss" in x]
    assert any(k.startswith("train/loss_q") for k in lines[-1])


def test_continuous_levels_and_quartiles():
    """The density sampler draws from the formulation's density, reproducibly from the engine's generator, and
    each quartile bin holds a quarter of the draws."""
    for formulation in (EDM(), Flow(density="logit_normal"), Flow(density="mode")):
        sampler = DensitySampler(formulation)
        a, w = sampler.sample(4000, "cpu", torch.Generator().manual_seed(1))
        b, _ = sampler.sample(4000, "cpu", torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and torch.equal(w, torch.ones(4000))
        counts = torch.bincount(formulation.quartile(a), minlength=4).float() / 4000
        assert (counts - 0.25).abs().max() < 0.03, counts


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["diffusion=edm", "sampler=loss_second_moment"], "sampler=LossSecondMomentSampler draws ADM's"),
        (
            ["diffusion=edm", "solver=ddim"],
            "solver=DDIM steps through ADM's discrete timesteps; diffusion=edm",
        ),
        (["diffusion=edm", "diffusion.sigma_data=0"], r"diffusion.sigma_data=0(.0)?: must be > 0"),
        (["diffusion=flow", "diffusion.density=gaussian"], "diffusion.density='gaussian': must be one of"),
        (["diffusion=adm", "diffusion.loss_weighting=snr"], "diffusion.loss_weighting='snr': must be one of"),
        (["diffusion=adm", "diffusion.loss_weighting=min_snr", "diffusion.loss_type=kl"], "has none: use"),
    ],
)
def test_bad_formulation_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        build_task(tiny_cfg(*overrides))
    assert "\n" not in str(e.value)


def test_classifier_training_needs_adm():
    with pytest.raises(ConfigError, match="task=classifier trains a noisy-image classifier on ADM's"):
        build_task(tiny_cfg("diffusion=edm", "task=classifier", "model=classifier_digits", "solver=ddpm"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe", [("digits", "edm"), ("digits", "flow"), ("digits_dit", "flow"), ("digits", "adm")]
)
def test_recipes_train_and_evaluate_with_the_formulation_s_own_sampler(tmp_path, recipe):
    """experiment=digits diffusion=edm (and the others) as typed, shortened: they train, sample their grids and
    score their samples with solver=auto, the formulation's own sampler."""
    experiment, formulation = recipe
    from conftest import compose_cfg

    cfg = compose_cfg(
        [f"experiment={experiment}", f"diffusion={formulation}", "max_steps=2", "logger=none",
         "eval.num_samples=12", "eval.batch_size=12", "num_grid_samples=2", "solver.steps=3",
         *(["model.num_channels=32"] if experiment == "digits" else ["model.depth=1", "eval=digits"])]
    )  # fmt: skip
    metrics = train(cfg, tmp_path)
    assert 0 <= metrics["eval/fid"] < float("inf") and (tmp_path / "samples/step_00000002.png").exists()
    expected = {"adm": "DPMSolverPP", "edm": "KSampler", "flow": "KSampler"}[formulation]
    assert type(build_task(cfg).solver).__name__ == expected


def test_bits_per_dim_names_the_formulations_it_supports(tmp_path):
    from diffusion.nll import evaluate
    from diffusion.sample import SamplingError

    from conftest import compose_cfg

    train(tiny_cfg("diffusion=edm", "solver=euler", "max_steps=1", *QUIET[:2]), tmp_path / "run")
    cfg = compose_cfg(
        [
            "hardware=cpu",
            "data=digits",
            "data.batch_size=3",
            f"checkpoint={tmp_path / 'run/checkpoints/latest.pt'}",
        ],
        config_name="nll",
    )
    with pytest.raises(SamplingError, match=r"diffusion=adm, ddpm, improved\); .* diffusion=edm") as e:
        evaluate(cfg, tmp_path / "nll")
    assert "\n" not in str(e.value)


def test_flow_sde_solver_is_sits_sde_sampler_on_the_per_image_noise():
    """solver=flow_sde through generate gives sample_flow_sde's result (checked against SiT's numbers in
    test_formulations) with the per-image noise as its Brownian increments; bad uses are one line."""
    from hydra.utils import instantiate

    from diffusion.process.flow import sample_flow_sde
    from diffusion.process.gaussian import GaussianDiffusion
    from diffusion.sampling.flow_sde import FlowSDE
    from diffusion.sampling.generate import generate
    from diffusion.sampling.guidance import classifier_cond_fn
    from diffusion.sampling.noise import PerImageNoise

    from conftest import compose_cfg

    torch.manual_seed(0)
    cfg = compose_cfg(["model=unet_digits", "model.image_size=8", "model.num_channels=32", "model.channel_mult=[1]",
                       "model.attention_resolutions=[]", "model.num_res_blocks=1"])  # fmt: skip
    net = instantiate(cfg.model, in_channels=1, num_classes=10, learn_sigma=False).eval()
    flow = Flow()
    solver = FlowSDE(steps=6)
    classes = torch.tensor([1, 2, 3])
    with torch.no_grad():
        ours = generate(net, flow, solver, range(3), 5, torch.device("cpu"), classes)
        noise = PerImageNoise(5, range(3), (1, 8, 8), torch.device("cpu"))
        x_T = noise.draw()
        direct = sample_flow_sde(flow, net, x_T, steps=6, model_kwargs={"y": classes}, noise=noise.draw)
    assert torch.equal(ours, direct.float())
    assert solver.network_evaluations == 6 and solver.describe()["solver"] == "flow_sde"
    with pytest.raises(ConfigError, match="solver=flow_sde is SiT's sampler for flow-matching models"):
        solver.check(GaussianDiffusion(1000, "linear", "epsilon", "fixed_small"))
    with pytest.raises(ConfigError, match="classifier guidance, autoguidance and the guidance interval wrap"):
        generate(net, flow, solver, range(3), 5, torch.device("cpu"), classes,
                 cond_fn=classifier_cond_fn(lambda x, t: x.flatten(1)[:, :10], classes))  # fmt: skip
    with pytest.raises(ConfigError, match="solver.steps=1: must be an integer >= 2"):
        FlowSDE(steps=1)
