"""Classifier-guided sampling: every solver with a cond_fn (the reference's guided chains reproduced through the
solvers), sample.py's classifier= with project and released-format classifiers, original timesteps under
respacing, classifier-free plus classifier guidance, and every bad combination refused in one line first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_classifier_training import classifier_cfg
from test_guidance import REF, TOL, ToyClassifier, make_process, toy_model

import diffusion.sample as sampling
from diffusion.config import build
from diffusion.data.images import to_uint8
from diffusion.engine.training import train
from diffusion.errors import UserError
from diffusion.models.unet import EncoderUNetModel
from diffusion.sample import load_model, sample
from diffusion.sampling.generate import generate
from diffusion.sampling.guidance import classifier_cond_fn
from diffusion.sampling.solvers import DDIM, DDPM, DPMSolverPP

from conftest import compose_cfg, load_ckpt, run_script, run_solver, tiny_cfg


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- the solvers ---------------------------------------------------------------------------------------------


@pytest.fixture
def toy_cond_fn():
    return classifier_cond_fn(ToyClassifier(REF["W"], REF["b"]), REF["y"], scale=REF["classifier_scale"])


def test_ddim_solver_reproduces_the_reference_guided_chain(toy_cond_fn):
    """DDIM(steps=10) keeps the fixture's "ddim10" timesteps; with the cond_fn it is the reference's guided loop."""
    ref = REF["ddim_loop_10"]
    solver, process = DDIM(steps=10), make_process()
    assert solver.timesteps(process) == ref["timestep_map"].tolist()
    with torch.no_grad():
        x = run_solver(solver, toy_model, process, ref["x_T"], cond_fn=toy_cond_fn)
    assert rel_err(x, ref["sample"]) <= TOL
    with torch.no_grad():
        unguided = run_solver(solver, toy_model, process, ref["x_T"])
    assert rel_err(unguided, ref["sample"]) > 1e-2


def test_ddpm_solver_reproduces_the_reference_guided_ancestral_chain(toy_cond_fn):
    ref = REF["p_loop_10"]
    solver, process = DDPM(steps=10), make_process()
    assert solver.timesteps(process) == ref["timestep_map"].tolist()
    with torch.no_grad():
        x = run_solver(
            solver, toy_model, process, ref["x_T"], noise=lambda k: ref["noises"][k], cond_fn=toy_cond_fn
        )
    assert rel_err(x, ref["sample"]) <= TOL


def eps_shifted_model(process, cond_fn):
    """The toy network with its noise prediction corrected by the guidance gradient, eps - sqrt(1 - a_t) g: what
    score guidance amounts to when x_0 is not clipped (an independent route to condition_score)."""
    alpha_bar = torch.as_tensor(process.alphas_cumprod, dtype=torch.float64)

    def model(x, t, **kwargs):
        out = toy_model(x, t)
        c = x.shape[1]
        scale = (1 - alpha_bar[t]).sqrt().float()[:, None, None, None]
        return torch.cat([out[:, :c] - scale * cond_fn(x, t), out[:, c:]], dim=1)

    return model


@pytest.mark.parametrize("solver", [DDIM(10, clip_denoised=False), DPMSolverPP(8, clip_denoised=False)])
def test_score_guidance_of_ddim_and_dpm_solver_is_a_corrected_noise_prediction(toy_cond_fn, solver):
    process, x_T = make_process(), REF["ddim_loop_10"]["x_T"]
    with torch.no_grad():
        guided = run_solver(solver, toy_model, process, x_T, cond_fn=toy_cond_fn)
        by_eps = run_solver(solver, eps_shifted_model(process, toy_cond_fn), process, x_T)
        plain = run_solver(solver, toy_model, process, x_T)
    assert rel_err(guided, by_eps) <= TOL
    assert rel_err(guided, plain) > 1e-2


# --- sample.py with a classifier -----------------------------------------------------------------------------


def perturb(state_dict: dict, seed: int) -> dict:
    """Weights with a visible effect (a fresh UNet's output layer is zero; one step barely moves it)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in state_dict.items()}  # fmt: skip


def _trained(root, name: str, cfg) -> str:
    train(cfg, root / name)
    path = root / name / "checkpoints" / "latest.pt"
    state = torch.load(path, weights_only=True)
    state["ema"] = {rate: perturb(sd, 0) for rate, sd in state["ema"].items()}
    torch.save(state, path)
    return str(path)


def _variant(source: str, path, **changes) -> str:
    """A copy of a classifier checkpoint whose network has other settings (fresh weights of that network)."""
    state = torch.load(source, weights_only=True)
    config = {**OmegaConf.to_container(OmegaConf.create(state["model_config"])), **changes}
    weights = build(config).state_dict()
    state.update(model_config=OmegaConf.to_yaml(config), model=weights)
    state["ema"] = dict.fromkeys(state["ema"], weights)
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """Engine checkpoints of the tiny digits networks: a classifier, diffusion models without classes, with
    classes and with classes and a null class; plain (released-format) and mismatched classifiers."""
    root = tmp_path_factory.mktemp("guided")
    short = ["max_steps=1", "num_grid_samples=1", "solver.steps=2"]
    paths = {
        "classifier": _trained(root, "classifier", classifier_cfg("max_steps=1")),
        "uncond": _trained(root, "uncond", tiny_cfg(*short, "model.class_cond=false")),
        "cond": _trained(root, "cond", tiny_cfg(*short)),
        "cfg": _trained(root, "cfg", tiny_cfg(*short, "model.label_dropout=0.1")),
    }
    torch.manual_seed(0)
    plain = instantiate(compose_cfg(["model=classifier_digits"]).model).state_dict()
    torch.save(plain, root / "plain_classifier.pt")
    paths["plain_classifier"] = str(root / "plain_classifier.pt")
    for name, changes in {
        "classifier_16px": dict(image_size=16, attention_resolutions=[8]),
        "classifier_rgb": dict(in_channels=3),
        "classifier_5": dict(num_classes=5),
    }.items():
        paths[name] = _variant(paths["classifier"], root / f"{name}.pt", **changes)
    return paths


def sample_cfg(*overrides: str):
    return compose_cfg(["hardware=cpu", "solver=ddim", "solver.steps=4", *overrides], config_name="sample")


def read_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def classifier_by_hand(path: str) -> EncoderUNetModel:
    """The classifier of a project checkpoint with its first EMA's weights, built without sample.py's code, in
    the memory layout sampling on this CPU uses (another layout rounds differently)."""
    state = load_ckpt(path)
    model = build(OmegaConf.create(state["model_config"]))
    model.load_state_dict(next(iter(state["ema"].values())))
    return model.eval().to(memory_format=torch.channels_last)


def model_by_hand(cfg):
    """The diffusion model and process as sample.py loads them, in the memory layout it samples in."""
    model, diffusion, info = load_model(cfg)
    return sampling.sampling_hardware(cfg.hardware, info["channels_last"]).prepare_model(model), diffusion


SOLVERS = [
    ["solver=ddpm", "solver.steps=3"],
    ["solver=ddim", "solver.steps=4"],
    ["solver=dpm_solver", "solver.steps=3"],
]


@pytest.mark.parametrize("solver", SOLVERS, ids=["ddpm", "ddim", "dpm_solver"])
def test_an_unconditional_model_guided_towards_requested_classes(runs, tmp_path, solver):
    common = [f"checkpoint={runs['uncond']}", "num_samples=6", "batch_size=4", *solver]
    guided = sample_cfg(*common, f"classifier={runs['classifier']}", "classifier_scale=20", "classes=[3,3,7]")
    npz = read_npz(sample(guided, tmp_path / "guided"))
    assert npz["arr_1"].tolist() == [3, 3, 7, 3, 3, 7]  # the requested classes, as for a conditional model
    # Exactly generate() with the classifier's cond_fn for each batch's classes, the model given no labels.
    model, diffusion = model_by_hand(guided)
    classifier = classifier_by_hand(runs["classifier"])
    y = torch.tensor([3, 3, 7, 3, 3, 7])
    expected = [
        generate(model, diffusion, instantiate(guided.solver), range(b, min(b + 4, 6)), 0, torch.device("cpu"),
                 cond_fn=classifier_cond_fn(classifier, y[b : b + 4], 20.0))
        for b in (0, 4)
    ]  # fmt: skip
    expected = torch.cat(expected)
    np.testing.assert_array_equal(npz["arr_0"], to_uint8(expected))
    plain = read_npz(sample(sample_cfg(*common), tmp_path / "plain"))
    assert "arr_1" not in plain and "arr_0" in plain  # no classes without the classifier
    assert np.abs(plain["arr_0"].astype(int) - npz["arr_0"]).mean() > 1


@pytest.mark.parametrize("solver", SOLVERS, ids=["ddpm", "ddim", "dpm_solver"])
def test_the_classifier_sees_the_original_timesteps_of_the_solvers_steps(runs, tmp_path, monkeypatch, solver):
    seen = []
    forward = EncoderUNetModel.forward

    def recording(self, x, t):
        seen.append(t.tolist())
        return forward(self, x, t)

    monkeypatch.setattr(EncoderUNetModel, "forward", recording)
    cfg = sample_cfg(
        f"checkpoint={runs['uncond']}", f"classifier={runs['classifier']}", "num_samples=2", *solver
    )
    sample(cfg, tmp_path)
    _, diffusion, _ = load_model(cfg)
    kept = instantiate(cfg.solver).timesteps(diffusion)  # original indices, ascending
    assert [t[0] for t in seen] == kept[::-1] and all(len(set(t)) == 1 for t in seen)
    assert kept[-1] > len(kept)  # original indices, not the respaced 0..steps-1


def test_classifier_free_and_classifier_guidance_combine(runs, tmp_path):
    common = [
        f"checkpoint={runs['cfg']}",
        "num_samples=4",
        "classes=[1,2]",
        "solver=dpm_solver",
        "solver.steps=3",
    ]
    both = sample_cfg(*common, "guidance_scale=3", f"classifier={runs['classifier']}", "classifier_scale=20")
    images = read_npz(sample(both, tmp_path / "both"))["arr_0"]
    model, diffusion = model_by_hand(both)
    y = torch.tensor([1, 2, 1, 2])
    cond_fn = classifier_cond_fn(classifier_by_hand(runs["classifier"]), y, 20.0)
    x = generate(model, diffusion, instantiate(both.solver), range(4), 0, torch.device("cpu"), y,
                 guidance_scale=3.0, cond_fn=cond_fn)  # fmt: skip
    np.testing.assert_array_equal(images, to_uint8(x))
    # Each kind of guidance changes the images the other makes (before clipping to uint8, which saturates).
    free_only = generate(model, diffusion, instantiate(both.solver), range(4), 0, torch.device("cpu"), y,
                         guidance_scale=3.0)  # fmt: skip
    classifier_only = generate(model, diffusion, instantiate(both.solver), range(4), 0, torch.device("cpu"), y,
                               cond_fn=cond_fn)  # fmt: skip
    for other in (free_only, classifier_only):
        assert rel_err(other, x) > 1e-2


def test_a_released_format_classifier_loads_with_its_preset(runs):
    cfg = sample_cfg(f"checkpoint={runs['uncond']}", f"classifier={runs['plain_classifier']}",
                     "classifier_model=classifier_digits")  # fmt: skip
    model, _, _ = load_model(cfg)
    classifier = sampling.load_classifier(cfg, model)
    file = torch.load(runs["plain_classifier"], weights_only=True)
    assert classifier.state_dict().keys() == file.keys()
    assert all(torch.equal(v, file[k]) for k, v in classifier.state_dict().items())
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())


def test_a_project_classifier_loads_its_first_ema(runs):
    cfg = sample_cfg(f"checkpoint={runs['uncond']}", f"classifier={runs['classifier']}")
    model, _, _ = load_model(cfg)
    loaded = sampling.load_classifier(cfg, model).state_dict()
    ema = next(iter(load_ckpt(runs["classifier"])["ema"].values()))
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


# --- bad combinations: one line each, before any sampling ----------------------------------------------------


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampling work started before the request was checked")

    monkeypatch.setattr(sampling, "generate", refuse)


BAD = [
    ("uncond", ["classifier=@classifier_16px"], r"classifies 1x16x16 images but the model makes 1x8x8 ones"),
    ("uncond", ["classifier=@classifier_rgb"], r"classifies 3x8x8 images but the model makes 1x8x8 ones"),
    ("cond", ["classifier=@classifier_5"], "tells 5 classes apart but the model is conditioned on 10"),
    ("uncond", ["classifier=@classifier_5", "classes=[2,7]"], r"classes \[7\] are outside the classifier's range 0..4"),
    ("uncond", ["classifier=@classifier", "classes=[12]"], r"classes \[12\] are outside the classifier's range 0..9"),
    ("uncond", ["classes=[3]"], "the model is unconditional: drop classes, or steer it with classifier=PATH"),
    ("cond", ["classifier=@classifier", "guidance_scale=2"], "this one has no null class: use guidance_scale=1"),
    ("uncond", ["classifier=@classifier", "guidance_scale=3"], "needs a class-conditional model"),
    ("classifier", [], "is a noisy-image classifier, not a diffusion model: give it as classifier="),
    ("uncond", ["classifier=@cfg"], "is the checkpoint of a diffusion model .*UNetModel.*, not of a classifier"),
    ("uncond", ["classifier=@plain_classifier"],
     "is a plain state dict .* e.g. classifier_model=classifier_64; it matches model=classifier_digits$"),
    ("uncond", ["classifier=@plain_classifier", "classifier_model=unet_digits"],
     r"classifier_model=unet_digits is not a classifier preset .*: use one of \['classifier_128'"),
    ("uncond", ["classifier=@plain_classifier", "classifier_model=classifier_9"], "classifier_9: no such preset"),
    ("uncond", ["classifier=@plain_classifier", "classifier_model=classifier_64"],
     "does not fit its classifier model: .* The file matches model=classifier_digits."),
    ("uncond", ["classifier=@classifier", "classifier_model=classifier_digits"], "drop classifier_model"),
    ("uncond", ["classifier_scale=3"], "classifier_scale=3.0 needs a classifier: add classifier=PATH"),
    ("uncond", ["classifier_model=classifier_64"], "names the preset of a classifier file: add classifier=PATH"),
    ("plain_classifier", ["model=classifier_digits", "diffusion=adm"], "is a noisy-image classifier, not a diff"),
    ("plain_classifier", ["model=unet_digits", "diffusion=adm"],
     "is a noisy-image classifier \\(it matches model=classifier_digits\\): give it as classifier=.* "
     "classifier_model=classifier_digits"),
]  # fmt: skip


@pytest.mark.parametrize("checkpoint, overrides, message", BAD)
def test_bad_combinations_are_one_line_before_sampling(
    runs, tmp_path, no_sampling, checkpoint, overrides, message
):
    # "key=@name" is the path of the fixture's file `name`.
    overrides = [f"{o.split('=@')[0]}={runs[o.split('=@')[1]]}" if "=@" in o else o for o in overrides]
    cfg = sample_cfg(f"checkpoint={runs[checkpoint]}", "num_samples=2", *overrides)
    with pytest.raises(UserError, match=message) as info:
        sample(cfg, tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "samples.npz").exists()


@pytest.mark.slow
def test_sample_py_with_a_classifier(runs, tmp_path):
    args = [f"checkpoint={runs['uncond']}", f"classifier={runs['classifier']}", "classifier_scale=5",
            "classes=[4]", "num_samples=2", "hardware=cpu", "solver.steps=4"]  # fmt: skip
    proc = run_script("sample.py", *args, f"hydra.run.dir={tmp_path / 'ok'}", env={"OMP_NUM_THREADS": "1"})
    assert "classifier guidance:" in proc.stdout
    assert read_npz(tmp_path / "ok" / "samples.npz")["arr_1"].tolist() == [4, 4]
    bad = run_script("sample.py", f"checkpoint={runs['classifier']}", "hardware=cpu",
                     f"hydra.run.dir={tmp_path / 'bad'}", check=False)  # fmt: skip
    errors = [line for line in bad.stdout.splitlines() if "[ERROR]" in line]
    assert bad.returncode == 1 and len(errors) == 1 and "give it as classifier=" in errors[0]
    assert "Traceback" not in bad.stdout
