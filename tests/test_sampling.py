"""sample.py and diffusion.sample: project checkpoints from the real engine, plain (OpenAI-style) state dicts,
the samples.npz layout, reproducibility over batch sizes and ranks, and bad requests refused before any work."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import diffusion.sample as sampling
from diffusion.data.images import to_uint8
from diffusion.engine.training import train
from diffusion.errors import UserError
from diffusion.sample import SamplingError, load_model, matching_presets, sample
from diffusion.sampling.generate import generate

from conftest import PYTHON, ROOT, TINY, compose_cfg, run_script, tiny_cfg

LAYOUTS = json.loads((ROOT / "tests" / "fixtures" / "reference" / "released_layouts.json").read_text())


def perturb(state_dict: dict, seed: int) -> dict:
    """Weights with visible effect: a new UNet's output layer is zeroed, and a step of training barely moves it."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in state_dict.items()
    }


@pytest.fixture(scope="module")
def project_ckpt(tmp_path_factory) -> Path:
    """A checkpoint written by the engine for a class-conditional model trained with label dropout (CFG)."""
    run = tmp_path_factory.mktemp("train")
    train(tiny_cfg("max_steps=1", "model.label_dropout=0.1", "num_grid_samples=1", "solver.steps=2"), run)
    path = run / "checkpoints" / "latest.pt"
    state = torch.load(path, weights_only=True)
    for rate in state["ema"]:
        state["ema"][rate] = perturb(state["ema"][rate], 0)
    torch.save(state, path)
    return path


def tiny_unet(*overrides: str) -> torch.nn.Module:
    return instantiate(tiny_cfg(*overrides).model)


@pytest.fixture(scope="module")
def plain_files(tmp_path_factory) -> dict[str, Path]:
    """OpenAI-style files: nothing but a tiny UNet's state_dict(); conditional without a null class, and
    unconditional."""
    root = tmp_path_factory.mktemp("plain")
    files = {}
    for name, overrides in {"cond": [], "uncond": ["model.class_cond=false"]}.items():
        torch.manual_seed(0)
        files[name] = root / f"{name}.pt"
        torch.save(perturb(tiny_unet(*overrides).state_dict(), 1), files[name])
    return files


def sample_cfg(*overrides: str):
    return compose_cfg(["hardware=cpu", "solver=ddim", "solver.steps=4", *overrides], config_name="sample")


# The network config the plain files were saved from, as sampling flags (TINY's model overrides).
TINY_MODEL = [o for o in TINY if o.startswith("model")]


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    """Identical up to the network's rounding: the noise is the same bit for bit, but CPU kernels may round
    differently for another batch shape (~1e-4), which can move a rare pixel across a uint8 boundary."""
    diff = np.abs(a.astype(int) - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


# --- project checkpoints ----------------------------------------------------------------------------------------


def test_samples_npz_layout_order_labels_and_grid(project_ckpt, tmp_path):
    cfg = sample_cfg(
        f"checkpoint={project_ckpt}",
        "num_samples=6",
        "batch_size=4",
        "classes=[3,3,7]",
        "solver=dpm_solver",
        "solver.steps=3",
    )
    out = sample(cfg, tmp_path)
    assert out == tmp_path / "samples.npz"
    npz = read_npz(out)
    # images, labels, then what made them: the solver, its options and its network evaluations
    assert set(npz) == {"arr_0", "arr_1", "solver", "solver_options", "network_evaluations"}
    assert str(npz["solver"]) == "dpm_solver" and int(npz["network_evaluations"]) == 3
    assert json.loads(str(npz["solver_options"])) == {"steps": 3, "clip_denoised": True, "spacing": "logsnr"}
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (6, 8, 8, 1)
    assert npz["arr_1"].tolist() == [3, 3, 7, 3, 3, 7]
    # Exactly the images 0..5 in index order: what generate() gives for those indices, batched the same way.
    model, diffusion, _ = load_model(cfg)
    classes = torch.tensor([3, 3, 7, 3, 3, 7])
    expected = [generate(model, diffusion, instantiate(cfg.solver), range(b, min(b + 4, 6)), 0, torch.device("cpu"),
                         classes[b : b + 4]) for b in (0, 4)]  # fmt: skip
    np.testing.assert_array_equal(npz["arr_0"], to_uint8(torch.cat(expected)))
    assert npz["arr_0"].std() > 5  # real images, not a constant
    # grid.png: 3 x 2 tiles of 8 px with 2 px gaps (32 x 22), scaled by 256 // 32 = 8 with nearest neighbours.
    # Grayscale images are repeated into RGB, as torchvision's save_image writes them.
    rgb = np.asarray(Image.open(tmp_path / "grid.png"))
    assert rgb.shape == (22 * 8, 32 * 8, 3) and (rgb == rgb[..., :1]).all()
    grid = rgb[..., 0]
    for k in range(6):
        row, col = divmod(k, 3)
        tile = grid[
            (2 + 10 * row) * 8 : (10 + 10 * row) * 8 : 8, (2 + 10 * col) * 8 : (10 + 10 * col) * 8 : 8
        ]
        np.testing.assert_array_equal(tile, npz["arr_0"][k, ..., 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "samples.npz"]  # no shards left


def test_sampling_keeps_the_memory_layout_its_checkpoint_chose(project_ckpt, tmp_path, caplog):
    # The fixture's run left channels_last to the device (null): sampling takes the CPU default, on.
    cfg = sample_cfg(f"checkpoint={project_ckpt}")
    assert load_model(cfg)[2]["channels_last"] is None
    assert sampling.sampling_hardware(cfg.hardware, None).channels_last is True
    # A recipe that turned it off for its network (experiment=digits) holds for its samples...
    state = torch.load(project_ckpt, weights_only=True)
    run_cfg = OmegaConf.create(state["config"])  # the run's resolved config, stored as YAML
    run_cfg.hardware.channels_last = False
    state["config"] = OmegaConf.to_yaml(run_cfg)
    torch.save(state, tmp_path / "recipe.pt")
    cfg = sample_cfg(f"checkpoint={tmp_path / 'recipe.pt'}", "num_samples=2")
    assert load_model(cfg)[2]["channels_last"] is False
    with caplog.at_level("INFO", logger="diffusion.sample"):
        sample(cfg, tmp_path / "out")
    assert "channels_last=False)" in caplog.text and "channels_last=True" not in caplog.text
    # ...unless the sampling run sets it itself.
    explicit = sample_cfg("hardware.channels_last=true").hardware
    assert sampling.sampling_hardware(explicit, False).channels_last is True


def test_default_classes_cycle_through_all_classes(project_ckpt, tmp_path):
    cfg = sample_cfg(f"checkpoint={project_ckpt}", "num_samples=12", "batch_size=12", "solver.steps=2")
    npz = read_npz(sample(cfg, tmp_path))
    assert npz["arr_1"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_batch_size_4_and_16_give_identical_images(project_ckpt, tmp_path):
    common = [f"checkpoint={project_ckpt}", "num_samples=16", "solver=ddpm", "solver.steps=2", "seed=3"]
    small = read_npz(sample(sample_cfg(*common, "batch_size=4"), tmp_path / "b4"))
    large = read_npz(sample(sample_cfg(*common, "batch_size=16"), tmp_path / "b16"))
    assert_same_images(small["arr_0"], large["arr_0"])
    other_seed = read_npz(sample(sample_cfg(*common, "batch_size=16", "seed=4"), tmp_path / "s4"))
    assert np.abs(other_seed["arr_0"].astype(int) - large["arr_0"]).max() > 20


def test_guidance_uses_the_null_class_of_a_cfg_checkpoint(project_ckpt, tmp_path):
    common = [f"checkpoint={project_ckpt}", "num_samples=4", "solver=dpm_solver", "solver.steps=2"]
    plain = read_npz(sample(sample_cfg(*common), tmp_path / "g1"))["arr_0"]
    guided = read_npz(sample(sample_cfg(*common, "guidance_scale=3"), tmp_path / "g3"))["arr_0"]
    assert np.abs(guided.astype(int) - plain).mean() > 1
    model, diffusion, _ = load_model(sample_cfg(*common))
    x = generate(model, diffusion, instantiate(sample_cfg(*common).solver), range(4), 0, torch.device("cpu"),
                 torch.arange(4), guidance_scale=3.0)  # fmt: skip
    np.testing.assert_array_equal(guided, to_uint8(x))


@pytest.mark.slow
def test_sample_py_progress_summary_and_two_ranks_match_one(project_ckpt, tmp_path):
    args = [f"checkpoint={project_ckpt}", "num_samples=5", "batch_size=2", "solver=ddpm", "solver.steps=3",
            "hardware=cpu", "classes=[1,4]"]  # fmt: skip
    one = run_script("sample.py", *args, f"hydra.run.dir={tmp_path / 'one'}", env={"OMP_NUM_THREADS": "1"})
    assert "sampling: 100%" in one.stdout and "5/5" in one.stdout  # the progress bar over images
    assert "5 samples from" in one.stdout and "images/s on 1 rank(s)" in one.stdout
    two = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "sample.py"),
         *args, f"hydra.run.dir={tmp_path / 'two'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert two.returncode == 0, two.stdout[-4000:]
    assert "images/s on 2 rank(s)" in two.stdout
    a, b = read_npz(tmp_path / "one" / "samples.npz"), read_npz(tmp_path / "two" / "samples.npz")
    assert a["arr_0"].shape == (5, 8, 8, 1)
    assert_same_images(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert not list((tmp_path / "two").glob(".shard_*"))


# --- plain state dicts (OpenAI's releases) -------------------------------------------------------------------------


def test_plain_state_dict_samples_with_model_and_diffusion_presets(plain_files, tmp_path):
    cfg = sample_cfg(f"checkpoint={plain_files['cond']}", "model=unet_digits", *TINY_MODEL, "diffusion=adm",
                     "num_samples=3")  # fmt: skip
    model, _, info = load_model(cfg)
    reference = tiny_unet()
    reference.load_state_dict(torch.load(plain_files["cond"], weights_only=True))
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert info["step"] is None
    npz = read_npz(sample(cfg, tmp_path))
    assert npz["arr_0"].shape == (3, 8, 8, 1) and npz["arr_1"].tolist() == [0, 1, 2]
    uncond = sample_cfg(f"checkpoint={plain_files['uncond']}", "model=unet_digits", *TINY_MODEL,
                        "model.class_cond=false", "diffusion=adm", "num_samples=2")  # fmt: skip
    # no labels for an unconditional model
    assert set(read_npz(sample(uncond, tmp_path / "u"))) == {
        "arr_0",
        "solver",
        "solver_options",
        "network_evaluations",
    }


def test_half_precision_files_load_as_fp32_weights(plain_files, tmp_path):
    half = {k: v.half() for k, v in torch.load(plain_files["cond"], weights_only=True).items()}
    torch.save(half, tmp_path / "half.pt")
    model, _, _ = load_model(sample_cfg(f"checkpoint={tmp_path / 'half.pt'}", "model=unet_digits", *TINY_MODEL,
                                        "diffusion=adm"))  # fmt: skip
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, half[name].float()), name


@pytest.mark.parametrize(
    "release, presets",
    [
        ("64x64_diffusion", ["unet_64"]),
        ("128x128_diffusion", ["unet_128"]),
        ("256x256_diffusion", ["unet_256"]),
        ("256x256_diffusion_uncond", ["unet_256_uncond", "unet_lsun_bedroom"]),
        ("512x512_diffusion", ["unet_512"]),
        ("lsun_bedroom", ["unet_256_uncond", "unet_lsun_bedroom"]),
    ],
)
def test_matching_presets_recognise_openai_layouts(release, presets):
    layout = {k: torch.empty(shape, device="meta") for k, shape in LAYOUTS[release]["state_dict"].items()}
    assert matching_presets(layout) == presets


# --- bad requests: a clear error before any sampling work ---------------------------------------------------------


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampling work started before the request was checked")

    monkeypatch.setattr(sampling, "generate", refuse)


def test_mismatching_preset_lists_differences_and_the_preset_that_fits(plain_files, tmp_path, no_sampling):
    cfg = sample_cfg(f"checkpoint={plain_files['cond']}", "model=unet_32", "diffusion=adm")
    with pytest.raises(SamplingError) as info:
        sample(cfg, tmp_path)
    message = str(info.value)
    assert "does not fit the chosen model" in message
    assert "302 keys missing from the file, e.g. input_blocks.3.0.in_layers.0.weight" in message
    assert "41 unexpected keys in the file, e.g. label_emb.weight" in message  # unet_32 is unconditional
    assert "input_blocks.0.0.weight: model (128, 3, 3, 3) vs file (32, 1, 3, 3)" in message
    assert message.endswith("The file matches model=unet_digits.")
    assert "\n" not in message


@pytest.mark.parametrize(
    "file, overrides, message",
    [
        (
            "uncond",
            ["model.class_cond=false", "guidance_scale=3"],
            "guidance_scale=3.0 needs .* unconditional",
        ),
        ("cond", ["guidance_scale=2"], "this one has no null class: use guidance_scale=1"),
        (
            "uncond",
            ["model.class_cond=false", "classes=[1]"],
            r"classes=\[1\] given, but the model is uncond",
        ),
        ("cond", ["model.num_classes=12"], "label_emb.weight: model \\(12, 128\\) vs file \\(10, 128\\)"),
        ("uncond", [], r"1 keys missing from the file, e.g. label_emb.weight. No model preset matches it.$"),
    ],
)
def test_bad_plain_requests(plain_files, tmp_path, no_sampling, file, overrides, message):
    cfg = sample_cfg(
        f"checkpoint={plain_files[file]}", "model=unet_digits", *TINY_MODEL, "diffusion=adm", *overrides
    )
    with pytest.raises(UserError, match=message):
        sample(cfg, tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["classes=[3,10]"], r"classes \[10\] are outside the model's range 0..9"),
        (["classes=[-1]"], r"classes \[-1\] are outside"),
        (
            ["solver=ddim", "solver.steps=300"],
            "solver.steps=300 cannot be met .* Nearest counts that work: 250 or 334",
        ),
        (["solver=ddpm", "solver.steps=2000"], "solver.steps=2000 cannot be met .* at most 1000 steps"),
        (["solver=dpm_solver", "solver.steps=1"], "solver.steps=1: must be an integer >= 2"),
        (["solver.eta=-1"], "solver.eta=-1.0: must be >= 0"),
        (["guidance_scale=-2"], "guidance_scale=-2.0: must be >= 0"),
        (["num_samples=0"], "num_samples=0: must be >= 1"),
        (["batch_size=0"], "batch_size=0: must be >= 1"),
        (
            ["model=unet_digits"],
            "carries its own model and diffusion config: drop the model=... and diffusion=",
        ),
        (["diffusion=ddpm"], "carries its own model and diffusion config"),
        (["ema_rate=0.5"], "no EMA with rate 0.5"),
    ],
)
def test_bad_project_requests(project_ckpt, tmp_path, no_sampling, overrides, message):
    cfg = sample_cfg(f"checkpoint={project_ckpt}", "num_samples=2", *overrides)
    with pytest.raises(UserError, match=message) as info:
        sample(cfg, tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "samples.npz").exists()


def test_a_missing_checkpoint_value_is_named(tmp_path, no_sampling):
    with pytest.raises(SamplingError, match="missing required value checkpoint: set it on the command line"):
        sample(sample_cfg(), tmp_path)


def test_plain_state_dict_without_presets_says_which_flags_to_add(plain_files, tmp_path, no_sampling):
    with pytest.raises(SamplingError, match="plain state dict .* e.g. model=unet_256 diffusion=adm"):
        sample(sample_cfg(f"checkpoint={plain_files['cond']}"), tmp_path)


@pytest.mark.slow
def test_sample_py_reports_bad_input_in_one_line(plain_files, tmp_path):
    proc = run_script("sample.py", f"checkpoint={plain_files['cond']}", "model=unet_32", "diffusion=adm",
                      "hardware=cpu", f"hydra.run.dir={tmp_path}", check=False)  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and errors[0].endswith("The file matches model=unet_digits.")
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "samples.npz").exists()
