"""Tests of fcr.stats: interval coverage, hand-computed values, and degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from fcr import stats
from fcr.eval.metrics import fid_from_features


def test_bootstrap_ci_basic_and_deterministic() -> None:
    x = np.random.default_rng(0).normal(loc=3.0, size=200)
    est, lo, hi = stats.bootstrap_ci(x, n_boot=1000, seed=1)
    assert est == pytest.approx(x.mean()) and lo < est < hi
    # Width close to the normal-theory interval 2 * 1.96 * s / sqrt(n).
    assert hi - lo == pytest.approx(2 * 1.96 * x.std(ddof=1) / math.sqrt(x.size), rel=0.2)
    assert stats.bootstrap_ci(x, n_boot=1000, seed=1) == (est, lo, hi)
    # The vectorised path and the generic per-resample path agree on the same resamples.
    generic = stats.bootstrap_ci(x, stat=lambda v: float(np.mean(v)), n_boot=1000, seed=1)
    assert generic == pytest.approx((est, lo, hi))
    med = stats.bootstrap_ci(x, stat=np.median, n_boot=500)
    assert med[0] == pytest.approx(np.median(x)) and med[1] <= med[0] <= med[2]


def test_bootstrap_ci_coverage() -> None:
    rng = np.random.default_rng(123)
    reps = 200
    covered = 0
    for i in range(reps):
        _, lo, hi = stats.bootstrap_ci(rng.normal(size=40), n_boot=300, seed=i)
        covered += lo <= 0.0 <= hi
    # Nominal 95 %; binomial sd over 200 repetitions is ~1.5 %, and the percentile bootstrap
    # under-covers slightly at n = 40.
    assert 0.88 <= covered / reps <= 0.99


def test_bootstrap_ci_paired() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(size=100) * 5  # large between-item spread that pairing removes
    a = base + 1.0 + rng.normal(scale=0.3, size=100)
    b = base + rng.normal(scale=0.3, size=100)
    est, lo, hi = stats.bootstrap_ci_paired(a, b, n_boot=1000)
    assert est == pytest.approx(np.mean(a - b)) and lo < 1.0 < hi and lo > 0.8 and hi < 1.2
    with pytest.raises(ValueError):
        stats.bootstrap_ci_paired(a, b[:-1])


def test_bootstrap_metric_one_and_two_sample() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=400)
    est, lo, hi = stats.bootstrap_metric(lambda v: float(np.mean(v)), x, n_boot=400, seed=0)
    assert est == pytest.approx(x.mean()) and lo < 0.0 < hi
    assert hi - lo == pytest.approx(2 * 1.96 / math.sqrt(400), rel=0.25)
    # Two-sample set metric (FD on features): estimate is the metric on the original sets.
    f1 = rng.normal(size=(300, 3))
    f2 = rng.normal(size=(300, 3)) + 1.0  # FD = 3
    est, lo, hi = stats.bootstrap_metric(fid_from_features, f1, n_boot=50, seed=0, y=f2)
    assert est == pytest.approx(fid_from_features(f1, f2))
    assert lo < hi and lo < 3.0 < hi + 0.5


def test_mean_ci_over_seeds() -> None:
    mean, lo, hi = stats.mean_ci_over_seeds([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * sd(=1) / sqrt(3)
    assert mean == 2.0 and lo == pytest.approx(2.0 - half) and hi == pytest.approx(2.0 + half)
    m1, lo1, hi1 = stats.mean_ci_over_seeds([5.0])
    assert m1 == 5.0 and math.isnan(lo1) and math.isnan(hi1)
    with pytest.raises(ValueError):
        stats.mean_ci_over_seeds([])


def test_paired_test_shift_null_and_zero() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=50)
    shifted = stats.paired_test(a + 1.0 + rng.normal(scale=0.2, size=50), a)
    assert shifted["p_t"] < 1e-10 and shifted["p_wilcoxon"] < 1e-6 and shifted["t"] > 0
    assert shifted["mean_diff"] == pytest.approx(1.0, abs=0.1) and shifted["n"] == 50
    # Exactly symmetric differences: no evidence of a shift at all.
    d = rng.normal(size=25)
    null = stats.paired_test(a[:50], a[:50] - np.concatenate([d, -d]))
    assert null["t"] == pytest.approx(0.0, abs=1e-9) and null["p_t"] == pytest.approx(1.0)
    assert null["p_wilcoxon"] > 0.9
    zero = stats.paired_test(a, a)
    assert zero == {"t": 0.0, "p_t": 1.0, "w": 0.0, "p_wilcoxon": 1.0, "mean_diff": 0.0, "n": 50.0}
    # Matches scipy on an ordinary input.
    b = a + 0.1 * rng.normal(size=50)
    assert stats.paired_test(b, a)["p_t"] == pytest.approx(scipy.stats.ttest_rel(b, a).pvalue)


def test_ols_noiseless_and_noisy() -> None:
    x = np.linspace(-2, 5, 12)
    out = stats.ols(3.0 * x - 2.0, x)
    assert out["slope"] == pytest.approx(3.0) and out["intercept"] == pytest.approx(-2.0)
    assert out["r2"] == pytest.approx(1.0) and out["pearson_r"] == pytest.approx(1.0)
    assert out["slope_lo"] == pytest.approx(3.0) and out["slope_hi"] == pytest.approx(3.0) and out["n"] == 12
    rng = np.random.default_rng(5)
    xn = rng.uniform(0, 10, 200)
    noisy = stats.ols(0.5 * xn + 1.0 + rng.normal(size=200), xn)
    assert noisy["slope_lo"] < 0.5 < noisy["slope_hi"] and 0 < noisy["r2"] < 1
    assert noisy["pearson_r"] ** 2 == pytest.approx(noisy["r2"])  # simple regression identity
    with pytest.raises(ValueError):
        stats.ols([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])


def test_relative_change() -> None:
    assert stats.relative_change(90.0, 100.0) == pytest.approx(-10.0)
    assert stats.relative_change(12.0, 10.0) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        stats.relative_change(1.0, 0.0)
