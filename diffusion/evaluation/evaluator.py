"""The evaluator behind ``python -m diffusion.evaluate`` and in-training evaluation: OpenAI's guided-diffusion
metrics (FID, sFID, Inception Score, precision, recall) on a feature set (``inception`` or the digit judge's).

``Evaluator.extract`` turns uint8 images into features on any rank; ``compute_metrics`` turns the gathered
features into {fid, sfid, is, precision, recall} against the reference.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from diffusion.errors import ConfigError
from diffusion.evaluation.batch_files import BatchFile, BatchFileError, check_same_format, open_batch
from diffusion.evaluation.metrics import (
    DISTANCE_PRECISIONS,
    FeatureStatistics,
    exact_fp32,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)

METRICS = ("fid", "sfid", "is", "precision", "recall")
# The lines OpenAI's evaluator prints, in its order, and the metric each shows.
PRINTED = (
    ("Inception Score", "is"),
    ("FID", "fid"),
    ("sFID", "sfid"),
    ("Precision", "precision"),
    ("Recall", "recall"),
)


class FeatureSet(Protocol):
    """What the evaluator measures images with: uint8 [N x H x W x C] images -> {"pool", "spatial", "logits"}.

    FID is computed on "pool", sFID on "spatial", IS on "logits", precision and recall on the kind
    ``precision_recall_on`` names ("pool" in ADM).
    """

    name: str
    dims: Mapping[str, int]
    precision_recall_on: str

    def __call__(self, images: Tensor) -> dict[str, Tensor]: ...

    def to(self, device: torch.device | str) -> FeatureSet: ...

    def default_reference(self) -> np.ndarray | None:
        """uint8 [N x H x W x C] reference images to use when no reference batch is given, or None."""
        ...


def _inception(inception_weights: str | Path | None, download_weights: bool) -> FeatureSet:
    from diffusion.evaluation.inception import InceptionFeatures

    return InceptionFeatures(inception_weights, download=download_weights)


def _digits(inception_weights: str | Path | None, download_weights: bool) -> FeatureSet:
    from diffusion.evaluation.digit_judge import DigitFeatures

    return DigitFeatures()


FEATURE_SETS: dict[str, Callable[[str | Path | None, bool], FeatureSet]] = {
    "inception": _inception,
    "digits": _digits,
}


@dataclass
class Reference:
    """What samples are compared with.

    :param manifold: the reference images' [N x D] features that precision and recall use.
    :param statistics: {"pool": ..., "spatial": ...} statistics (FID and sFID), precomputed or from the images.
    :param source: where it came from, for messages.
    """

    manifold: Tensor
    statistics: dict[str, FeatureStatistics]
    source: str


class Evaluator:
    """
    FID, sFID, IS, precision and recall of uint8 images against a reference, with one feature set.

    :param features: "inception" or "digits" (see the module docstring).
    :param inception_weights: the Inception weights file; None looks in torch hub's cache.
    :param reference: a reference batch file. None: the held-out real digits for "digits"; for "inception" only
        :meth:`extract` works (enough on ranks that do not compute the metrics).
    :param device: where features and distances are computed.
    :param batch_size: images per feature-extraction batch.
    :param distance_precision: "float16" (ADM) or "float32" distances for precision and recall.
    :param nearest_k: the neighbourhood size of precision and recall (ADM: 3).
    :param is_split_size: images per Inception Score split (ADM: 5000).
    :param download_weights: fetch missing Inception weights into torch hub's cache.
    :param progress: show a progress bar over feature batches (stderr).
    """

    def __init__(
        self,
        *,
        features: str = "inception",
        inception_weights: str | Path | None = None,
        reference: str | Path | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        distance_precision: str = "float16",
        nearest_k: int = 3,
        is_split_size: int = 5000,
        download_weights: bool = True,
        progress: bool = False,
    ) -> None:
        if features not in FEATURE_SETS:
            raise ConfigError(f"features must be one of {sorted(FEATURE_SETS)}, got {features!r}")
        if distance_precision not in DISTANCE_PRECISIONS:
            raise ConfigError(
                f"distance_precision must be one of {DISTANCE_PRECISIONS}, got {distance_precision!r}"
            )
        if batch_size < 1 or nearest_k < 1 or is_split_size < 1:
            raise ConfigError(
                f"batch_size, nearest_k and is_split_size must be positive, got {batch_size}, {nearest_k}, "
                f"{is_split_size}"
            )
        self.device = torch.device(device)
        self.feature_set = FEATURE_SETS[features](inception_weights, download_weights).to(self.device)
        self.reference_path = Path(reference) if reference is not None else None
        self.batch_size = batch_size
        self.distance_precision = distance_precision
        self.nearest_k = nearest_k
        self.is_split_size = is_split_size
        self.progress = progress
        self._reference: Reference | None = None
        self._reference_file: BatchFile | None = None

    @torch.no_grad()
    def extract(self, images: np.ndarray | Tensor) -> dict[str, Tensor]:
        """
        Features of images, computed in batches of ``batch_size`` on the evaluator's device, in full fp32
        (no autocast, no TF32) whatever the training around it uses.

        :param images: uint8 [N x H x W x C] images (array or Tensor, any device), C = 1 or 3.
        :return: {"pool": [N x D_pool], "spatial": [N x D_spatial], "logits": [N x K]} float32 Tensors on the
            evaluator's device.
        """
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ConfigError(
                f"images must be uint8 [N x H x W x C] with C = 1 or 3, got {images.dtype} {tuple(images.shape)}"
            )
        parts = []
        with exact_fp32(), torch.autocast(self.device.type, enabled=False):
            for chunk in images.split(self.batch_size):
                parts.append(self.feature_set(chunk.to(self.device)))
        if not parts:
            return {k: torch.zeros(0, d, device=self.device) for k, d in self.feature_set.dims.items()}
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def extract_batches(
        self, batches: Iterable[np.ndarray | Tensor], total: int | None = None
    ) -> dict[str, Tensor]:
        """:meth:`extract` over an iterable of image batches, concatenated; ``total`` sizes the progress bar."""
        from tqdm.auto import tqdm

        parts = []
        with tqdm(total=total, unit="img", disable=not self.progress, file=sys.stderr, leave=False) as bar:
            for batch in batches:
                parts.append(self.extract(batch))
                bar.update(len(batch))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _check_statistics(self, batch: BatchFile) -> None:
        name = self.feature_set.name
        if batch.feature_set is not None and batch.feature_set != name:
            raise BatchFileError(
                f"{batch.role} {batch.path} holds statistics of {batch.feature_set} features, not {name}: "
                f"evaluate with --features {batch.feature_set} or write the reference batch again"
            )
        for kind, stats in (batch.statistics or {}).items():
            if stats.dim != self.feature_set.dims[kind]:
                raise BatchFileError(
                    f"{batch.role} {batch.path} has {kind} statistics of {stats.dim} dims but {name} features "
                    f"have {self.feature_set.dims[kind]}: they were made with other features; remove mu, sigma, "
                    f"mu_s, sigma_s (they are then computed from arr_0) or use the matching --features"
                )

    def open_reference(self) -> BatchFile | None:
        """The checked reference batch file (None for the built-in digits reference)."""
        if self.reference_path is None:
            return None
        if self._reference_file is None:
            batch = open_batch(self.reference_path, role="reference batch", min_images=self.nearest_k + 1)
            self._check_statistics(batch)
            self._reference_file = batch
        return self._reference_file

    def reference_images(self) -> tuple[Iterator[np.ndarray], int]:
        """The reference images as uint8 [B x H x W x C] batches of ``batch_size``, and how many there are: the
        reference batch file's, or the feature set's built-in reference."""
        batch = self.open_reference()
        if batch is not None:
            return batch.batches(self.batch_size), len(batch)
        images = self.feature_set.default_reference()
        if images is None:
            raise ConfigError(
                f"{self.feature_set.name} features need a reference batch (e.g. OpenAI's "
                f"VIRTUAL_imagenet64_labeled.npz, or one written by python -m diffusion.reference)"
            )
        batches = (images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size))
        return batches, len(images)

    def reference(self) -> Reference:
        """The reference, computed on first use and kept (its features take as long as the samples')."""
        if self._reference is None:
            batches, count = self.reference_images()
            self.use_reference_features(self.extract_batches(batches, total=count))
        return self._reference

    def use_reference_features(self, features: Mapping[str, Tensor]) -> Reference:
        """
        Set the reference from the features of :meth:`reference_images` computed elsewhere (the training
        engine spreads them over its ranks); precomputed statistics in the reference file take precedence.

        :param features: {"pool", "spatial", "logits"} [N x D] Tensors of all reference images, in order.
        """
        batch = self.open_reference()
        if batch is None:
            stats, source = None, f"the built-in {self.feature_set.name} reference"
        else:
            stats, source = batch.statistics, str(batch.path)
        if stats is None:
            stats = {kind: feature_statistics(features[kind]) for kind in ("pool", "spatial")}
        manifold = features[self.feature_set.precision_recall_on].to(self.device)
        self._reference = Reference(manifold=manifold, statistics=stats, source=source)
        return self._reference

    def to(self, device: torch.device | str) -> Evaluator:
        """Move the feature network (and a computed reference) to ``device``; returns self."""
        self.device = torch.device(device)
        self.feature_set = self.feature_set.to(self.device)
        if self._reference is not None:
            self._reference.manifold = self._reference.manifold.to(self.device)
        return self

    def compute_metrics(self, features: Mapping[str, Tensor | np.ndarray]) -> dict[str, float]:
        """
        The five numbers for gathered sample features (the output of :meth:`extract`, all ranks concatenated).

        :return: {"fid", "sfid", "is", "precision", "recall"} as floats.
        """
        reference = self.reference()
        manifold = features[self.feature_set.precision_recall_on]
        count = len(manifold)
        if count < self.nearest_k + 1:
            raise ConfigError(
                f"{count} samples: precision and recall need at least {self.nearest_k + 1} (each sample's "
                f"{self.nearest_k} nearest neighbours); evaluate more samples"
            )
        stats = {kind: feature_statistics(features[kind]) for kind in ("pool", "spatial")}
        precision, recall = precision_recall(
            reference.manifold,
            manifold,
            k=self.nearest_k,
            precision=self.distance_precision,
            device=self.device,
        )
        return {
            # ADM's order: the samples' statistics first.
            "fid": frechet_distance(stats["pool"], reference.statistics["pool"]),
            "sfid": frechet_distance(stats["spatial"], reference.statistics["spatial"]),
            "is": inception_score(features["logits"], split_size=self.is_split_size),
            "precision": precision,
            "recall": recall,
        }

    def evaluate_batch(self, sample: BatchFile) -> dict[str, float]:
        """The metrics of a sample batch file (checked against the reference's image format first)."""
        reference = self.open_reference()
        if reference is not None:
            check_same_format(reference, sample)
        return self.compute_metrics(self.extract_batches(sample.batches(self.batch_size), total=len(sample)))
