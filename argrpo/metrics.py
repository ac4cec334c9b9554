"""Sample-quality metrics on extracted features: FID, Inception Score, precision / recall.

Everything here works on features and class probabilities already extracted (see
`argrpo.features`), in float64, so the numbers match clean-fid (FID), torch-fidelity (IS) and
Kynkäänniemi et al. 2019 / prdc (precision, recall) on the same inputs.
Reference statistics live in `.npz` files with the keys `mu` and `sigma`, as clean-fid and the ADM
evaluator write them, so their published reference files load here unchanged.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from scipy.special import xlogy

from argrpo.config import Int, require

# reward models the evaluation can average over a configuration's samples (CLIP score and HPSv2 against each
# sample's prompt, the aesthetic predictor on the image alone), at scale 1
EVALUATION_SCORES = ("clip", "hpsv2", "aesthetic")


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate` section."""

    k: Int = 3  # nearest neighbours for precision / recall
    is_splits: Int = 10
    batch_size: Int = 256
    scores: tuple[str, ...] = ()  # mean reward-model scores per configuration (EVALUATION_SCORES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", tuple(self.scores))
        require(self.k >= 1, "k", "must be >= 1", self.k)
        require(self.is_splits >= 1, "is_splits", "must be >= 1", self.is_splits)
        require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        for name in self.scores:
            require(name in EVALUATION_SCORES, "scores", f"must name scores among {', '.join(EVALUATION_SCORES)}",
                    self.scores)
        require(len(set(self.scores)) == len(self.scores), "scores", "must not repeat a score", self.scores)


def feature_moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and full covariance [F, F] (ddof=1, as clean-fid and the ADM evaluator) in float64."""
    features = np.asarray(features, dtype=np.float64)  # features: [N, F]
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, F] with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) with full covariances.

    d² = ||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"moment shapes disagree: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # a singular product (fewer samples than dimensions) can make sqrtm blow up: nudge both
        # covariances off singularity, the standard remedy of the reference implementations
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # the product of two PSD matrices has a real square root; imaginary parts are round-off
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component: {np.abs(covmean.imag).max()}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))): mean and std (ddof=0) over `splits` splits.

    The splits are consecutive slices of the rows in the given order, as the original TF code does.
    """
    probs = np.asarray(probs, dtype=np.float64)  # probs: [N, C], rows are softmax outputs
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {probs.shape}")
    n = probs.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N={n}], got {splits}")
    scores = []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)  # p(y) within the split
        # xlogy makes 0 * log 0 = 0 for classes a sample never predicts
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(points: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    radii = []
    for start in range(0, points.shape[0], chunk_size):
        d = torch.cdist(points[start : start + chunk_size], points)  # d: [chunk, N]
        # the point itself sits at distance 0, so the k-th neighbour is the (k+1)-th smallest
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(
    queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk_size: int
) -> float:
    """Fraction of queries lying in at least one ball (centre_j, radius_j), boundary included."""
    inside = 0
    for start in range(0, queries.shape[0], chunk_size):
        d = torch.cdist(queries[start : start + chunk_size], centres)  # d: [chunk, M]
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(
    real: np.ndarray,
    fake: np.ndarray,
    k: int = 3,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of `fake` against `real` features.

    Each set's manifold is the union of balls reaching every point's k-th nearest neighbour;
    precision is the share of fake points inside the real manifold, recall the share of real
    points inside the fake one. Distances are computed in chunks of rows, so 10k x 10k fits.
    """
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)  # real: [N, F]
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)  # fake: [M, F]
    if real_t.ndim != 2 or fake_t.ndim != 2 or real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(
            f"real and fake must be [N, F] and [M, F], got {tuple(real_t.shape)}, {tuple(fake_t.shape)}"
        )
    if not 1 <= k < min(real_t.shape[0], fake_t.shape[0]):
        raise ValueError(
            f"k must be in [1, min(N, M) - 1], got {k} for N={real_t.shape[0]}, M={fake_t.shape[0]}"
        )
    real_radii = _kth_neighbour_radii(real_t, k, chunk_size)
    fake_radii = _kth_neighbour_radii(fake_t, k, chunk_size)
    precision = _fraction_inside(fake_t, real_t, real_radii, chunk_size)
    recall = _fraction_inside(real_t, fake_t, fake_radii, chunk_size)
    return precision, recall


def save_ref_stats(path: str | Path, features: np.ndarray, probs: np.ndarray | None = None) -> None:
    """Write reference statistics `mu`, `sigma`, `features` (and `probs` if given) to an `.npz`.

    The file is written atomically so a killed stage never leaves a truncated reference behind.
    """
    path = Path(path)
    features = np.asarray(features, dtype=np.float32)  # features: [N, F]
    mu, sigma = feature_moments(features)
    arrays: dict[str, np.ndarray] = {"mu": mu, "sigma": sigma, "features": features}
    if probs is not None:
        arrays["probs"] = np.asarray(probs, dtype=np.float32)  # probs: [N, C]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_ref_stats(path: str | Path) -> dict[str, np.ndarray]:
    """Read reference statistics: `mu` [F], `sigma` [F, F], derived `std` [F], and `features` /
    `probs` when the file has them (clean-fid and ADM files carry only the moments).

    Shapes and finiteness are checked here: a NaN in the reference would turn every FID, and every
    LOO-FID reward and so every weight it updates, into NaN.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        for key in ("mu", "sigma"):
            if key not in data.files:
                raise KeyError(f"reference statistics {path} lack the key {key!r} (found {data.files})")
        stats = {"mu": data["mu"].astype(np.float64), "sigma": data["sigma"].astype(np.float64)}
        for key in ("features", "probs"):
            if key in data.files:
                stats[key] = data[key]
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"reference statistics {path}: mu must be [F] and sigma [F, F], got {mu.shape} and "
                         f"{sigma.shape}")
    for key in ("mu", "sigma", "features"):
        if key in stats and not np.isfinite(stats[key]).all():
            bad = int((~np.isfinite(stats[key])).sum())
            raise ValueError(f"reference statistics {path}: {key} holds {bad} non-finite value(s); recompute the "
                             "file (stage ref_stats)")
    if "features" in stats and (stats["features"].ndim != 2 or stats["features"].shape[1] != mu.shape[0]):
        raise ValueError(f"reference statistics {path}: features must be [N, {mu.shape[0]}], got "
                         f"{stats['features'].shape}")
    # std is derived rather than stored so it can never disagree with sigma
    stats["std"] = np.sqrt(np.clip(np.diagonal(sigma), 0.0, None))
    return stats


def compute_metrics(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    fake_probs: np.ndarray,
    ref_mu: np.ndarray,
    ref_sigma: np.ndarray,
    k: int = 3,
    splits: int = 10,
) -> dict[str, float]:
    """FID of the fakes against the reference moments, their IS, and precision / recall against
    the real features. Returns floats under `fid`, `is`, `is_std`, `precision`, `recall`."""
    mu, sigma = feature_moments(fake_features)
    is_mean, is_std = inception_score(fake_probs, splits=splits)
    precision, recall = precision_recall(real_features, fake_features, k=k)
    return {
        "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
        "is": is_mean,
        "is_std": is_std,
        "precision": precision,
        "recall": recall,
    }
