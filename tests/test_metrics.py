"""FID, IS and precision/recall against closed forms and brute-force computations."""

import warnings

import numpy as np
import pytest
import torch

from diffusion.evaluation.metrics import (
    FeatureStatistics,
    feature_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    pairwise_squared_distances,
    precision_recall,
)


def _random_covariance(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d + 3))
    return a @ a.T / a.shape[1]


def test_statistics_are_the_mean_and_unbiased_covariance():
    features = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    stats = feature_statistics(torch.from_numpy(features))
    x = features.astype(np.float64)
    np.testing.assert_allclose(stats.mu, x.sum(0) / 50, rtol=1e-12)
    centred = x - x.mean(0)
    np.testing.assert_allclose(stats.sigma, centred.T @ centred / 49, rtol=1e-10)
    assert stats.dim == 6
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(features[:1])


def test_frechet_distance_of_diagonal_covariances_is_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    var1, var2 = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    got = frechet_distance(FeatureStatistics(mu1, np.diag(var1)), FeatureStatistics(mu2, np.diag(var2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_full_covariances_matches_an_eigenvalue_computation():
    rng = np.random.default_rng(2)
    s1, s2 = _random_covariance(rng, 30), _random_covariance(rng, 30)
    mu1, mu2 = rng.standard_normal(30), rng.standard_normal(30)
    # tr sqrt(S1 S2) = sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric, PSD).
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    got = frechet_distance(FeatureStatistics(mu1, s1), FeatureStatistics(mu2, s2))
    assert got == pytest.approx(expected, rel=1e-9)
    # Identical statistics are at distance 0.
    assert abs(frechet_distance(FeatureStatistics(mu1, s1), FeatureStatistics(mu1, s1))) < 1e-9


def test_frechet_distance_with_singular_covariances():
    # Fewer samples than dimensions (as 100 samples of 2048-d features): both covariances have rank 4 of 12.
    rng = np.random.default_rng(3)
    features = rng.standard_normal((5, 12))
    stats = feature_statistics(features)
    assert np.linalg.matrix_rank(stats.sigma) == 4
    shifted = FeatureStatistics(stats.mu + 0.5, stats.sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sqrtm copes without the eps fallback here
        assert frechet_distance(stats, shifted) == pytest.approx(12 * 0.25, rel=1e-7)


def test_a_product_without_a_square_root_takes_adms_eps_fallback():
    # [[0, 1], [0, 0]] has no square root: sqrtm returns inf, and ADM adds eps to both diagonals. Then
    # sqrtm((S1 + eps I)(I + eps I)) = sqrt(1 + eps) [[r, 1 / (2r)], [0, r]] with r = sqrt(eps): trace
    # 2 sqrt(eps (1 + eps)), so FID = 0 + tr S1 + tr S2 - 2 * that = 2 - 4 sqrt(eps (1 + eps)).
    eps = 1e-6
    a = FeatureStatistics(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]))
    b = FeatureStatistics(np.zeros(2), np.eye(2))
    with pytest.warns(RuntimeWarning, match="singular"):
        got = frechet_distance(a, b, eps=eps)
    assert got == pytest.approx(2 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_frechet_distance_rejects_statistics_of_different_widths():
    with pytest.raises(ValueError, match="different feature sizes"):
        frechet_distance(FeatureStatistics(np.zeros(3), np.eye(3)), FeatureStatistics(np.zeros(4), np.eye(4)))


def test_inception_score_is_one_for_uniform_predictions():
    assert inception_score(np.zeros((40, 1008))) == pytest.approx(1.0, abs=1e-12)
    # Identical confident predictions carry no information about which image it is either.
    same = np.zeros((40, 1008))
    same[:, 17] = 50.0
    assert inception_score(same) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 7, 10])
def test_inception_score_is_k_for_one_hot_predictions_spread_over_k_classes(k):
    logits = np.zeros((10 * k, 1008), np.float32)
    logits[np.arange(10 * k), np.arange(10 * k) % k * 3] = 200.0  # p(y|x) rounds to one-hot
    assert inception_score(logits) == pytest.approx(k, rel=1e-12)


def test_inception_score_averages_contiguous_splits_of_5000():
    # The first 5,000 images all say class 0 (IS 1 on their own), the next 5,000 spread over 4 classes (IS 4).
    logits = torch.zeros(10000, 1008)
    logits[:5000, 0] = 100.0
    logits[torch.arange(5000, 10000), torch.arange(5000) % 4] = 100.0
    assert inception_score(logits) == pytest.approx((1 + 4) / 2, rel=1e-12)
    # One split of all 10,000: p(y) = (5/8, 1/8, 1/8, 1/8); 6,250 images say class 0, 3,750 another class.
    expected = np.exp(0.625 * np.log(1 / 0.625) + 0.375 * np.log(8))
    assert inception_score(logits, split_size=10000) == pytest.approx(expected, rel=1e-12)


def test_inception_score_matches_adms_formula():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((120, 30)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in (p[:50], p[50:100], p[100:]):
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert inception_score(logits, split_size=50) == pytest.approx(np.mean(scores), rel=1e-12)


def _brute_force_precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Float64, every distance at once: radius = squared distance to the k-th neighbour (the point itself 0th)."""

    def sq_dist(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    ref_radii = np.sort(sq_dist(ref, ref), axis=1)[:, k]
    sample_radii = np.sort(sq_dist(sample, sample), axis=1)[:, k]
    d = sq_dist(ref, sample)  # [N_ref x N_sample]
    precision = np.mean((d <= ref_radii[:, None]).any(axis=0))
    recall = np.mean((d <= sample_radii[None, :]).any(axis=1))
    return float(precision), float(recall)


def _clusters(n: int, d: int, seed: int, centre: float = 0.0) -> np.ndarray:
    """n points around 4 modes (the same modes for every seed), shifted by ``centre``."""
    modes = np.random.default_rng(100).standard_normal((4, d)) * 2
    rng = np.random.default_rng(seed)
    return (centre + modes[rng.integers(0, 4, n)] + rng.standard_normal((n, d))).astype(np.float32)


def test_pairwise_distances_in_fp32_and_fp16():
    u, v = _clusters(30, 16, 0), _clusters(20, 16, 1)
    exact = ((u.astype(np.float64)[:, None] - v.astype(np.float64)[None]) ** 2).sum(-1)
    d32 = pairwise_squared_distances(torch.from_numpy(u), torch.from_numpy(v), "float32")
    np.testing.assert_allclose(d32.numpy(), exact, rtol=1e-4, atol=1e-3)
    d16 = pairwise_squared_distances(torch.from_numpy(u), torch.from_numpy(v), "float16")
    norms = (u**2).sum(1)[:, None] + (v**2).sum(1)[None]
    # fp16 keeps 11 significant bits of the norms the distance is a difference of.
    assert np.all(np.abs(d16.numpy() - exact) <= 4 * 2.0**-11 * norms + 1e-3)
    assert np.all(d16.numpy() >= 0) and d16.dtype == torch.float32
    # |v|^2 near 65504 overflows fp16: the block is computed in fp32 instead, as ADM's graph does.
    big = torch.from_numpy(v * 40)
    assert torch.equal(
        pairwise_squared_distances(torch.from_numpy(u), big, "float16"),
        pairwise_squared_distances(torch.from_numpy(u), big, "float32"),
    )
    with pytest.raises(ValueError, match="float16"):
        pairwise_squared_distances(torch.from_numpy(u), big, "float64")


def test_radii_are_the_kth_neighbour_distance():
    x = _clusters(50, 8, 2)
    expected = np.sort(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1), axis=1)[:, 3]
    for batch_size in (7, 50, 1000):
        radii = manifold_radii(torch.from_numpy(x), k=3, batch_size=batch_size, precision="float32")
        np.testing.assert_allclose(radii.numpy(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="more than 3"):
        manifold_radii(torch.from_numpy(x[:3]))


def test_precision_recall_of_identical_and_of_far_apart_sets():
    x = _clusters(60, 10, 3)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x, precision="float32") == (1.0, 1.0)
    far = _clusters(60, 10, 4, centre=100.0)
    assert precision_recall(x, far) == (0.0, 0.0)


def test_precision_recall_equal_a_brute_force_computation_at_every_batch_size():
    ref, sample = _clusters(120, 12, 5), _clusters(90, 12, 6, centre=0.3)
    expected = _brute_force_precision_recall(ref.astype(np.float64), sample.astype(np.float64))
    assert 0.2 < expected[0] < 0.95 and 0.2 < expected[1] < 0.95  # a case where the answer is not trivial
    for batch_size in (7, 32, 10000):
        assert precision_recall(ref, sample, batch_size=batch_size, precision="float32") == expected
    fp16 = [precision_recall(ref, sample, batch_size=b) for b in (7, 32, 10000)]
    assert fp16[0] == fp16[1] == fp16[2]
    assert abs(fp16[0][0] - expected[0]) < 0.05 and abs(fp16[0][1] - expected[1]) < 0.05


def test_precision_and_recall_are_not_symmetric():
    # Samples from one of the reference's modes: all of them look real (precision 1), but they cover only part
    # of the reference (recall < 1).
    ref = _clusters(200, 6, 7)
    mode = ref[np.argsort(((ref - ref[0]) ** 2).sum(1))[:40]]
    precision, recall = precision_recall(ref, mode, precision="float32")
    assert precision == 1.0 and recall < 0.5
    assert precision_recall(ref, mode, precision="float32") == _brute_force_precision_recall(ref, mode)


def test_precision_recall_reject_features_of_different_widths():
    with pytest.raises(ValueError, match="one width"):
        precision_recall(np.zeros((5, 3)), np.zeros((5, 4)))
