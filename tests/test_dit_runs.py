"""DiT through the usual commands: pixel-space and latent-space runs train, resume exactly and sample; the latent
cache command's cache is read by training and refused when it was made otherwise; a `-m` sweep trains a UNet and
a DiT side by side."""

from __future__ import annotations

import math
import os
import subprocess

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from test_latent import save_tiny_vae

from diffusion.engine.training import train

from conftest import PYTHON, ROOT, assert_state_equal, compose_cfg, load_ckpt, run_script

# DiT-S/2's preset, narrow and shallow, with label dropout (guidance), a short cosine process and two EMAs.
TINY_DIT = [
    "model=dit_s_2", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.class_dropout_prob=0.2",
    "diffusion.noise_schedule=cosine", "diffusion.steps=8", "optim.ema_rates=[0.9,0.99]", "optim.lr=1e-3",
]  # fmt: skip
RUN = ["data=digits", "data.batch_size=8", "hardware=cpu", "logger=none", "log_every=1", "save_every=0",
       "num_grid_samples=2", "solver.steps=4"]  # fmt: skip
KEYS = ("model", "ema", "optimizer", "scheduler", "scaler", "sampler", "data", "rng", "step")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vaes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vaes")
    return {"vae": save_tiny_vae(root / "vae"), "other": save_tiny_vae(root / "other", seed=1)}


def latent_cache_command(*args: str) -> str:
    """`python -m diffusion.latent_cache ARGS` as a user runs it; returns its output."""
    proc = subprocess.run(
        [PYTHON, "-m", "diffusion.latent_cache", *args], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def latent(vae: str, *extra: str) -> list[str]:
    """A latent run on the tiny VAE's 4x4x4 latents of 8x8 RGB digits."""
    return ["model.input_size=4", "data.channels=3", "data.latent=true", f"vae.name_or_path={vae}", *extra]


def assert_resume_is_exact(tmp_path, overrides: list[str]) -> None:
    """4 steps in one go == 2 steps, stop, resume for 2: bit-identical weights, EMAs, optimizer, RNG, data."""
    train(compose_cfg([*TINY_DIT, *RUN, *overrides, "max_steps=4"]), tmp_path / "straight")
    train(compose_cfg([*TINY_DIT, *RUN, *overrides, "max_steps=2"]), tmp_path / "resumed")
    train(compose_cfg([*TINY_DIT, *RUN, *overrides, "max_steps=4"]), tmp_path / "resumed")
    a = load_ckpt(tmp_path / "straight/checkpoints/latest.pt")
    b = load_ckpt(tmp_path / "resumed/checkpoints/latest.pt")
    for key in KEYS:
        assert_state_equal(a[key], b[key], key)
    assert a["step"] == 4 and (tmp_path / "straight/samples/step_00000004.png").is_file()


def sample_py(tmp_path, ckpt, *extra: str) -> dict[str, np.ndarray]:
    run_script("sample.py", f"checkpoint={ckpt}", "num_samples=4", "batch_size=2", "hardware=cpu",
               "solver=dpm_solver", "solver.steps=3", "guidance_scale=2", *extra, f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert (tmp_path / "grid.png").is_file()
    with np.load(tmp_path / "samples.npz") as npz:
        return {k: npz[k] for k in npz.files}


def test_a_pixel_space_dit_trains_resumes_exactly_and_samples(tmp_path):
    assert_resume_is_exact(tmp_path, ["model.input_size=8"])
    out = sample_py(tmp_path / "samples", tmp_path / "straight/checkpoints/latest.pt", "guidance_style=dit")
    assert out["arr_0"].shape == (4, 8, 8, 1) and list(out["arr_1"]) == [0, 1, 2, 3]


def test_a_latent_space_dit_trains_resumes_exactly_and_samples_decoded(tmp_path, vaes):
    assert_resume_is_exact(tmp_path, latent(vaes["vae"]))  # encoded on the fly
    out = sample_py(tmp_path / "samples", tmp_path / "straight/checkpoints/latest.pt")  # no VAE flags
    assert out["arr_0"].shape == (4, 8, 8, 3)  # decoded from 4x4x4 latents
    grid = np.asarray(Image.open(tmp_path / "straight/samples/step_00000004.png"))
    assert grid.ndim == 3 and grid.shape[-1] == 3  # the training grid is decoded too


def test_the_latent_cache_command_feeds_training_and_a_cache_made_otherwise_is_refused(tmp_path, vaes):
    cache = tmp_path / "cache"
    data = ["data=digits", "data.channels=3", f"vae.name_or_path={vaes['vae']}", f"data.latent_cache={cache}"]
    # data.image_size follows model= as in training: input_size 4 x the tiny VAE's 2 = 8 px.
    out = latent_cache_command(*data, "model=dit_s_2", "model.input_size=4", "hardware=cpu",
                               f"hydra.run.dir={tmp_path / 'write'}")  # fmt: skip
    assert "wrote the latent cache" in out and (cache / "meta.json").is_file()
    again = latent_cache_command(
        *data, "data.image_size=8", "hardware=cpu", f"hydra.run.dir={tmp_path / 'write'}"
    )
    assert "reused the latent cache" in again

    assert_resume_is_exact(tmp_path, latent(vaes["vae"], f"data.latent_cache={cache}"))
    trained = run_script("train.py", *TINY_DIT, *RUN, *latent(vaes["vae"], f"data.latent_cache={cache}"),
                         "max_steps=1", f"hydra.run.dir={tmp_path / 'cli'}")  # fmt: skip
    assert f"latents of 1797 images from the cache {cache}" in trained.stdout

    folder = tmp_path / "folder"
    for k in range(4):
        (folder / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(folder / f"c{k % 2}/{k}.png")
    refusals = {
        "another VAE": ([f"vae.name_or_path={vaes['other']}"], "vae.fingerprint"),
        "another image size": (["model.input_size=8"], "image_size 8 (cache) vs 16 (now)"),
        "another data set": (
            ["data=image_folder", f"data.dir={folder}", "data.random_flip=false", "data.batch_size=2"],
            "dataset.class 'diffusion.data.datasets.Digits' (cache) vs 'diffusion.data.datasets.ImageFolder' (now)",
        ),
    }
    for case, (change, message) in refusals.items():
        proc = run_script("train.py", *TINY_DIT, *RUN, *latent(vaes["vae"], f"data.latent_cache={cache}"), *change,
                          "max_steps=1", f"hydra.run.dir={tmp_path / case}", check=False)  # fmt: skip
        assert proc.returncode == 1, case
        errors = [line for line in proc.stdout.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and message in errors[0] and "rebuild=true" in errors[0], (case, proc.stdout)
        assert "Traceback" not in proc.stdout and not (tmp_path / case / "checkpoints").exists(), case


def test_a_sweep_trains_a_unet_and_a_dit_in_one_command(tmp_path):
    run_script("train.py", "-m", "model=unet_digits,dit_digits", "data=digits", "data.batch_size=8",
               "hardware=cpu", "logger=none", "max_steps=1", "save_every=0", "num_grid_samples=1",
               "solver.steps=2", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    targets = []
    for job in ("0", "1"):
        state = load_ckpt(tmp_path / job / "checkpoints/latest.pt")
        assert state["step"] == 1
        targets.append(OmegaConf.create(state["model_config"])._target_)
    assert targets == ["diffusion.models.unet.UNetModel", "diffusion.models.dit.DiT"]


def test_a_latent_model_is_evaluated_on_its_decoded_images(tmp_path, vaes):
    """The in-training evaluation scores what the VAE decodes (8x8 RGB digits), not the 4x4x4 latents."""
    cfg = compose_cfg(
        [*TINY_DIT, *RUN, *latent(vaes["vae"]), "max_steps=1", "eval=digits", "eval.num_samples=20"]
    )
    metrics = train(cfg, tmp_path)
    assert {"eval/fid", "eval/sfid", "eval/is", "eval/precision", "eval/recall"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in ("eval/fid", "eval/sfid", "eval/is"))
    assert (tmp_path / "checkpoints/best.pt").is_file()
