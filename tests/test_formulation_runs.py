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
