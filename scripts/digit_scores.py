"""The digits measurements' one scoring routine: a samples.npz scored as ``python -m diffusion.evaluate --features
digits`` scores it (FID, precision, recall on the digit judge's features, against the real digits the judge never
saw), with the judge's accuracy against the requested classes."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from diffusion.evaluate import _parser as evaluate_parser
from diffusion.evaluate import run as evaluate
from diffusion.evaluation.digit_judge import judge_samples


def score(path: Path, judge) -> dict:
    """{"fid", "precision", "recall", "judge_accuracy"} of the samples in ``path``; ``judge``:
    ``digit_judge.train_digit_classifier()``."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        metrics = evaluate(
            evaluate_parser().parse_args(["--features", "digits", str(path), "--device", "cpu"])
        )
    with np.load(path) as npz:
        accuracy = judge_samples(npz["arr_0"], npz["arr_1"], judge)["accuracy"]
    return {
        "fid": float(metrics["fid"]),
        "precision": float(metrics["precision"]),
        "recall": float(metrics["recall"]),
        "judge_accuracy": float(accuracy),
    }
