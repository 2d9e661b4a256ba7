"""Bits/dim of a checkpoint (python -m diffusion.nll): the numbers are calc_bpd_loop's on the same images."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.data.datasets import Digits
from diffusion.engine.training import train
from diffusion.errors import UserError
from diffusion.nll import batch_generator, evaluate
from diffusion.sample import load_model

from conftest import PYTHON, ROOT, compose_cfg, tiny_cfg

STEPS = 5  # terms of the bound = network calls per batch; the cosine schedule caps its betas, so 5 is fine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("train")
    overrides = ["diffusion=improved", f"diffusion.steps={STEPS}", "num_grid_samples=1", "solver.steps=2"]
    train(tiny_cfg("max_steps=2", *overrides), run)
    return run / "checkpoints" / "latest.pt"


def nll_cfg(*overrides: str):
    return compose_cfg(["hardware=cpu", "data.batch_size=3", *overrides], config_name="nll")


def direct_bound(checkpoint: Path, indices: list[list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """calc_bpd_loop on the given batches of the digits, called directly with the EMA weights."""
    model, diffusion, _ = load_model(nll_cfg(f"checkpoint={checkpoint}"))
    data = Digits(image_size=8, channels=1)
    out = {"total_bpd": [], "prior_bpd": [], "vb": []}
    for b, batch in enumerate(indices):
        x, y = data.images[batch], data.targets[batch]
        result = diffusion.calc_bpd_loop(model, x, True, {"y": y}, generator=batch_generator(seed, 0, b))
        for k in out:
            out[k].append(result[k].double().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def test_bits_per_dim_equal_calc_bpd_loop_on_the_same_images(checkpoint, tmp_path):
    summary = evaluate(nll_cfg(f"checkpoint={checkpoint}", "num_batches=2"), tmp_path)
    expected = direct_bound(checkpoint, [[0, 1, 2], [3, 4, 5]])
    with np.load(tmp_path / "nll.npz") as npz:
        assert npz["index"].tolist() == list(range(6))  # the dataset in order, not shuffled
        assert npz["vb"].shape == (6, STEPS)
        for key in expected:
            np.testing.assert_allclose(npz[key], expected[key], rtol=1e-6)
    assert summary["num_images"] == 6 and summary["num_terms"] == STEPS and summary["step"] == 2
    assert summary["total_bpd"] == pytest.approx(expected["total_bpd"].mean(), rel=1e-6)
    assert summary["prior_bpd"] == pytest.approx(expected["prior_bpd"].mean(), rel=1e-6)
    # The bound is made of its terms, and an untrained 8x8 model is far from the data: several bits per dim.
    np.testing.assert_allclose(
        expected["total_bpd"], expected["vb"].sum(1) + expected["prior_bpd"], rtol=1e-6
    )
    assert 1 < summary["total_bpd"] < 20


def test_seed_changes_the_noise_and_nothing_else(checkpoint, tmp_path):
    a = evaluate(nll_cfg(f"checkpoint={checkpoint}", "num_batches=1", "seed=1"), tmp_path / "a")
    again = evaluate(nll_cfg(f"checkpoint={checkpoint}", "num_batches=1", "seed=1"), tmp_path / "b")
    other = evaluate(nll_cfg(f"checkpoint={checkpoint}", "num_batches=1", "seed=2"), tmp_path / "c")
    assert a["total_bpd"] == again["total_bpd"]
    assert a["total_bpd"] != other["total_bpd"]
    assert a["prior_bpd"] == other["prior_bpd"]  # the prior term involves no noise


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["num_batches=1000"], r"num_batches=1000: the dataset holds 599 batches of 3; use 1..599, or 0"),
        (["num_batches=-1"], "num_batches=-1"),
        (["data.batch_size=5000"], r"data.batch_size=5000: batch_size must be in \[1, 1797\]"),
        (["data.image_size=16"], "data.image_size=16 but the model takes 8 px images"),
        (["seed=-3"], "seed=-3: must be >= 0"),
        (["model=unet_digits"], "carries its own model and diffusion config"),
        (["data=image_folder"], "missing required value data.dir"),
    ],
)
def test_bad_requests(checkpoint, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        evaluate(nll_cfg(f"checkpoint={checkpoint}", *overrides), tmp_path)
    assert not (tmp_path / "nll.npz").exists()


@pytest.mark.slow
def test_command_line_prints_the_bound(checkpoint, tmp_path):
    import subprocess

    proc = subprocess.run(
        [PYTHON, "-m", "diffusion.nll", f"checkpoint={checkpoint}", "data=digits", "num_batches=1",
         "data.batch_size=4", "hardware=cpu", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    match = re.search(r"total_bpd=([\d.]+) prior_bpd=([\d.]+) over 4 images \(5 terms", proc.stdout)
    assert match, proc.stdout[-3000:]
    expected = direct_bound(checkpoint, [[0, 1, 2, 3]])
    assert float(match.group(1)) == pytest.approx(expected["total_bpd"].mean(), abs=1e-6)
    assert float(match.group(2)) == pytest.approx(expected["prior_bpd"].mean(), abs=1e-6)
    bad = subprocess.run(
        [PYTHON, "-m", "diffusion.nll", f"checkpoint={checkpoint}", "num_batches=9999", "hardware=cpu",
         f"hydra.run.dir={tmp_path / 'bad'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip
    assert bad.returncode == 1 and "Traceback" not in bad.stdout
    assert [line for line in bad.stdout.splitlines() if "[ERROR]" in line][0].endswith("or 0 for all of them")
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
