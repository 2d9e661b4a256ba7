"""Sample quality as OpenAI's guided-diffusion evaluator reports it: FID, sFID, Inception Score, precision, recall.

    python -m diffusion.evaluate REF_BATCH.npz SAMPLE_BATCH.npz [--inception-weights PATH]
    python -m diffusion.evaluate --features digits [REF_BATCH.npz] SAMPLE_BATCH.npz

Batches are ``.npz`` files with ``arr_0`` uint8 [N x H x W x C] images (see :mod:`diffusion.evaluation.batch_files`); a
reference batch may carry precomputed statistics (OpenAI's published reference batches work as they are). The
reference images are always read: precision and recall compare the samples with them. Printed, as OpenAI's
evaluator prints them: ``Inception Score: <float>``, ``FID: <float>``, ``sFID: <float>``, ``Precision: <float>``,
``Recall: <float>``.

Feature sets (``--features``):

- ``inception`` (default): ADM's Inception-v3 features (:mod:`diffusion.evaluation.inception`);
- ``digits``: the digit judge's features (:class:`diffusion.evaluation.digit_judge.DigitFeatures`), for the built-in 8x8
  digits run; the reference defaults to the real digits the judge never saw, and the judge's accuracy report
  is printed too.

The computation is :class:`diffusion.evaluation.evaluator.Evaluator`: ``extract`` turns uint8 images
into features on any rank, ``compute_metrics`` turns the gathered features into {fid, sfid, is, precision,
recall} against the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Mapping

import torch

from diffusion.errors import ConfigError, UserError
from diffusion.evaluation.batch_files import check_same_format, open_batch
from diffusion.evaluation.evaluator import FEATURE_SETS, METRICS, PRINTED, Evaluator, Reference
from diffusion.evaluation.metrics import DISTANCE_PRECISIONS

__all__ = ["METRICS", "Evaluator", "Reference", "format_metrics", "main", "run"]


def format_metrics(metrics: Mapping[str, float]) -> str:
    """The five lines OpenAI's evaluator prints (``FID: 12.3...``), Python's float repr for each value."""
    return "\n".join(f"{label}: {float(metrics[key])!r}" for label, key in PRINTED)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.evaluate",
        usage="%(prog)s [--features {inception,digits}] [REF_BATCH] SAMPLE_BATCH [options]",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "batches",
        nargs="+",
        metavar="REF_BATCH SAMPLE_BATCH",
        help="the reference batch and the sample batch (.npz, arr_0 uint8 NHWC); with --features digits the "
        "reference may be left out (the real digits)",
    )
    parser.add_argument("--features", choices=sorted(FEATURE_SETS), default="inception")
    parser.add_argument(
        "--inception-weights", metavar="PATH", help="weights-inception-2015-12-05-6726825d.pth"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="images per feature batch")
    parser.add_argument(
        "--distance-precision",
        choices=DISTANCE_PRECISIONS,
        default="float16",
        help="precision/recall distances: float16 as ADM, or float32",
    )
    parser.add_argument("--no-download", action="store_true", help="never download the Inception weights")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return parser


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    """The command line's work; returns the JSON-ready results."""
    if len(args.batches) > 2:
        raise ConfigError(f"give a reference batch and a sample batch, got {len(args.batches)} files")
    *ref, sample_path = args.batches
    if not ref and args.features != "digits":
        raise ConfigError(
            "give the reference batch first: python -m diffusion.evaluate REF_BATCH.npz SAMPLE_BATCH.npz "
            "(or --features digits to compare with the real digits)"
        )
    evaluator = Evaluator(
        features=args.features,
        inception_weights=args.inception_weights,
        reference=ref[0] if ref else None,
        device=args.device,
        batch_size=args.batch_size,
        distance_precision=args.distance_precision,
        download_weights=not args.no_download,
        progress=sys.stderr.isatty(),
    )
    reference = evaluator.open_reference()  # check both files before the slow part
    sample = open_batch(sample_path, role="sample batch", min_images=evaluator.nearest_k + 1)
    if reference is not None:
        check_same_format(reference, sample)
    dims = evaluator.feature_set.dims
    if len(sample) <= max(dims["pool"], dims["spatial"]):
        _note(
            f"note: {len(sample)} samples for {dims['pool']}-d features: the covariance is singular and FID is "
            f"biased upwards; published numbers use 50,000 samples"
        )
    start = time.perf_counter()
    _note(f"computing reference batch features ({evaluator.feature_set.name})...")
    evaluator.reference()
    _note(f"computing sample batch features ({len(sample)} images)...")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        metrics = evaluator.evaluate_batch(sample)
    for warning in caught:
        _note(f"note: {warning.message}")
    _note(f"done in {time.perf_counter() - start:.1f} s")
    results = {
        "features": evaluator.feature_set.name,
        "reference": evaluator.reference().source,
        "sample": str(sample.path),
        "num_samples": len(sample),
        "distance_precision": evaluator.distance_precision,
        **metrics,
    }
    if args.features == "digits":
        from diffusion.evaluation.digit_judge import judge_samples

        judge = evaluator.feature_set.classifier
        results["digit_judge"] = judge_samples(sample.images(), sample.labels(), judge, path=str(sample.path))
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        results = run(args)
    except UserError as error:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"python -m diffusion.evaluate: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results))
        return 0
    if "digit_judge" in results:
        from diffusion.evaluation.digit_judge import format_report

        print(format_report(results["digit_judge"]))
        print(
            "metrics on the digit judge's features (FID: its 45 decision values; sFID, precision, recall: the 8x8 "
            "pixels; IS: its class probabilities), against " + results["reference"]
        )
    print(format_metrics(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
