"""The digit judge, on real held-out digits rendered the way sample.py writes samples."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from diffusion.data.datasets import Digits
from diffusion.data.images import to_uint8
from diffusion.evaluation.digit_judge import (
    DigitFeatures,
    digit_accuracy,
    digit_features,
    format_report,
    judge_samples,
    per_class_accuracy,
    real_digit_images,
    train_digit_classifier,
)


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


def test_report_on_samples_with_and_without_labels(classifier):
    images, labels = _render(classifier.held_out[:100], 16, 1)
    report = judge_samples(images, labels, classifier, path="samples.npz")
    assert report["num_samples"] == 100 and report["accuracy"] > 0.95
    assert sum(report["per_class_count"]) == 100 and sum(report["predicted_counts"]) == 100
    assert set(report["per_class_accuracy"]) == set(np.unique(labels).tolist())
    text = format_report(report)
    assert (
        f"accuracy vs conditioning labels: {report['accuracy']:.4f}" in text and "per-class accuracy" in text
    )

    report = judge_samples(images, None, classifier)  # an unconditional model's samples
    assert "accuracy" not in report and sum(report["predicted_counts"]) == 100
    assert "no arr_1 labels" in format_report(report)


def test_reference_digits_are_the_held_out_ones(classifier):
    images = real_digit_images(classifier)
    assert images.dtype == np.uint8 and images.shape == (450, 8, 8, 1)
    np.testing.assert_allclose(digit_features(images), load_digits().data[classifier.held_out], atol=16 / 255)
    rendered, _ = _render(classifier.held_out, 8, 1)
    np.testing.assert_array_equal(images, rendered)  # as sample.py would write a perfect model's samples


def test_digit_features(classifier):
    images, labels = _render(classifier.held_out[:40], 16, 3)
    features = DigitFeatures(classifier)(torch.from_numpy(images))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "pool": (40, 45),
        "spatial": (40, 64),
        "logits": (40, 10),
    }
    assert all(v.dtype == torch.float32 for v in features.values())
    np.testing.assert_allclose(features["spatial"].numpy(), digit_features(images), rtol=1e-6)
    np.testing.assert_allclose(
        features["pool"].numpy(), classifier.model.decision_function(digit_features(images)), rtol=1e-5
    )
    probabilities = features["logits"].exp()
    torch.testing.assert_close(probabilities.sum(1), torch.ones(40, dtype=torch.float32))
    # The judge's probabilities are confident and right on real digits it never saw.
    assert (probabilities.argmax(1).numpy() == labels).mean() > 0.95 and probabilities.max(
        1
    ).values.mean() > 0.8
