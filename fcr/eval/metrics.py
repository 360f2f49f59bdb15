"""Image-generation metrics, as plain functions on features / probabilities.

Two settings share the same set-level formulas:

* embedded (Fashion-MNIST 1x32x32 in [-1, 1]): features and class probabilities come from the
  project's own classifier (:mod:`fcr.eval.classifier`); metric columns are suffixed with the
  extractor name (``fd_fashioncnn``, ``kid_fashioncnn``, ...). Prompt alignment (the stand-in
  for CLIPScore) is the classifier's accuracy / probability on the prompted class.
* Stable Diffusion (PIL images / folders): clean-fid Inception features and open_clip CLIPScore,
  in :mod:`fcr.eval.sd_metrics`. An Inception Score for SD images is not implemented.

Conventions: features are ``(N, D)`` arrays or tensors; everything is computed in float64 on
CPU unless stated otherwise; functions return Python floats / numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg
import torch
from scipy.special import rel_entr

if TYPE_CHECKING:  # heavy / optional imports only for type checkers
    pass

__all__ = [
    "DEFAULT_EXTRACTOR_NAME",
    "fd_infinity",
    "fid_from_features",
    "feature_statistics",
    "frechet_distance",
    "FrechetToReference",
    "inception_score",
    "kid",
    "metrics_from_features",
    "precision_recall",
    "prompt_alignment",
]

DEFAULT_EXTRACTOR_NAME = "fashioncnn"
ArrayLike = np.ndarray | torch.Tensor | Sequence[Sequence[float]]


def _as_2d_float64(x: ArrayLike, what: str) -> np.ndarray:
    """(N, D) float64 numpy copy of features; rejects other ranks and non-finite values."""
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{what} must be (N, D), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains non-finite values")
    return a


# ----------------------------------------------------------------------------- Fréchet distance


def feature_statistics(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features (N >= 2)."""
    f = _as_2d_float64(feats, "feats")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
    # atleast_2d: np.cov returns a 0-d array for D == 1.
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``. As in the standard FID
    code, ``eps * I`` is added to both covariances when the matrix square root is not finite
    (near-singular product), and a numerically complex root is accepted only if the imaginary
    part of its diagonal is negligible.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > 1e-3:
            raise ValueError(f"matrix square root has a significant imaginary component ({max_imag:.3g})")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    # The exact value is >= 0; tiny negatives are sqrtm round-off for (nearly) identical sets.
    return max(value, 0.0)


class FrechetToReference:
    """Fréchet distance of feature sets to one fixed reference Gaussian, for many sets (bootstrap).

    Exactly :func:`frechet_distance` to ``N(mu_ref, sigma_ref)``, computed without ``sqrtm``:
    ``Tr (Σ Σ_ref)^(1/2)`` is the sum of the square roots of the eigenvalues of ``S Σ S`` with
    ``S = Σ_ref^(1/2)`` (similar matrices), and for ``n`` samples the nonzero ones are those of the
    ``n x n`` matrix ``Y Yᵀ``, ``Y = (X − x̄) S / sqrt(n − 1)``. ``S`` is computed once (eigh), so one
    set costs a ``(n, D) @ (D, D)`` product and an ``n x n`` eigensolve: ~100x less than ``sqrtm``
    of ``D x D`` products for D = 128, n = 32, where the small BLAS calls of the old route also
    fought torch's OpenMP threads for the cores.
    """

    def __init__(self, mu_ref: ArrayLike, sigma_ref: ArrayLike) -> None:
        self.mu_ref = np.atleast_1d(np.asarray(mu_ref, np.float64))
        sigma_ref = np.atleast_2d(np.asarray(sigma_ref, np.float64))
        w, v = np.linalg.eigh((sigma_ref + sigma_ref.T) / 2)
        self.sqrt_ref = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        self.trace_ref = float(np.trace(sigma_ref))

    def __call__(self, feats: ArrayLike) -> float:
        f = _as_2d_float64(feats, "feats")
        n = f.shape[0]
        if n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {n}")
        mu = f.mean(axis=0)
        centred = f - mu
        y = centred @ self.sqrt_ref / np.sqrt(n - 1)
        eig = np.linalg.eigvalsh(y @ y.T) if n <= f.shape[1] else np.linalg.eigvalsh(y.T @ y)
        tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
        diff = mu - self.mu_ref
        value = float(diff @ diff + (centred * centred).sum() / (n - 1) + self.trace_ref - 2.0 * tr_covmean)
        return max(value, 0.0)


def fd_infinity(feats: ArrayLike, frechet: FrechetToReference, *, n_sizes: int = 10, draws: int = 5,
                min_size: int | None = None, seed: int = 0) -> dict[str, float]:
    """FD extrapolated to infinitely many samples (Chong & Forsyth, "Effectively Unbiased FID", 2020).

    FD's bias falls like ``1/n``: FD of random subsets (without replacement, ``draws`` per size,
    averaged) at ``n_sizes`` sizes evenly spaced in ``1/n`` between ``min_size`` (default: a quarter
    of the set, at least the feature dimension + 2 so every covariance has full rank) and all
    ``len(feats)`` images, then an OLS line ``FD(n) = FD∞ + k / n``. Returns ``fd_inf`` (the
    intercept), its standard error ``fd_inf_se``, ``slope`` ``k``, ``fd_at_n`` (the whole set) and ``n``.
    """
    f = _as_2d_float64(feats, "feats")
    n, d = f.shape
    lo = min_size if min_size is not None else max(n // 4, d + 2)
    if not 2 <= lo < n:
        raise ValueError(f"fd_infinity needs more images than min_size={lo} (feature dimension {d}); got {n}")
    sizes = np.unique(np.round(1.0 / np.linspace(1.0 / lo, 1.0 / n, n_sizes)).astype(int))
    rng = np.random.default_rng(seed)
    values = []
    for size in sizes:
        reps = 1 if size == n else draws
        values.append(np.mean([frechet(f[rng.choice(n, size=size, replace=False)]) for _ in range(reps)]))
    x = 1.0 / sizes
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.asarray(values), rcond=None)
    resid = np.asarray(values) - design @ coef
    dof = max(len(x) - 2, 1)
    cov = (resid @ resid / dof) * np.linalg.inv(design.T @ design)
    return {"fd_inf": float(coef[0]), "fd_inf_se": float(np.sqrt(cov[0, 0])), "slope": float(coef[1]),
            "fd_at_n": float(values[-1]), "n": int(n)}


def fid_from_features(f1: ArrayLike, f2: ArrayLike) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets."""
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    return frechet_distance(mu1, s1, mu2, s2)


# ----------------------------------------------------------------------------- KID


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cubic polynomial kernel ``(x.y / d + 1)^3`` of Bińkowski et al. 2018."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(
    f1: ArrayLike, f2: ArrayLike, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 (cubic kernel) averaged over random subsets.

    Each subset draws ``m = min(subset_size, n1, n2)`` rows without replacement from each set.
    Returns ``(mean, std)`` over subsets; the std (ddof=0) is the spread of subset estimates,
    not a standard error. The mean can be slightly negative (the estimator is unbiased).
    """
    x, y = _as_2d_float64(f1, "f1"), _as_2d_float64(f2, "f2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2 or num_subsets < 1:
        raise ValueError(f"need subsets of >= 2 rows and num_subsets >= 1, got m={m}, num_subsets={num_subsets}")
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for i in range(num_subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        kxx, kyy, kxy = _poly_kernel(xs, xs), _poly_kernel(ys, ys), _poly_kernel(xs, ys)
        # Unbiased: within-set sums exclude the diagonal (k(x, x) terms).
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        estimates[i] = within - 2.0 * kxy.mean()
    return float(estimates.mean()), float(estimates.std())


# ----------------------------------------------------------------------------- precision / recall


def _as_tensor64(x: ArrayLike, what: str) -> torch.Tensor:
    return torch.from_numpy(_as_2d_float64(x, what))


def _kth_neighbour_radii(feats: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (the row itself is the 0-th)."""
    radii = [
        torch.cdist(feats[i : i + chunk_size], feats).kthvalue(k + 1, dim=1).values
        for i in range(0, feats.shape[0], chunk_size)
    ]
    return torch.cat(radii)


_RADII_CACHE: dict[tuple[str, int], torch.Tensor] = {}


def _reference_radii(real: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """k-NN radii of the real set, memoised by content: a sweep scores every configuration
    against the same 10k reference features, and recomputing their radii dominated scoring."""
    import hashlib

    key = (hashlib.sha256(real.numpy().tobytes()).hexdigest() + str(tuple(real.shape)), k)
    if key not in _RADII_CACHE:
        if len(_RADII_CACHE) >= 4:
            _RADII_CACHE.pop(next(iter(_RADII_CACHE)))
        _RADII_CACHE[key] = _kth_neighbour_radii(real, k, chunk_size)
    return _RADII_CACHE[key]


def _manifold_coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk_size: int) -> float:
    """Fraction of ``query`` rows inside at least one ball (support[j], radii[j])."""
    inside = [
        (torch.cdist(query[i : i + chunk_size], support) <= radii[None, :]).any(dim=1)
        for i in range(0, query.shape[0], chunk_size)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3, chunk_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points with radius = distance to the
    point's k-th nearest neighbour in the same set (excluding itself). Precision: fraction of
    fake points inside the real manifold; recall: fraction of real points inside the fake
    manifold. Distances are computed in float64 with ``torch.cdist``, ``chunk_size`` rows at a
    time so memory stays ``O(chunk_size * N)``.
    """
    r, f = _as_tensor64(real, "real"), _as_tensor64(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dims differ: {r.shape[1]} vs {f.shape[1]}")
    if k < 1 or min(r.shape[0], f.shape[0]) <= k:
        raise ValueError(f"need k >= 1 and more than k points per set, got k={k}, sizes {r.shape[0]}/{f.shape[0]}")
    real_radii = _reference_radii(r, k, chunk_size)
    fake_radii = _kth_neighbour_radii(f, k, chunk_size)
    precision = _manifold_coverage(f, r, real_radii, chunk_size)
    recall = _manifold_coverage(r, f, fake_radii, chunk_size)
    return precision, recall


# ----------------------------------------------------------------------------- probability metrics


def _as_probs(probs: ArrayLike) -> np.ndarray:
    p = _as_2d_float64(probs, "probs")
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("probs must be non-negative rows summing to 1")
    return p


def inception_score(probs: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` from ``(N, C)`` class probabilities.

    Rows are split in order into ``splits`` contiguous chunks (as in the original code; shuffle
    beforehand if the order is structured); returns mean and std (ddof=0) over chunks.
    """
    p = _as_probs(probs)
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be in [1, N={p.shape[0]}], got {splits}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # rel_entr gives 0 for p == 0, so one-hot rows need no epsilon.
        scores.append(np.exp(rel_entr(part, marginal).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def prompt_alignment(probs: ArrayLike, prompted_labels: ArrayLike) -> dict[str, float]:
    """Top-1 accuracy w.r.t. the prompted class and mean probability assigned to it."""
    p = _as_probs(probs)
    labels = np.asarray(prompted_labels.cpu() if isinstance(prompted_labels, torch.Tensor) else prompted_labels)
    labels = labels.astype(np.int64).reshape(-1)
    if labels.shape[0] != p.shape[0] or labels.min(initial=0) < 0 or labels.max(initial=0) >= p.shape[1]:
        raise ValueError(f"prompted_labels must be {p.shape[0]} ints in [0, {p.shape[1]})")
    return {
        "accuracy": float((p.argmax(axis=1) == labels).mean()),
        "mean_prob": float(p[np.arange(p.shape[0]), labels].mean()),
    }


# ----------------------------------------------------------------------------- embedded setting


def metrics_from_features(
    gen_features: ArrayLike,
    ref_features: ArrayLike,
    gen_probs: ArrayLike | None = None,
    prompted_labels: ArrayLike | None = None,
    *,
    extractor_name: str = DEFAULT_EXTRACTOR_NAME,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    is_splits: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """All set-level metrics from precomputed features (and optionally probabilities).

    Columns: ``fd_/kid_/kid_std_/precision_/recall_<name>``, plus ``is_/is_std_<name>`` when
    ``gen_probs`` is given and ``class_accuracy`` / ``class_prob`` when labels are too, and
    ``n_generated`` / ``n_reference``.
    """
    gen = _as_2d_float64(gen_features, "gen_features")
    ref = _as_2d_float64(ref_features, "ref_features")
    name = extractor_name
    out: dict[str, float] = {"n_generated": float(gen.shape[0]), "n_reference": float(ref.shape[0])}
    out[f"fd_{name}"] = fid_from_features(gen, ref)
    out[f"kid_{name}"], out[f"kid_std_{name}"] = kid(gen, ref, kid_subsets, kid_subset_size, seed)
    out[f"precision_{name}"], out[f"recall_{name}"] = precision_recall(ref, gen, k=pr_k)
    if gen_probs is not None:
        out[f"is_{name}"], out[f"is_std_{name}"] = inception_score(gen_probs, splits=is_splits)
        if prompted_labels is not None:
            align = prompt_alignment(gen_probs, prompted_labels)
            out["class_accuracy"], out["class_prob"] = align["accuracy"], align["mean_prob"]
    elif prompted_labels is not None:
        raise ValueError("prompted_labels given without gen_probs")
    return out
