"""Autoguidance, the guidance interval and CFG rescale: exactly classifier-free guidance in their limits, really
different elsewhere, and bad settings refused in one line."""

import copy

import pytest
import torch
from pinned_samples import CHECKPOINT

from diffusion.errors import ConfigError
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.sample import load_model
from diffusion.sampling.generate import generate
from diffusion.sampling.guidance import guided
from diffusion.sampling.solvers import DDIM, DDPM, DPMSolverPP

from conftest import compose_cfg

CLASSES = torch.tensor([0, 3, 5, 9])
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models():
    model, process, _ = load_model(
        compose_cfg(["hardware=cpu", f"checkpoint={CHECKPOINT}"], config_name="sample")
    )
    weak = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a "bad version of itself": the same network, its weights disturbed
        for p in weak.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, weak, process


def sample(models, solver, **kwargs):
    model, _, process = models
    return generate(model, process, solver, range(4), 7, CPU, CLASSES, **kwargs)


SOLVERS = [lambda: DDIM(5), lambda: DDPM(6), lambda: DPMSolverPP(6)]


@pytest.mark.parametrize("make_solver", SOLVERS)
def test_autoguidance_of_weight_one_is_the_conditional_model_exactly(models, make_solver):
    _, weak, _ = models
    plain = sample(models, make_solver(), guidance_scale=1.0)
    auto = sample(models, make_solver(), guidance_scale=1.0, guide=weak)
    assert torch.equal(auto, plain)
    stronger = sample(models, make_solver(), guidance_scale=2.0, guide=weak)
    assert (stronger - plain).abs().max() > 1e-2


@pytest.mark.parametrize("make_solver", SOLVERS)
def test_an_interval_covering_every_level_is_classifier_free_guidance_exactly(models, make_solver):
    model, _, process = models
    cfg = sample(models, make_solver(), guidance_scale=2.0)
    everywhere = sample(models, make_solver(), guidance_scale=2.0, guidance_interval=(0.0, 1e6))
    assert torch.equal(everywhere, cfg)
    denoiser = process.denoiser(model)
    middle = (denoiser.sigma_min * 10, denoiser.sigma_max / 10)
    part = sample(models, make_solver(), guidance_scale=2.0, guidance_interval=middle)
    plain = sample(models, make_solver())
    assert (part - cfg).abs().max() > 1e-3 and (part - plain).abs().max() > 1e-3


def test_the_interval_also_limits_autoguidance(models):
    _, weak, _ = models
    auto = sample(models, DDIM(5), guidance_scale=2.0, guide=weak)
    assert torch.equal(
        sample(models, DDIM(5), guidance_scale=2.0, guide=weak, guidance_interval=(0, 1e6)), auto
    )


def test_autoguidance_guides_an_unconditional_model():
    process = GaussianDiffusion(50, "linear", "epsilon", "fixed_small")

    def main(x, t, **_):
        return 0.5 * x

    def weak(x, t, **_):
        return 0.4 * x

    main.num_classes = main.null_class = None
    main.in_channels, main.image_size = 1, 4
    x = generate(main, process, DDIM(5, clip_denoised=False), range(2), 0, CPU, None, 3.0, guide=weak)
    plain = generate(main, process, DDIM(5, clip_denoised=False), range(2), 0, CPU, None, 1.0)
    assert (x - plain).abs().max() > 1e-3


def test_cfg_rescale_matches_the_conditional_standard_deviation():
    torch.manual_seed(0)
    w_cond, w_null = torch.randn(4), torch.randn(4)

    def net(x, t, y=None):
        return torch.where(
            (y == 10).view(-1, 1, 1, 1), w_null.view(1, 4, 1, 1) * x, w_cond.view(1, 4, 1, 1) * x
        )

    x, t, y = torch.randn(3, 4, 5, 5), torch.zeros(3), torch.tensor([1, 2, 3])
    cond = net(x, t, y=y)
    full = guided(net, 3.0, 10, rescale=1.0)(x, t, y=y)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    plain = guided(net, 3.0, 10)(x, t, y=y)
    assert torch.equal(guided(net, 3.0, 10, rescale=0.0)(x, t, y=y), plain)
    half = guided(net, 3.0, 10, rescale=0.5)(x, t, y=y)
    torch.testing.assert_close(half, 0.5 * plain + 0.5 * full)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance_scale": 2.0, "guidance_interval": (5.0, 1.0)}, r"guidance_interval=\[5.0, 1.0\]: needs"),
        ({"guidance_scale": 2.0, "guidance_interval": (1e4, 1e5)}, "outside the model's noise levels"),
        ({"guidance_scale": 2.0, "guidance_interval": (1.0,)}, "give two noise levels"),
        ({"guidance_scale": 2.0, "guidance_rescale": 1.5}, r"guidance_rescale=1.5: must be in \[0, 1\]"),
        ({"guidance_scale": 2.0, "guidance_rescale": 0.7, "guidance_style": "dit"}, "guidance_style=all"),
    ],
)
def test_bad_guidance_settings_are_refused_in_one_line(models, kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        sample(models, DDIM(5), **kwargs)
    assert "\n" not in str(e.value)


# --- through sample.py --------------------------------------------------------------------------------------------


def test_sample_py_autoguidance_interval_and_rescale(tmp_path, models):
    """guide=, guidance_interval= and guidance_rescale= reach the samples; a guide of other data is refused."""
    from diffusion.sample import sample as run_sample

    _, weak, _ = models
    state = torch.load(CHECKPOINT, weights_only=True)
    for rate in state["ema"]:
        state["ema"][rate] = weak.state_dict()
    guide = tmp_path / "guide.pt"
    torch.save(state, guide)

    def npz(name, *overrides):
        cfg = compose_cfg(
            ["hardware=cpu", "solver=ddim", "solver.steps=5", "num_samples=4", "batch_size=4", "classes=[0,3,5,9]",
             f"checkpoint={CHECKPOINT}", *overrides], config_name="sample",
        )  # fmt: skip
        import numpy as np

        return np.load(run_sample(cfg, tmp_path / name))["arr_0"].astype(int)

    plain = npz("plain")
    auto = npz("auto", f"guide={guide}", "guidance_scale=2")
    same = npz("same", f"guide={guide}", "guidance_scale=1")
    interval = npz("interval", "guidance_scale=2", "guidance_interval=[0.5,20]")
    rescaled = npz("rescaled", "guidance_scale=2", "guidance_rescale=0.7")
    assert (same == plain).all()
    for other in (auto, interval, rescaled):
        assert (other != plain).any()

    small = torch.load(CHECKPOINT, weights_only=True)
    small["config"] = small["config"].replace("num_classes: 10", "num_classes: 9")
    small["model_config"] = small["model_config"].replace("num_classes: 10", "num_classes: 9")
    for key in ("model", *(f"ema/{r}" for r in small["ema"])):
        weights = small["model"] if key == "model" else small["ema"][key.split("/")[1]]
        weights["label_emb.weight"] = weights["label_emb.weight"][1:]
    torch.save(small, tmp_path / "nine.pt")
    with pytest.raises(ValueError, match="its classes is 9, the model's 10"):
        npz("bad", f"guide={tmp_path / 'nine.pt'}", "guidance_scale=2")


def test_scored_sampling_returns_its_objective_and_bad_requests_are_one_line(tmp_path):
    """score=digits scores the samples as python -m diffusion.evaluate --features digits does and the job returns
    score_objective: what a -m or Optuna sweep over sampling settings (ema_std, guidance_scale, steps) needs."""
    import json

    import numpy as np

    from diffusion.evaluation.batch_files import open_batch
    from diffusion.evaluation.evaluator import Evaluator
    from diffusion.sample import read_score
    from diffusion.sample import sample as run_sample

    def cfg(*overrides):
        return compose_cfg(
            ["hardware=cpu", "solver=ddim", "solver.steps=5", "num_samples=20", "batch_size=20",
             f"checkpoint={CHECKPOINT}", *overrides], config_name="sample",
        )  # fmt: skip

    scored = cfg("score=digits", "score_objective=precision")
    out = run_sample(scored, tmp_path / "scored")
    metrics = json.loads((tmp_path / "scored/metrics.json").read_text())
    expected = Evaluator(features="digits").evaluate_batch(open_batch(out))
    assert metrics == pytest.approx({k: float(v) for k, v in expected.items()})
    assert read_score(scored, tmp_path / "scored") == metrics["precision"]
    assert read_score(cfg(), tmp_path / "scored") is None and np.load(out)["arr_0"].shape[0] == 20
    for overrides, message in [
        (["score=fid"], "score='fid': must be one of 'digits', 'inception'"),
        (["score=inception"], "score=inception compares with a reference batch: add score_reference"),
        (["score=digits", "score_objective=kid"], "score_objective='kid': must be one of"),
    ]:
        with pytest.raises(ValueError, match=message) as e:
            run_sample(cfg(*overrides), tmp_path / "bad")
        assert "\n" not in str(e.value) and not (tmp_path / "bad" / "samples.npz").exists()
