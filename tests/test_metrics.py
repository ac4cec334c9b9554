"""FID, IS and precision / recall against clean-fid, torch-fidelity, prdc and closed forms."""

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance as cleanfid_frechet_distance
from prdc import compute_prdc
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from argrpo.metrics import (
    compute_metrics,
    feature_moments,
    frechet_distance,
    inception_score,
    load_ref_stats,
    precision_recall,
    save_ref_stats,
)


def _features(seed: int, n: int, f: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(f, f)) / np.sqrt(f)  # correlated dimensions, so sigma is not diagonal
    return (shift + scale * rng.normal(size=(n, f)) @ mixing).astype(np.float32)


def _random_probs(seed: int, n: int, c: int, sharpness: float = 3.0) -> np.ndarray:
    logits = sharpness * np.random.default_rng(seed).normal(size=(n, c))
    return torch.from_numpy(logits).softmax(dim=1).numpy()


def test_feature_moments_are_mean_and_unbiased_covariance():
    x = _features(0, 50, 6).astype(np.float64)
    mu, sigma = feature_moments(x)
    centred = x - x.mean(axis=0)
    np.testing.assert_allclose(mu, x.mean(axis=0))
    np.testing.assert_allclose(sigma, centred.T @ centred / 49)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_moments(x[:1])


# (n_a, n_b, F): F > N makes both covariances singular, the case that needs the sqrtm fallback
@pytest.mark.parametrize("n_a, n_b, f", [(300, 200, 16), (500, 400, 64), (40, 60, 128), (30, 30, 100)])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # clean-fid passes scipy's deprecated `disp`
def test_frechet_distance_matches_cleanfid(n_a, n_b, f):
    mu1, sigma1 = feature_moments(_features(n_a, n_a, f))
    mu2, sigma2 = feature_moments(_features(n_b + 1, n_b, f, shift=0.3, scale=1.4))
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    reference = float(cleanfid_frechet_distance(mu1, sigma1, mu2, sigma2))
    assert ours > 0
    assert abs(ours - reference) / reference < 1e-6


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    # for commuting (diagonal) covariances the trace term is sum((sqrt(s1) - sqrt(s2))^2)
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    var1, var2 = rng.uniform(0.5, 2, size=8), rng.uniform(0.5, 2, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance(mu1, np.diag(var1), mu2[:4], np.diag(var2[:4]))


@pytest.mark.parametrize("n, c, splits", [(1000, 10, 10), (997, 25, 7), (64, 10, 1)])
def test_inception_score_matches_torch_fidelity(n, c, splits):
    probs = _random_probs(n, n, c)
    # torch-fidelity takes logits; log-probabilities are logits whose softmax is exactly `probs`
    reference = isc_features_to_metric(torch.from_numpy(np.log(probs)), splits=splits, shuffle=False)
    mean, std = inception_score(probs, splits=splits)
    assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(reference["inception_score_std"], rel=1e-8, abs=1e-12)
    assert 1.0 < mean < c


def test_inception_score_extremes():
    # confident and evenly spread over C classes: KL = log C for every sample, so IS = C exactly
    one_hot = np.eye(5)[np.arange(100) % 5]
    assert inception_score(one_hot, splits=4) == pytest.approx((5.0, 0.0))
    # the same prediction for every sample carries no information: IS = 1
    constant = np.tile(_random_probs(0, 1, 5), (100, 1))
    assert inception_score(constant, splits=10) == pytest.approx((1.0, 0.0))
    with pytest.raises(ValueError, match="splits"):
        inception_score(one_hot[:3], splits=10)


@pytest.mark.parametrize("n_real, n_fake, f, k", [(300, 250, 8, 3), (200, 320, 32, 5), (150, 150, 4, 1)])
def test_precision_recall_matches_prdc_and_torch_fidelity(n_real, n_fake, f, k):
    real = _features(n_real, n_real, f)
    fake = _features(n_fake + 1000, n_fake, f, shift=0.4, scale=0.8)  # partly overlapping manifolds
    # a small chunk size exercises the chunked distance computation
    precision, recall = precision_recall(real, fake, k=k, chunk_size=37)
    prdc = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    assert precision == prdc["precision"]
    assert recall == prdc["recall"]
    fidelity = prc_features_to_metric(
        torch.from_numpy(fake).double(), torch.from_numpy(real).double(), prc_neighborhood=k, verbose=False
    )
    # torch-fidelity averages in float32; 1e-6 is far below one sample's share (1 / N), so this is
    # still an exact match of the counts
    assert precision == pytest.approx(fidelity["precision"], abs=1e-6)
    assert recall == pytest.approx(fidelity["recall"], abs=1e-6)
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0


def test_precision_recall_counts_the_ball_boundary():
    # real points 0..3 on a line with k = 1 all have radius 1; the fake point at 4 lies exactly on
    # the boundary of the ball around 3 and counts, the far cluster at 10..11 does not
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[4.0], [10.0], [10.5], [11.0]])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == 0.25
    # fake radii: 6 for the point at 4 (nearest fake is 10), 0.5 for the cluster; reals 0..3 lie
    # within 6 of 4, so all are covered
    assert recall == 1.0
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(real, fake, k=4)


def test_ref_stats_round_trip(tmp_path):
    features = _features(5, 120, 12)
    probs = _random_probs(5, 120, 10)
    path = tmp_path / "ref" / "stats.npz"
    save_ref_stats(path, features, probs)
    stats = load_ref_stats(path)
    mu, sigma = feature_moments(features)
    np.testing.assert_allclose(stats["mu"], mu)
    np.testing.assert_allclose(stats["sigma"], sigma)
    np.testing.assert_allclose(stats["std"], np.sqrt(np.diag(sigma)))
    np.testing.assert_array_equal(stats["features"], features)
    np.testing.assert_array_equal(stats["probs"], probs.astype(np.float32))
    assert set(np.load(path).files) == {"mu", "sigma", "features", "probs"}  # std is derived, not stored


def test_ref_stats_loads_moments_only_files_and_names_problems(tmp_path):
    # clean-fid and the ADM evaluator store only the moments (plus keys of their own)
    mu, sigma = feature_moments(_features(6, 50, 4))
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, mu_s=mu)
    stats = load_ref_stats(tmp_path / "adm.npz")
    assert set(stats) == {"mu", "sigma", "std"}
    np.savez(tmp_path / "broken.npz", mu=mu)
    with pytest.raises(KeyError, match="sigma"):
        load_ref_stats(tmp_path / "broken.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_ref_stats(tmp_path / "missing.npz")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compute_metrics_combines_the_parts():
    real = _features(7, 200, 16)
    fake = _features(8, 180, 16, shift=0.2)
    probs = _random_probs(8, 180, 10)
    ref_mu, ref_sigma = feature_moments(real)
    metrics = compute_metrics(real, fake, probs, ref_mu, ref_sigma, k=3, splits=5)
    assert set(metrics) == {"fid", "is", "is_std", "precision", "recall"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["fid"] == pytest.approx(
        float(cleanfid_frechet_distance(*feature_moments(fake), ref_mu, ref_sigma))
    )
    assert (metrics["is"], metrics["is_std"]) == inception_score(probs, splits=5)
    assert (metrics["precision"], metrics["recall"]) == precision_recall(real, fake, k=3)
