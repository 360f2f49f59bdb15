"""Statistics for reporting: bootstrap and t intervals, paired tests, multiplicity control (Holm),
the power of paired designs, OLS fits, relative change.

All functions take array-likes and return Python floats (or dicts of floats), so results drop
straight into pandas rows. Randomness comes only from the ``seed`` arguments.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import statsmodels.api as sm

__all__ = [
    "bootstrap_ci",
    "bootstrap_ci_paired",
    "bootstrap_metric",
    "bootstrap_replicates",
    "decide_family",
    "holm",
    "mean_ci_over_seeds",
    "ols",
    "paired_difference",
    "paired_mde",
    "paired_n",
    "paired_test",
    "pareto_mask",
    "relative_change",
]

# Statistics known to reduce along ``axis`` like numpy's: bootstrapped in one vectorised call.
_AXIS_STATS: tuple[Callable[..., Any], ...] = (
    np.mean,
    np.median,
    np.std,
    np.var,
    np.sum,
    np.nanmean,
    np.nanmedian,
)


def _as_1d(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{what} is empty")
    return a


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _percentile_bounds(replicates: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap ``(estimate, lo, hi)`` of ``stat`` over items (resampled with replacement).

    ``estimate`` is ``stat(values)`` on the original sample. Common numpy reductions
    (mean, median, ...) are evaluated vectorised over all resamples at once.
    """
    x = _as_1d(values, "values")
    _check_alpha(alpha)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    if stat in _AXIS_STATS:
        reps = np.asarray(stat(x[idx], axis=1), dtype=np.float64)
    else:
        reps = np.array([float(stat(x[row])) for row in idx])
    return (float(stat(x)), *_percentile_bounds(reps, alpha))


def bootstrap_ci_paired(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Bootstrap CI of ``stat(a - b)`` (default: mean difference), resampling item pairs together."""
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired inputs differ in length: {x.size} vs {y.size}")
    return bootstrap_ci(x - y, stat=stat, n_boot=n_boot, alpha=alpha, seed=seed)


def bootstrap_replicates(
    f: Callable[..., float], x: np.ndarray | Any, n_boot: int = 200, seed: int = 0, y: np.ndarray | Any | None = None
) -> np.ndarray:
    """The ``n_boot`` bootstrap replicates of a set-level metric (see :func:`bootstrap_metric`):
    rows of ``x`` resampled with replacement (and of ``y``, independently, when given). Paired
    designs put both sets' rows side by side in ``x`` so they are resampled together."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    nx = len(x)
    ny = len(y) if y is not None else 0
    reps = np.empty(n_boot)
    for i in range(n_boot):
        xb = x[rng.integers(0, nx, size=nx)]
        reps[i] = f(xb) if y is None else f(xb, y[rng.integers(0, ny, size=ny)])
    return reps


def bootstrap_metric(
    f: Callable[..., float],
    x: np.ndarray | Any,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
    y: np.ndarray | Any | None = None,
) -> tuple[float, float, float]:
    """Percentile bootstrap of a set-level metric: resample rows of ``x`` and recompute ``f``.

    ``f(x)`` (or ``f(x, y)`` when ``y`` is given; then the rows of ``y`` are resampled too,
    independently, for the two-sample case e.g. FD of generated vs reference features).
    Returns ``(f on the original rows, lo, hi)``. ``x``/``y`` may be numpy arrays or tensors.
    The default ``n_boot`` is small because each replicate recomputes the whole metric.

    Caveat: duplicated rows shrink the effective sample, so biased set metrics such as FD are
    shifted upward in the replicates; the interval describes sampling variability, and the
    estimate may lie near or outside its lower end.
    """
    _check_alpha(alpha)
    reps = bootstrap_replicates(f, x, n_boot, seed, y)
    estimate = f(x) if y is None else f(x, y)
    return (float(estimate), *_percentile_bounds(reps, alpha))


def mean_ci_over_seeds(values: Sequence[float] | np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean and Student-t ``1 - alpha`` interval ``(mean, lo, hi)`` across seeds / runs.

    With a single value the bounds are ``nan`` (no variance estimate), not zero-width.
    """
    x = _as_1d(values, "values")
    _check_alpha(alpha)
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = float(scipy.stats.t.ppf(1 - alpha / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def paired_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of ``a`` vs ``b`` (two-sided).

    Returns ``t, p_t, w, p_wilcoxon, mean_diff (a - b), n``. If every difference is exactly
    zero both tests are undefined (0/0); we report ``t = w = 0`` and ``p = 1`` (no evidence
    of a difference) instead of nan. Wilcoxon drops zero differences (scipy's default).
    """
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired inputs differ in length: {x.size} vs {y.size}")
    if x.size < 2:
        raise ValueError("need at least 2 pairs")
    diff = x - y
    out: dict[str, float] = {"mean_diff": float(diff.mean()), "n": float(x.size)}
    if np.all(diff == 0):
        out.update(t=0.0, p_t=1.0, w=0.0, p_wilcoxon=1.0)
        return out
    with warnings.catch_warnings():
        # Constant non-zero differences give t = +-inf, p = 0 with a precision warning: fine.
        warnings.simplefilter("ignore", RuntimeWarning)
        t = scipy.stats.ttest_rel(x, y)
        w = scipy.stats.wilcoxon(x, y)
    out.update(t=float(t.statistic), p_t=float(t.pvalue), w=float(w.statistic), p_wilcoxon=float(w.pvalue))
    return out


def ols(y: Sequence[float] | np.ndarray, x: Sequence[float] | np.ndarray, alpha: float = 0.05) -> dict[str, float]:
    """Simple linear regression ``y = intercept + slope * x`` (statsmodels OLS).

    Returns ``slope, slope_lo, slope_hi`` (``1 - alpha`` CI), ``intercept, r2``, Pearson
    ``pearson_r, pearson_p`` and ``n``. Needs ``n >= 3`` for a CI (else nan bounds).
    """
    yy, xx = _as_1d(y, "y"), _as_1d(x, "x")
    if yy.shape != xx.shape:
        raise ValueError(f"x and y differ in length: {xx.size} vs {yy.size}")
    if xx.size < 2 or np.all(xx == xx[0]):
        raise ValueError("need at least 2 points with distinct x")
    _check_alpha(alpha)
    # has_constant="add": otherwise a constant-looking x would silently lose its intercept column.
    design = sm.add_constant(xx, has_constant="add")
    with warnings.catch_warnings():
        # n == 2 (zero residual df) makes statsmodels warn about division by zero.
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = sm.OLS(yy, design).fit()
        ci = np.asarray(fit.conf_int(alpha=alpha))
    if np.all(yy == yy[0]):
        r, p = math.nan, math.nan  # correlation undefined for constant y
    else:
        pr = scipy.stats.pearsonr(xx, yy)
        r, p = float(pr.statistic), float(pr.pvalue)
    lo, hi = (float(ci[1, 0]), float(ci[1, 1])) if xx.size >= 3 else (math.nan, math.nan)
    return {
        "slope": float(fit.params[1]),
        "slope_lo": lo,
        "slope_hi": hi,
        "intercept": float(fit.params[0]),
        "r2": float(fit.rsquared),
        "pearson_r": r,
        "pearson_p": p,
        "n": float(xx.size),
    }


def relative_change(new: float, ref: float) -> float:
    """Relative change in percent, ``100 * (new - ref) / |ref|`` (e.g. ΔFID %); ``ref`` must be non-zero."""
    if ref == 0:
        raise ValueError("relative change against a zero reference is undefined")
    return 100.0 * (float(new) - float(ref)) / abs(float(ref))


# ----------------------------------------------------------------------------- multiplicity and power


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control over the tests given, in their
    order): ``p_(i)`` times ``m - i + 1`` in ascending order, made monotone, capped at 1. NaN
    p-values (tests that could not be run) stay NaN and do not count towards ``m``."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out[order] = adjusted
    return out


def _paired_z(alpha: float, power: float, sides: int) -> float:
    _check_alpha(alpha)
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1); got {power}")
    if sides not in (1, 2):
        raise ValueError(f"sides must be 1 or 2; got {sides}")
    return float(scipy.stats.norm.ppf(1 - alpha / sides) + scipy.stats.norm.ppf(power))


def paired_mde(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8, sides: int = 2) -> float:
    """Minimal detectable mean difference of a paired design: the true mean of the per-pair
    differences (standard deviation ``sd_diff``) that a level-``alpha`` test on ``n`` pairs detects
    with probability ``power``. Uses the noncentral t (exact for normal differences), so small ``n``
    are not flattered by the normal approximation."""
    if n < 2:
        raise ValueError(f"need at least 2 pairs; got {n}")
    if sd_diff < 0:
        raise ValueError(f"sd_diff must be >= 0; got {sd_diff}")
    _paired_z(alpha, power, sides)  # argument checks
    df = n - 1
    crit = float(scipy.stats.t.ppf(1 - alpha / sides, df))

    def achieved(delta_sd: float) -> float:  # power at a standardised effect delta_sd
        return float(scipy.stats.nct.sf(crit, df, delta_sd * math.sqrt(n)))

    lo, hi = 0.0, 1.0
    while achieved(hi) < power:
        hi *= 2
    for _ in range(80):  # bisection on the standardised effect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if achieved(mid) < power else (lo, mid)
    return hi * sd_diff


def paired_n(sd_diff: float, mde: float, alpha: float = 0.05, power: float = 0.8, sides: int = 2) -> int:
    """Smallest number of pairs whose :func:`paired_mde` is at most ``mde``."""
    if mde <= 0:
        raise ValueError(f"mde must be > 0; got {mde}")
    z = _paired_z(alpha, power, sides)
    n = max(2, math.ceil((z * sd_diff / mde) ** 2))  # normal approximation: a lower bound
    while paired_mde(sd_diff, n, alpha, power, sides) > mde:
        n += 1
    return n


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """``a - b`` paired per image: ``n``, ``estimate``, its 95 % t interval ``ci_lo``/``ci_hi``, the paired
    t-test's ``p`` and the SD of the differences ``sd_diff``."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    estimate, lo, hi = mean_ci_over_seeds(diff)
    return {"n": diff.size, "estimate": estimate, "ci_lo": lo, "ci_hi": hi, "p": paired_test(a, b)["p_t"],
            "sd_diff": float(diff.std(ddof=1))}


def decide_family(table: pd.DataFrame, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """Every row of ``table`` (columns of :func:`paired_difference`) is one test of one Holm family: adds
    ``m``, ``p_holm``, ``mde`` (at ``alpha / m`` and ``power``) and ``verdict`` (better / worse / not
    detectable at n = ..., never "no difference")."""
    table = table.copy()
    m = len(table)
    table["m"] = m
    table["p_holm"] = holm(table["p"].to_numpy())
    table["mde"] = [paired_mde(sd, int(n), alpha=alpha / m, power=power) for sd, n in zip(table["sd_diff"], table["n"])]
    table["verdict"] = [("better" if est > 0 else "worse") if p < alpha else f"not detectable at n = {int(n)} (MDE {mde:.2f})"
                        for est, p, n, mde in zip(table["estimate"], table["p_holm"], table["n"], table["mde"])]
    return table


def pareto_mask(cost: Sequence[float], quality: Sequence[float], higher_is_better: bool = True) -> np.ndarray:
    """True for the points no other point dominates: none is at most as costly and at least as
    good with one of the two strictly better. NaN quality is never on the front."""
    c = np.asarray(cost, dtype=float)
    q = np.asarray(quality, dtype=float) * (1.0 if higher_is_better else -1.0)
    ok = np.isfinite(c) & np.isfinite(q)
    mask = np.zeros(c.size, dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok & (c <= c[i]) & (q >= q[i]) & ((c < c[i]) | (q > q[i]))
        mask[i] = not others.any()
    return mask
