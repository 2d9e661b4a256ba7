"""python -m diffusion.reference: a reference batch of an image folder in OpenAI's format, and bad requests."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data.datasets import ImageFolder
from diffusion.data.images import to_uint8
from diffusion.errors import UserError
from diffusion.evaluation.batch_files import open_batch
from diffusion.evaluation.evaluator import Evaluator
from diffusion.evaluation.inception import WEIGHTS_FILENAME, random_inception_state_dict
from diffusion.evaluation.metrics import feature_statistics
from diffusion.reference import choose_images, write_reference

from conftest import PYTHON, ROOT, compose_cfg


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 RGB images of 20x24 px in two class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            root / f"class{i % 2}/{i}.png"
        )
    return root


def reference_cfg(folder, out, *overrides):
    return compose_cfg(
        [f"data.dir={folder}", "data.image_size=16", "data.num_workers=0", "data.batch_size=4", "hardware=cpu",
         f"out={out}", *overrides],
        config_name="reference",
    )  # fmt: skip


def check_reference(path, folder, indices, evaluator):
    """The file opens as a reference batch; its images are the training crops of ``indices`` (never flipped) and
    its statistics are those of its own images."""
    batch = open_batch(path, role="reference batch")
    images = batch.images()
    assert batch.shape == (len(indices), 16, 16, 3) and batch.feature_set == evaluator.feature_set.name
    dataset = ImageFolder(str(folder), image_size=16, random_flip=False)
    crops = np.concatenate(
        [to_uint8(dataset.load(int(i), np.random.default_rng())[0][None]) for i in indices]
    )
    np.testing.assert_array_equal(images, crops)
    features = evaluator.extract(images)
    for kind, stats in batch.statistics.items():
        ours = feature_statistics(features[kind])
        np.testing.assert_allclose(stats.mu, ours.mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats.sigma, ours.sigma, rtol=1e-6, atol=1e-9)


def test_a_reference_batch_of_an_image_folder_with_digit_features(folder, tmp_path):
    out = tmp_path / "ref.npz"
    assert write_reference(reference_cfg(folder, out, "eval=digits", "num_images=10")) == out
    indices = choose_images(12, 10, seed=0)
    assert len(indices) == 10 and list(indices) != list(range(10))  # a random subset, not the first files
    check_reference(out, folder, indices, Evaluator(features="digits", batch_size=4))


@pytest.mark.slow
def test_a_reference_batch_with_inception_features(folder, tmp_path):
    weights = tmp_path / WEIGHTS_FILENAME
    torch.save(random_inception_state_dict(seed=1), weights)
    out = tmp_path / "ref.npz"
    write_reference(
        reference_cfg(folder, out, "num_images=4", f"eval.inception_weights={weights}", "eval.batch_size=4")
    )
    evaluator = Evaluator(features="inception", inception_weights=weights, batch_size=4)
    check_reference(out, folder, choose_images(12, 4, seed=0), evaluator)
    # The samples of the reference's own images are at FID 0 from it.
    against = Evaluator(features="inception", inception_weights=weights, reference=out, batch_size=4)
    metrics = against.evaluate_batch(open_batch(out))
    assert abs(metrics["fid"]) < 1e-3 and metrics["precision"] == metrics["recall"] == 1.0


def test_choose_images():
    assert list(choose_images(5, 0, seed=0)) == [0, 1, 2, 3, 4]
    a = choose_images(100, 10, seed=3)
    assert list(a) == sorted(set(a)) and len(a) == 10 and list(a) == list(choose_images(100, 10, seed=3))
    assert list(a) != list(choose_images(100, 10, seed=4))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["num_images=13", "eval=digits"], "num_images=13 but the dataset holds 12 images"),
        (["num_images=-1", "eval=digits"], "num_images=-1: give a positive number"),
        (["eval=none"], "eval=none has no features"),
        (["eval=digits", "out=ref.png"], "out=ref.png: name the reference batch file .npz"),
        (["eval=digits", "data.dir=/nonexistent"], "ImageFolder dir does not exist"),
        (
            ["eval.inception_weights=/nonexistent/w.pth"],
            "Inception weights file /nonexistent/w.pth does not exist",
        ),
    ],
)
def test_bad_requests(folder, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        write_reference(reference_cfg(folder, tmp_path / "ref.npz", *overrides))
    assert not (tmp_path / "ref.npz").exists()


@pytest.mark.slow
def test_the_command_line_says_what_is_missing_in_one_line(folder, tmp_path):
    proc = subprocess.run(
        [PYTHON, "-m", "diffusion.reference", f"data.dir={folder}", f"out={tmp_path / 'ref.npz'}", "eval=digits",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stdout
    (line,) = [x for x in proc.stdout.splitlines() if "ERROR" in x]
    assert "give the reference's image size" in line and "data.image_size=64" in line
