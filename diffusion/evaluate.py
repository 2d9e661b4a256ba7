"""The project's own evaluation of digit samples: does a class-conditional model draw the digit it was asked for?

    python -m diffusion.evaluate outputs/digits/sample/samples.npz

reads ``arr_0`` (uint8 [N x H x W x C] samples) and ``arr_1`` (the conditioning labels), shrinks each sample
to the 8x8, 0..16 format of scikit-learn's digits, classifies it with an SVM trained on those digits, and prints
the accuracy against the labels, overall and per class, next to the classifier's own held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

NUM_DIGITS = 10


def digit_features(images: np.ndarray) -> np.ndarray:
    """
    Put samples into the classifier's input format: grayscale, 8x8 (area average), values 0..16.

    :param images: a uint8 [N x H x W x C] (C = 1 or 3) or [N x H x W] array.
    :return: a float [N x 64] array.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 (0..255) as samples.npz stores them, got dtype {images.dtype}"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(
            f"images must be a non-empty [N x H x W x C] array with C = 1 or 3 (or [N x H x W]), got shape "
            f"{images.shape}"
        )
    gray = torch.from_numpy(images).float().mean(-1, keepdim=True).permute(0, 3, 1, 2)  # (N, 1, H, W)
    # Area averaging undoes the model's smooth upsampling of the 8x8 digits almost exactly.
    small = F.interpolate(gray, size=(8, 8), mode="area")
    return (small.reshape(len(images), 64) * (16.0 / 255.0)).numpy()


@dataclass
class DigitClassifier:
    """An SVM on scikit-learn's digits, with the indices it was not trained on and its accuracy there."""

    model: SVC
    held_out: np.ndarray  # indices into load_digits() kept out of training
    held_out_accuracy: float

    def predict(self, images: np.ndarray) -> np.ndarray:
        """
        :param images: uint8 samples, as for ``digit_features``.
        :return: an int [N] array of predicted digits.
        """
        return self.model.predict(digit_features(images))


def train_digit_classifier(held_out_fraction: float = 0.25, seed: int = 0) -> DigitClassifier:
    """
    Fit an RBF SVM (C=10, gamma=0.001: about 99% accurate on these digits) on a stratified split of the 1,797
    digits. Takes well under a second.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    digits = load_digits()
    train, held_out = train_test_split(
        np.arange(len(digits.target)), test_size=held_out_fraction, stratify=digits.target, random_state=seed
    )
    model = SVC(C=10.0, gamma=0.001).fit(digits.data[train], digits.target[train])
    accuracy = float(np.mean(model.predict(digits.data[held_out]) == digits.target[held_out]))
    return DigitClassifier(model=model, held_out=np.sort(held_out), held_out_accuracy=accuracy)


def _check_labels(labels: np.ndarray, count: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (count,):
        raise ValueError(f"labels must have shape [{count}] (one per image), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= NUM_DIGITS:
        raise ValueError(
            f"labels must be integer digits 0..9, got dtype {labels.dtype} with values {labels[:10]}"
        )
    return labels


def digit_accuracy(
    images: np.ndarray, labels: np.ndarray, classifier: DigitClassifier | None = None
) -> float:
    """
    Fraction of samples the classifier reads as the digit they were conditioned on.

    :param images: a uint8 [N x H x W x C] or [N x H x W] array of samples.
    :param labels: an int [N] array of conditioning labels.
    :param classifier: reuse a trained classifier; a new one is trained when None.
    """
    labels = _check_labels(labels, len(np.asarray(images)))
    classifier = classifier or train_digit_classifier()
    return float(np.mean(classifier.predict(images) == labels))


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Accuracy among the samples conditioned on each digit; digits with no samples are left out."""
    return {
        int(d): float(np.mean(predictions[labels == d] == d))
        for d in range(NUM_DIGITS)
        if np.any(labels == d)
    }


def evaluate_samples(path: str, classifier: DigitClassifier | None = None) -> dict:
    """
    Evaluate a samples.npz file. Without ``arr_1`` (an unconditional model) only the predicted-class
    histogram is reported.

    :return: a JSON-ready dict: path, num_samples, classifier_held_out_accuracy, predicted_counts and, with
        labels, accuracy and per_class_accuracy.
    """
    with np.load(path) as npz:
        if "arr_0" not in npz:
            raise ValueError(f"{path} has no arr_0 (the uint8 [N x H x W x C] samples); it holds {npz.files}")
        images = npz["arr_0"]
        labels = npz["arr_1"] if "arr_1" in npz else None
    classifier = classifier or train_digit_classifier()
    predictions = classifier.predict(images)
    report = {
        "path": str(path),
        "num_samples": len(predictions),
        "classifier_held_out_accuracy": classifier.held_out_accuracy,
        "predicted_counts": np.bincount(predictions, minlength=NUM_DIGITS).tolist(),
    }
    if labels is not None:
        labels = _check_labels(labels, len(predictions))
        report["accuracy"] = float(np.mean(predictions == labels))
        report["per_class_accuracy"] = per_class_accuracy(predictions, labels)
        report["per_class_count"] = np.bincount(labels, minlength=NUM_DIGITS).tolist()
    return report


def format_report(report: dict) -> str:
    """The report as the few lines a person reads after sampling."""
    lines = [
        f"samples: {report['num_samples']} from {report['path']}",
        f"digit classifier (SVM on scikit-learn digits): held-out accuracy "
        f"{report['classifier_held_out_accuracy']:.4f}",
    ]
    if "accuracy" in report:
        lines.append(f"accuracy vs conditioning labels: {report['accuracy']:.4f}")
        lines.append("per-class accuracy:")
        for digit, accuracy in report["per_class_accuracy"].items():
            lines.append(f"  {digit}: {accuracy:.3f}  ({report['per_class_count'][digit]} samples)")
    else:
        lines.append("no arr_1 labels (unconditional samples): accuracy needs labels")
    lines.append(
        "predicted digit counts: " + " ".join(f"{d}:{c}" for d, c in enumerate(report["predicted_counts"]))
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("samples", help="a samples.npz written by sample.py (arr_0 images, arr_1 labels)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    try:
        report = evaluate_samples(args.samples)
    except (OSError, ValueError) as error:
        parser.error(str(error))  # exits 2 with the usage line
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
