"""Sample-quality metrics on feature vectors, computed as OpenAI's guided-diffusion evaluator computes them.

The evaluator (``evaluations/evaluator.py`` in openai/guided-diffusion, "ADM" below) reports five numbers; this
module holds the math behind each, independent of which network made the features:

- FID / sFID: :func:`frechet_distance` between the :class:`FeatureStatistics` (mean and covariance) of two
  feature sets, with ``scipy.linalg.sqrtm`` and ADM's fallback for a singular covariance product;
- Inception Score: :func:`inception_score` of the class logits, over contiguous splits of 5,000;
- precision and recall: :func:`precision_recall`, the k-nearest-neighbour manifolds of ADM's
  ``ManifoldEstimator`` (k = 3, squared Euclidean distances, computed in blocks).

Pairwise distances are computed in fp16 by default, like ADM (which falls back to fp32 for a block whose fp16
distances overflow). ``distance_precision="float32"`` computes them in fp32 throughout.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

DISTANCE_PRECISIONS = ("float16", "float32")


class FrechetDistanceError(ArithmeticError):
    """The covariance product's square root came out with a large imaginary part: the statistics are broken."""


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of a set of feature vectors: what FID compares.

    :param mu: a float64 [D] array.
    :param sigma: a float64 [D x D] array.
    """

    mu: np.ndarray
    sigma: np.ndarray

    @property
    def dim(self) -> int:
        return int(np.atleast_1d(self.mu).shape[0])


def feature_statistics(features: np.ndarray | Tensor) -> FeatureStatistics:
    """
    Mean and (unbiased, N - 1) covariance of feature vectors, in float64.

    ADM takes the mean of its float32 features in float32 (``np.mean``) and the covariance in float64
    (``np.cov``); here both are float64, which moves FID by well under 1e-6 relative.

    :param features: an [N x D] array or Tensor, N >= 2.
    """
    if isinstance(features, Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"statistics need an [N x D] feature array with N >= 2, got shape {features.shape}")
    return FeatureStatistics(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False))


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics, eps: float = 1e-6) -> float:
    """
    The Fréchet distance between two Gaussians, |mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrt(S_a S_b)), as ADM
    computes it: when ``sqrtm`` of the product is not finite (a singular product), ``eps`` is added to both
    diagonals and the root taken again; a small imaginary part from rounding is dropped.

    :raises FrechetDistanceError: the root's diagonal has an imaginary part above 1e-3.
    """
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    sigma1, sigma2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics of different feature sizes: mean {mu1.shape} vs {mu2.shape}, covariance "
            f"{sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # ADM asks scipy not to report a singular product (disp=False) and checks the result itself.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"Fréchet distance: the covariance product is singular; adding {eps} to the diagonals",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FrechetDistanceError(
                f"Fréchet distance: sqrtm of the covariance product has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray | Tensor, split_size: int = 5000) -> float:
    """
    exp(E_x KL(p(y|x) || p(y))) with p(y|x) = softmax(logits), averaged over contiguous splits of
    ``split_size`` (ADM's ``compute_inception_score``; the last split may be smaller).

    The log-probabilities come from ``log_softmax`` in float64, so a class probability that underflows
    contributes 0 where ADM's float32 ``p * log(p)`` would give NaN.

    :param logits: an [N x K] array or Tensor of pre-softmax class scores.
    :return: a value in [1, K].
    """
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    logits = logits.detach().to("cpu", torch.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"logits must be a non-empty [N x K] array, got shape {tuple(logits.shape)}")
    if split_size < 1:
        raise ValueError(f"split_size must be a positive number of images, got {split_size}")
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for part in log_p.split(split_size):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))  # log of the split's mean p(y)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Turn off TF32 matrix multiplies and convolutions (which the training hardware may have enabled) for the
    duration: features and distances must be full fp32 to match numbers computed elsewhere."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _squared_norms(x: Tensor, half: bool) -> Tensor:
    if not half:
        return x.square().sum(dim=1)
    # fp16 squares summed with an fp32 accumulator, the sum rounded to fp16 (a GPU half reduction).
    return x.square().half().float().sum(dim=1).half().float()


def pairwise_squared_distances(u: Tensor, v: Tensor, precision: str = "float16") -> Tensor:
    """
    max(|u_i|^2 - 2 u_i.v_j + |v_j|^2, 0) for every pair, ADM's ``_batch_pairwise_distances``.

    With ``precision="float16"`` the inputs are rounded to fp16 and every intermediate (the norms, the dot
    products accumulated in fp32, each sum) is rounded to fp16, as a GPU evaluates ADM's fp16 graph; if any
    distance is not finite (fp16 overflows at 65504) the block is recomputed in fp32, as ADM does.

    :param u: an [N x D] Tensor; ``v``: an [M x D] Tensor on the same device.
    :return: a float32 [N x M] Tensor.
    """
    if precision not in DISTANCE_PRECISIONS:
        raise ValueError(f"distance precision must be one of {DISTANCE_PRECISIONS}, got {precision!r}")
    with exact_fp32():
        if precision == "float16":
            u16, v16 = u.half().float(), v.half().float()
            dots = (u16 @ v16.T).half().float()
            norm_u, norm_v = _squared_norms(u16, True), _squared_norms(v16, True)
            # (|u|^2 - 2 u.v) + |v|^2, each step rounded to fp16 as in the graph.
            d = ((norm_u[:, None] - 2 * dots).half().float() + norm_v[None, :]).half().float()
            d = d.clamp_min(0.0)
            if bool(torch.isfinite(d).all()):
                return d
        u, v = u.float(), v.float()
        d = _squared_norms(u, False)[:, None] - 2 * (u @ v.T) + _squared_norms(v, False)[None, :]
        return d.clamp_min(0.0)


def manifold_radii(
    features: Tensor, k: int = 3, batch_size: int = 10000, precision: str = "float16"
) -> Tensor:
    """
    Squared distance from each feature vector to its k-th nearest neighbour in the same set, the vector itself
    counting as the 0-th (ADM's ``ManifoldEstimator.manifold_radii`` with ``nhood_sizes=(k,)``).

    :param features: an [N x D] Tensor, N > k.
    :param batch_size: rows and columns per distance block; the result does not depend on it.
    :return: a float32 [N] Tensor.
    """
    n = len(features)
    if n <= k:
        raise ValueError(f"the k={k} nearest-neighbour radii need more than {k} feature vectors, got {n}")
    radii = []
    for rows in features.split(batch_size):
        # The k+1 smallest distances of each row seen so far, merged block by block over the columns.
        nearest = None
        for cols in features.split(batch_size):
            d = pairwise_squared_distances(rows, cols, precision)
            if nearest is not None:
                d = torch.cat([nearest, d], dim=1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(
    ref_features: np.ndarray | Tensor,
    sample_features: np.ndarray | Tensor,
    k: int = 3,
    batch_size: int = 10000,
    precision: str = "float16",
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """
    Improved precision and recall (Kynkäänniemi et al. 2019) as ADM computes them: precision is the fraction of
    samples inside some reference ball (a ball around a reference vector with its k-NN radius), recall the
    fraction of reference vectors inside some sample ball. Distances are squared; "inside" is ``<=``.

    :param ref_features: an [N x D] array or Tensor; ``sample_features``: an [M x D] one.
    :param k: the neighbourhood size (ADM: 3).
    :param batch_size: vectors per distance block (ADM: 10,000); the result does not depend on it.
    :param precision: "float16" (ADM) or "float32" distances.
    :param device: where to compute; default: where ``ref_features`` is (CPU for arrays).
    :return: (precision, recall).
    """
    ref, sample = (torch.as_tensor(x) for x in (ref_features, sample_features))
    device = torch.device(device) if device is not None else ref.device
    ref, sample = ref.to(device, torch.float32), sample.to(device, torch.float32)
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise ValueError(
            f"precision/recall need [N x D] feature arrays of one width, got {tuple(ref.shape)} and "
            f"{tuple(sample.shape)}"
        )
    ref_radii = manifold_radii(ref, k, batch_size, precision)
    sample_radii = manifold_radii(sample, k, batch_size, precision)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)  # inside some sample ball
    sample_inside = torch.zeros(len(sample), dtype=torch.bool, device=device)  # inside some reference ball
    for r0 in range(0, len(ref), batch_size):
        r1 = r0 + batch_size
        for s0 in range(0, len(sample), batch_size):
            s1 = s0 + batch_size
            d = pairwise_squared_distances(ref[r0:r1], sample[s0:s1], precision)
            ref_inside[r0:r1] |= (d <= sample_radii[None, s0:s1]).any(dim=1)
            sample_inside[s0:s1] |= (d <= ref_radii[r0:r1, None]).any(dim=0)
    return sample_inside.double().mean().item(), ref_inside.double().mean().item()
