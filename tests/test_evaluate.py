"""The digit evaluation, on real held-out digits rendered the way sample.py writes samples."""

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffusion.data import Digits
from diffusion.evaluate import (
    digit_accuracy,
    digit_features,
    evaluate_samples,
    main,
    per_class_accuracy,
    train_digit_classifier,
)
from diffusion.images import to_uint8


@pytest.fixture(scope="module")
def classifier():
    return train_digit_classifier()


def _render(indices: np.ndarray, image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits as a model trained on Digits(image_size, channels) would emit them: uint8 [N x H x W x C]."""
    ds = Digits(image_size=image_size, channels=channels)
    return to_uint8(ds.images[indices]), ds.targets[indices].numpy()


def test_classifier_is_accurate_on_digits_it_never_saw(classifier):
    digits = load_digits()
    assert len(classifier.held_out) == 450  # a quarter of the 1,797, stratified
    assert classifier.held_out_accuracy > 0.97
    # The held-out digits really were kept out: retraining on a different split changes them.
    assert not np.array_equal(classifier.held_out, train_digit_classifier(seed=1).held_out)
    assert np.bincount(digits.target[classifier.held_out]).min() >= 43  # 174 eights / 4


def test_features_recover_the_digit_values():
    digits = load_digits()
    as_uint8 = np.rint(digits.images[:20] / 16 * 255).astype(np.uint8)
    np.testing.assert_allclose(digit_features(as_uint8), digits.data[:20], atol=16 / 255)
    upsampled = as_uint8.repeat(4, axis=1).repeat(4, axis=2)[..., None].repeat(3, axis=-1)  # 32x32 RGB
    np.testing.assert_allclose(digit_features(upsampled), digit_features(as_uint8), atol=1e-4)


@pytest.mark.parametrize("image_size, channels", [(16, 1), (32, 3)])
def test_rendered_held_out_digits_score_high_and_shuffled_labels_low(classifier, image_size, channels):
    images, labels = _render(classifier.held_out, image_size, channels)
    assert images.dtype == np.uint8 and images.shape == (450, image_size, image_size, channels)
    assert digit_accuracy(images, labels, classifier) > 0.95
    shuffled = np.random.default_rng(0).permutation(labels)
    assert digit_accuracy(images, shuffled, classifier) < 0.3


def test_digit_accuracy_trains_its_own_classifier_when_given_none(classifier):
    images, labels = _render(classifier.held_out[:60], 16, 1)
    assert digit_accuracy(images, labels) == digit_accuracy(images, labels, classifier)


def test_per_class_accuracy_counts_each_conditioning_class():
    predictions = np.array([1, 1, 2, 3, 3, 0])
    labels = np.array([1, 1, 2, 2, 3, 3])
    assert per_class_accuracy(predictions, labels) == {1: 1.0, 2: 0.5, 3: 0.5}


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((4, 8, 8, 1), np.float32), np.zeros(4, int), "uint8"),
        (np.zeros((4, 8, 8, 2), np.uint8), np.zeros(4, int), "C = 1 or 3"),
        (np.zeros((4, 8, 8, 1), np.uint8), np.zeros(3, int), r"shape \[4\]"),
        (np.zeros((4, 8, 8, 1), np.uint8), np.full(4, 10), "digits 0..9"),
    ],
)
def test_bad_inputs_are_named(classifier, images, labels, match):
    with pytest.raises(ValueError, match=match):
        digit_accuracy(images, labels, classifier)


def test_report_from_a_samples_file(classifier, tmp_path, capsys):
    images, labels = _render(classifier.held_out[:100], 16, 1)
    path = tmp_path / "samples.npz"
    np.savez(path, images, labels)
    report = evaluate_samples(str(path), classifier)
    assert report["num_samples"] == 100 and report["accuracy"] > 0.95
    assert sum(report["per_class_count"]) == 100 and sum(report["predicted_counts"]) == 100
    assert set(report["per_class_accuracy"]) == set(np.unique(labels).tolist())
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"accuracy vs conditioning labels: {report['accuracy']:.4f}" in out and "per-class accuracy" in out

    unconditional = tmp_path / "uncond.npz"
    np.savez(unconditional, images)
    report = evaluate_samples(str(unconditional), classifier)
    assert "accuracy" not in report and sum(report["predicted_counts"]) == 100
    assert main([str(unconditional), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predicted_counts"] == report["predicted_counts"]


@pytest.mark.slow  # a fresh interpreter imports torch and scikit-learn: several seconds on 2 cores
def test_command_line_entry_point(classifier, tmp_path):
    images, labels = _render(classifier.held_out[:50], 32, 1)
    path = tmp_path / "samples.npz"
    np.savez(path, images, labels)
    done = subprocess.run(
        [sys.executable, "-m", "diffusion.evaluate", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    accuracy = float(done.stdout.split("accuracy vs conditioning labels:")[1].split()[0])
    assert accuracy > 0.95


def test_missing_file_exits_with_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nope.npz")])
    assert exit_info.value.code == 2 and "nope.npz" in capsys.readouterr().err
