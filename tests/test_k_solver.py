"""KSampler, the continuous samplers as a solver: config options, bad input refused in one line before sampling,
the same numbers as the plain functions, per-image noise, guidance (both CFG styles, a classifier, both), an
upsampler, sample.py's stored metadata and a -m sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from test_dit import randomise
from test_dit_platform import PLAIN_SHRINK
from test_super_res import base_model, base_npz, low_res_digits, upsampler  # noqa: F401 (fixtures)

from diffusion.config import build
from diffusion.errors import ConfigError
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.sample import load_model, sample
from diffusion.sampling import get_sigmas_exponential, k_samplers, sample_dpmpp_2m, sample_heun
from diffusion.sampling.generate import generate
from diffusion.sampling.guidance import classifier_cond_fn, guided_denoiser
from diffusion.sampling.k_solver import KSampler

from conftest import ROOT, compose_cfg, run_script

NAMES = sorted(k_samplers.SAMPLERS)
CPU = torch.device("cpu")


class Counting(torch.nn.Module):
    """A network wrapper that records the time values it is given."""

    def __init__(self, net):
        super().__init__()
        self.net, self.ts = net, []
        for key in ("num_classes", "null_class", "in_channels", "image_size", "guidance_styles",
                    "label_dropout_key"):  # fmt: skip
            if hasattr(net, key):
                setattr(self, key, getattr(net, key))

    def forward(self, x, t, **kwargs):
        self.ts.append(t.detach().clone())
        return self.net(x, t, **kwargs)

    def forward_with_cfg(self, x, t, **kwargs):
        self.ts.append(t.detach().clone())
        return self.net.forward_with_cfg(x, t, **kwargs)


@pytest.fixture(scope="module")
def dit():
    """A tiny class-conditional DiT (4x4x4 latents, learned variance, a null class), random weights."""
    torch.manual_seed(0)
    return randomise(instantiate(compose_cfg(["model=dit_xl_2", *PLAIN_SHRINK]).model)).eval()


@pytest.fixture(scope="module")
def process():
    return GaussianDiffusion(model_var_type="learned_range")


# --- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_is_a_solver_option(name):
    text = (ROOT / "conf" / "solver" / f"{name}.yaml").read_text()
    assert [line.split(":")[0] for line in text.splitlines() if line and not line.startswith("#")] == [
        "defaults", "sampler", "steps"
    ]  # fmt: skip
    solver = build(compose_cfg([f"solver={name}"], config_name="sample").solver)
    assert isinstance(solver, KSampler) and solver.sampler == name
    assert (solver.schedule, solver.quantize, solver.sigma_min, solver.options) == ("karras", True, None, {})
    cfg = compose_cfg(
        [f"solver={name}", "solver.steps=7", "solver.schedule=exponential"], config_name="sample"
    )
    solver = build(cfg.solver)
    assert (solver.steps, solver.schedule) == (7, "exponential")
    assert solver.network_evaluations == (13 if name in k_samplers._TWO_CALL_SAMPLERS else 7)


def test_options_reach_the_sampler(process):
    solver = build(
        compose_cfg(
            ["solver=dpmpp_2m_sde", "solver.eta=0.5", "solver.solver_type=heun", "solver.sigma_max=80"],
            config_name="sample",
        ).solver
    )
    assert solver.options == {"eta": 0.5, "solver_type": "heun"} and solver.sigma_max == 80
    assert solver.describe() == {
        "solver": "dpmpp_2m_sde",
        "options": {
            "steps": 20,
            "schedule": "karras",
            "quantize": True,
            "sigma_max": 80.0,
            "eta": 0.5,
            "solver_type": "heun",
        },  # fmt: skip
        "network_evaluations": 20,
    }
    sigmas = solver.sigmas(process.denoiser(None))
    assert sigmas.dtype == torch.float64 and float(sigmas[0]) == 80 and float(sigmas[-1]) == 0
    assert float(sigmas[-2]) == pytest.approx(process.denoiser(None).sigma_min)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampler="heun", steps=0), r"solver.steps=0: must be an integer >= 1"),
        (dict(sampler="heun", steps=10, eta=0.5), r"solver.eta is not an option of sampler heun: it takes s_churn"),
        (dict(sampler="dpmpp_2m", steps=10, s_churn=1.0), r"solver.s_churn is not an option of sampler dpmpp_2m"),
        (dict(sampler="lms", steps=10, order=0), r"solver.order=0: must be >= 1"),
        (dict(sampler="dpmpp_2m_sde", steps=10, solver_type="rk4"), r"solver.solver_type='rk4'"),
        (dict(sampler="dpm_3", steps=10), r"solver.sampler='dpm_3': use one of \['dpm_2'"),
        (dict(sampler="heun", steps=10, schedule="linear"), r"solver.schedule='linear': use one of"),
        (dict(sampler="heun", steps=10, sigma_min=2.0, sigma_max=1.0), r"sigma_min=2.0 >= solver.sigma_max=1.0"),
        (dict(sampler="heun", steps=10, schedule="model", sigma_max=5.0), r"schedule=model uses the model's"),
        (dict(sampler="heun", steps=10, schedule="exponential", rho=3.0), r"solver.rho shapes karras"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        KSampler(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(sigma_max=500.0),
            r"solver sigmas \[0.01\d*, 500\] leave the model's trained range \[0.01\d*, 157",
        ),
        (dict(sigma_min=1e-3), r"leave the model's trained range .* with solver.quantize=true"),
        (dict(sigma_min=200.0), r"solver.sigma_min=200 >= solver.sigma_max=157.* need min < max"),
    ],
)
def test_a_range_the_model_cannot_take_is_refused_by_check(process, kwargs, message):
    solver = KSampler("heun", 5, **kwargs)
    with pytest.raises(ConfigError, match=message) as info:
        solver.check(process)
    assert "\n" not in str(info.value)
    if "sigma_min" not in kwargs or kwargs["sigma_min"] < 1:
        KSampler("heun", 5, quantize=False, **kwargs).check(process)  # interpolated: any range


def test_a_stochastic_sampler_without_per_image_noise_is_refused_before_sampling(process):
    def never(*args, **kwargs):
        raise AssertionError("the network ran")

    denoiser = process.denoiser(never)
    x_T = torch.zeros(1, 1, 2, 2)
    for solver in (KSampler("euler_ancestral", 3), KSampler("heun", 3, s_churn=1.0)):
        with pytest.raises(ConfigError, match=r"draws fresh noise and no per-image noise was given"):
            solver(denoiser, x_T)
    with pytest.raises(AssertionError, match="the network ran"):  # eta=0: deterministic, no noise needed
        KSampler("euler_ancestral", 3, eta=0.0)(denoiser, x_T)


def test_sample_py_refuses_a_bad_range_before_sampling(base_model, tmp_path, monkeypatch):  # noqa: F811
    import diffusion.sample as sampling

    monkeypatch.setattr(sampling, "generate", lambda *a, **k: pytest.fail("sampling started"))
    cfg = compose_cfg(
        [f"checkpoint={base_model}", "hardware=cpu", "solver=heun", "solver.sigma_max=1000", "num_samples=2"],
        config_name="sample",
    )
    with pytest.raises(ConfigError, match="leave the model's trained range"):
        sample(cfg, tmp_path)


# --- numbers --------------------------------------------------------------------------------------------------


def test_ksampler_is_the_plain_function_on_its_schedule(dit, process):
    net = Counting(dit)
    denoiser = process.denoiser(net, quantize=False)
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 7])
    solver = KSampler("dpmpp_2m", 6, schedule="exponential", sigma_min=0.1, sigma_max=50.0, quantize=False)
    with torch.no_grad():
        got = solver(denoiser, x_T, extra_args={"y": y})
        sigmas = get_sigmas_exponential(6, 0.1, 50.0)
        want = sample_dpmpp_2m(denoiser, x_T * sigmas[0], sigmas, extra_args={"y": y})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The model schedule: the trained levels evenly spaced in t; heun calls the network 2 * steps - 1 times.
    net.ts.clear()
    solver = KSampler("heun", 4, schedule="model")
    with torch.no_grad():
        got = solver(process.denoiser(net), x_T, extra_args={"y": y})
        sigmas = process.denoiser(net).get_sigmas(4).float()
        want = sample_heun(process.denoiser(net), x_T * sigmas[0], sigmas, extra_args={"y": y})
    torch.testing.assert_close(got, want)
    assert len(net.ts) == 2 * solver.network_evaluations == 2 * 7
    assert net.ts[0].tolist() == [999.0, 999.0] and net.ts[2].tolist() == [666.0, 666.0]  # 999, 666, 333, 0


def test_quantize_decides_the_timesteps_the_network_sees(dit, process):
    seen = {}
    for quantize in (True, False):
        net = Counting(dit)
        solver = KSampler("euler", 5, quantize=quantize)
        with torch.no_grad():
            generate(net, process, solver, [0], 0, CPU, torch.tensor([1]), guidance_scale=1.0)
        seen[quantize] = torch.cat(net.ts)
    assert torch.equal(seen[True], seen[True].round()) and not torch.equal(seen[False], seen[False].round())
    assert seen[True][0] == seen[False][0] == 999  # sigma_max is the last trained level


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "heun"])
def test_an_image_does_not_depend_on_the_batch(dit, process, name):
    solver = KSampler(name, 4, **({"s_churn": 1.0} if name == "heun" else {}))
    y = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        whole = generate(dit, process, solver, range(4), 5, CPU, y, guidance_scale=2.0)
        parts = [generate(dit, process, solver, [i, i + 1], 5, CPU, y[i : i + 2], guidance_scale=2.0)
                 for i in (0, 2)]  # fmt: skip
        other_seed = generate(dit, process, solver, range(4), 6, CPU, y, guidance_scale=2.0)
    torch.testing.assert_close(whole, torch.cat(parts), rtol=1e-5, atol=1e-5)
    assert (whole - other_seed).abs().max() > 0.1


# --- guidance -------------------------------------------------------------------------------------------------


class LatentClassifier(torch.nn.Module):
    """logits = W mean_hw tanh(x) + 0.001 t b: depends on the time value, which it records."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.W, self.b = torch.randn(10, 4, generator=g), torch.randn(10, generator=g)
        self.ts = []

    def forward(self, x, t):
        self.ts.append(t.detach().clone())
        return torch.tanh(x).mean((2, 3)) @ self.W.T + 0.001 * t[:, None].to(x.dtype) * self.b


@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_takes_every_guidance(dit, process, name):
    solver = KSampler(name, 3)
    y = torch.tensor([1, 2])
    outputs = {}
    for style in ("all", "dit"):
        for cfg_scale in (1.0, 3.0):
            for with_classifier in (False, True):
                net, classifier = Counting(dit), LatentClassifier()
                cond_fn = classifier_cond_fn(classifier, y, scale=5.0) if with_classifier else None
                with torch.no_grad():
                    x = generate(net, process, solver, range(2), 0, CPU, y, guidance_scale=cfg_scale,
                                 cond_fn=cond_fn, guidance_style=style)  # fmt: skip
                assert torch.isfinite(x).all()
                assert len(net.ts) == solver.network_evaluations
                if with_classifier:  # the classifier sees the time values the network sees
                    assert [t.tolist() for t in classifier.ts] == [t[: len(t) // (2 if cfg_scale != 1 else 1)]
                                                                   .tolist() for t in net.ts]  # fmt: skip
                outputs[style, cfg_scale, with_classifier] = x
    plain = outputs["all", 1.0, False]
    for key, x in outputs.items():
        if key[1:] != (1.0, False):
            assert (x - plain).abs().max() > 1e-3, key  # every guidance changes the images
    assert torch.equal(outputs["dit", 1.0, False], plain)
    assert (outputs["dit", 3.0, False] - outputs["all", 3.0, False]).abs().max() > 1e-4  # the styles differ


def test_cfg_with_a_continuous_sampler_is_the_guided_denoiser(dit, process):
    """generate's denoiser is guided_denoiser's, with the solver's quantize."""
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([4, 5])
    solver = KSampler("dpmpp_2m", 5, quantize=False)
    denoiser = guided_denoiser(dit, process, guidance_scale=2.5, quantize=False)
    assert denoiser.quantize is False
    with torch.no_grad():
        want = solver(denoiser, x_T, extra_args={"y": y})
        sigmas = solver.sigmas(denoiser).float()
        plain = sample_dpmpp_2m(denoiser, x_T * sigmas[0], sigmas, extra_args={"y": y})
    torch.testing.assert_close(want, plain)


# --- sample.py: an upsampler, the stored metadata, a sweep ------------------------------------------------------


def test_an_upsampler_samples_with_a_continuous_sampler(upsampler, tmp_path):  # noqa: F811
    images, labels = low_res_digits(3)
    path = base_npz(tmp_path / "base.npz", images, labels)
    outs = {}
    for name, flip in (("a", False), ("b", True)):
        base = base_npz(tmp_path / f"base_{name}.npz", 255 - images if flip else images, labels)
        cfg = compose_cfg(
            [f"checkpoint={upsampler}", f"base_samples={base}", "hardware=cpu", "solver=dpmpp_2m_sde",
             "solver.steps=3", "num_samples=3", "batch_size=2"],
            config_name="sample",
        )  # fmt: skip
        out = sample(cfg, tmp_path / name)
        with np.load(out) as npz:
            outs[name] = npz["arr_0"]
            assert npz["arr_1"].tolist() == labels.tolist()
            assert str(npz["solver"]) == "dpmpp_2m_sde" and int(npz["network_evaluations"]) == 3
    assert outs["a"].shape == (3, 8, 8, 1) and (outs["a"] != outs["b"]).any()  # low_res reaches the network
    # exactly generate() with low_res in extra_args
    model, diffusion, _ = load_model(cfg)
    low = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        x = generate(model, diffusion, build(cfg.solver), range(2), 0, CPU, torch.from_numpy(labels[:2]),
                     model_kwargs={"low_res": low[:2]})  # fmt: skip
    from diffusion.data.images import to_uint8

    np.testing.assert_array_equal(outs["a"][:2], to_uint8(x))
    del path


@pytest.mark.slow
def test_a_sweep_over_samplers_and_steps(base_model, tmp_path):  # noqa: F811
    run_script(
        "sample.py", "-m", f"checkpoint={base_model}", "hardware=cpu", "num_samples=2", "batch_size=2",
        "solver=heun,dpmpp_2m", "solver.steps=2,3", f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    seen = []
    for job in sorted(Path(tmp_path).iterdir()):
        if not (job / "samples.npz").exists():
            continue
        with np.load(job / "samples.npz") as npz:
            seen.append((str(npz["solver"]), int(npz["network_evaluations"]), str(npz["solver_options"])))
    assert sorted(s[:2] for s in seen) == [("dpmpp_2m", 2), ("dpmpp_2m", 3), ("heun", 3), ("heun", 5)]
    assert all('"schedule": "karras"' in s[2] for s in seen)


def test_clip_denoised_clamps_the_estimates_and_latents_drop_it(dit, process):
    from diffusion.sampling.solvers import unclipped

    seen = {}
    for clip in (False, True):
        solver = KSampler("dpmpp_2m", 4, clip_denoised=clip)
        estimates = []
        with torch.no_grad():
            generate(dit, process, solver, range(2), 0, CPU, torch.tensor([1, 2]), guidance_scale=3.0,
                     callback=lambda k, x, denoised, e=estimates: e.append(denoised.abs().max()))  # fmt: skip
        seen[clip] = max(estimates)
    assert seen[True] <= 1 < seen[False]
    solver = KSampler("heun", 3, clip_denoised=True)
    assert unclipped(solver).clip_denoised is False and solver.clip_denoised is True
    assert solver.describe()["options"]["clip_denoised"] is True


def test_training_grids_and_evaluation_use_a_continuous_sampler(tmp_path, monkeypatch):
    from diffusion.engine.training import train

    from conftest import tiny_cfg

    calls, call = [], KSampler.__call__
    monkeypatch.setattr(
        KSampler, "__call__", lambda self, *a, **k: calls.append(self.sampler) or call(self, *a, **k)
    )
    cfg = tiny_cfg("max_steps=2", "sample_every=2", "num_grid_samples=2", "solver=dpmpp_2m_sde", "solver.steps=3",
                   "eval=digits", "eval.num_samples=20", "eval.batch_size=20")  # fmt: skip
    train(cfg, tmp_path)
    assert (tmp_path / "samples" / "step_00000002.png").exists()
    assert calls == ["dpmpp_2m_sde", "dpmpp_2m_sde"]  # the grid's batch, then the evaluation's
    with pytest.raises(ConfigError, match="leave the model's trained range"):
        train(tiny_cfg("max_steps=1", "solver=heun", "solver.sigma_max=1e4"), tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_the_quality_benchmark_gives_each_sampler_its_budget():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sampler_quality import cells, steps_for

    assert [steps_for("heun", n) for n in (5, 10, 20, 35, 50)] == [3, 5, 10, 18, 25]  # 5, 9, 19, 35, 49 NFE
    assert [steps_for("dpmpp_2m", n) for n in (5, 10)] == [5, 10]
    names = [(name, solver.network_evaluations) for name, solver in cells(["heun"], [10])]
    assert names == [("heun", 9), ("dpm_solver", 10), ("ddim", 50), ("ddpm", 250)]
