"""Criterion e: encoder-feature variance reduction and its regression on quality drops (verdict rows)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from fcr import contract
from fcr.analysis.rows import (
    THRESHOLDS,
    InputError,
    all_of,
    count_verdicts,
    fmt3,
    lookup_column,
    producer,
    read_json,
    read_tables,
    verdict_row,
)

__all__ = [
    "E_NAME",
    "PREFERRED_FEATURE_GROUP",
    "PREFERRED_UNITS",
    "criterion_e",
]

# ----------------------------------------------------------------------------- e. mechanistic

E_NAME = "e. mechanistic"
# The variance reduction that counts: all regularised features, Δ in sampling steps (the gaps FD caching skips).
PREFERRED_FEATURE_GROUP = "all"
PREFERRED_UNITS = "sampling"


def _regression_row(path: Path, r2_thr: str, rows: list[dict]) -> bool | None:
    """Append the regression part row of one notebook 05 run (``regression.json``); return its verdict."""
    scope = f"variance vs quality difference ({path.parent})"
    try:
        reg = read_json(path)
        if lookup_column(reg, "regression", "r2", path, required=False) is None and "status" in reg:
            raise InputError(f"{path}: the primary regression was not fitted (status: {reg['status']})")
        r2 = float(reg[lookup_column(reg, "regression", "r2", path)])
        slope = float(reg[lookup_column(reg, "regression", "slope", path)])
        lo_c = lookup_column(reg, "regression", "slope_lo", path, required=False)
        hi_c = lookup_column(reg, "regression", "slope_hi", path, required=False)
        n_c = lookup_column(reg, "regression", "n", path, required=False)
        ok = bool(r2 >= THRESHOLDS["r2"] and slope > 0)
        measured = f"R² {fmt3(r2)}, slope {fmt3(slope)}"
        if lo_c and hi_c and reg[lo_c] is not None and reg[hi_c] is not None:
            measured += f" [{fmt3(float(reg[lo_c]))}, {fmt3(float(reg[hi_c]))}]"
        if n_c and reg[n_c] is not None:
            measured += f", n = {int(float(reg[n_c]))}"
        note = ("OLS of the quality difference on the encoder-feature variance (notebook 05). A positive slope is "
                "required too: a strong negative relation would contradict the mechanism.")
        own = reg.get("criterion")
        if isinstance(own, Mapping) and "passed" in own:
            note += (f" Notebook 05's own criterion (some fine-tuned model reduces the variance enough): "
                     f"passed = {own['passed']}.")
        rows.append(verdict_row(f"{E_NAME}: regression", scope, measured, r2_thr, ok, note, kind="part", value=r2))
        return ok
    except InputError as exc:
        rows.append(verdict_row(f"{E_NAME}: regression", scope, "n/a", r2_thr, None, str(exc), kind="part"))
    except (TypeError, ValueError) as exc:
        rows.append(verdict_row(f"{E_NAME}: regression", scope, "n/a", r2_thr, None, f"{path}: unreadable value ({exc})",
                         kind="part"))
    return None


def criterion_e(mechanistic_dirs: Sequence[Path], selected: Sequence[str]) -> list[dict]:
    rows: list[dict] = []
    var_thr = f"variance reduction ≥ {THRESHOLDS['variance_reduction_pct']:g} %"
    var_verdicts: list[bool | None] = []
    missing = [Path(d) / contract.VARIANCE_REDUCTION for d in mechanistic_dirs
               if not (Path(d) / contract.VARIANCE_REDUCTION).is_file()]
    try:
        df, path = read_tables(mechanistic_dirs, contract.VARIANCE_REDUCTION)
        mcol = lookup_column(df, "variance_reduction", "model", path)
        rcol = lookup_column(df, "variance_reduction", "reduction_pct", path)
        gcol = lookup_column(df, "variance_reduction", "feature_group", path, required=False)
        ucol = lookup_column(df, "variance_reduction", "units", path, required=False)
        if df.empty:
            raise InputError(f"{path} has no rows")
        chosen = [m for m in dict.fromkeys(df[mcol].astype(str)) if m in set(selected)]
        if not chosen:  # no best-λ model known (criterion a not measurable): every FCR model (λ > 0) counts
            fcr_rows = df[df["lambda_fcr"].astype(float) > 0] if "lambda_fcr" in df.columns else df
            chosen = list(dict.fromkeys(fcr_rows[mcol].astype(str)))
        verdict_models = chosen
        for model, group in df.groupby(df[mcol].astype(str), sort=False):
            if gcol is not None and (group[gcol].astype(str) == PREFERRED_FEATURE_GROUP).any():
                group = group[group[gcol].astype(str) == PREFERRED_FEATURE_GROUP]
            if ucol is not None and (group[ucol].astype(str) == PREFERRED_UNITS).any():
                group = group[group[ucol].astype(str) == PREFERRED_UNITS]
            values = group[rcol].astype(float)
            worst = float(values.min())
            ok = bool(math.isfinite(worst) and worst >= THRESHOLDS["variance_reduction_pct"])
            parts = [f"{fmt3(float(v))} %" + (f" ({r[ucol]})" if ucol else "")
                     for v, (_, r) in zip(values, group.iterrows())]
            kind = "part" if model in verdict_models else "context"
            if kind == "part":
                var_verdicts.append(ok)
            group_txt = ", ".join([f"feature group {group[gcol].iloc[0]}" if gcol else "all feature groups",
                                   f"Δ in {group[ucol].iloc[0]} units" if ucol else "all units"])
            rows.append(verdict_row(f"{E_NAME}: variance reduction", model, ", ".join(parts), var_thr, ok,
                             f"Encoder-feature variance of the FCR model vs its original ({group_txt}; the smallest "
                             f"reduction counts), column '{rcol}' of variance_reduction.csv.",
                             kind=kind, value=worst))
        for miss in missing:  # some experiments have the table, others not: the gap is not measurable
            var_verdicts.append(None)
            rows.append(verdict_row(f"{E_NAME}: variance reduction", f"models of {miss.parent}", "n/a", var_thr, None,
                             f"missing {miss}: written by {producer(miss)}", kind="part"))
    except InputError as exc:
        var_verdicts.append(None)
        rows.append(verdict_row(f"{E_NAME}: variance reduction", "FCR models", "n/a", var_thr, None, str(exc), kind="part"))

    r2_thr = f"R² ≥ {THRESHOLDS['r2']:g} with a positive slope"
    r2_verdicts = [_regression_row(Path(d) / contract.REGRESSION, r2_thr, rows) for d in mechanistic_dirs]
    r2_ok = all_of(r2_verdicts)
    for d in mechanistic_dirs:
        rows += _trajectory_rows(Path(d) / contract.TRAJECTORY_REGRESSION)
    ok = all_of([*var_verdicts, r2_ok])
    rows.insert(0, verdict_row(E_NAME, "selected FCR models",
                        f"variance: {count_verdicts(var_verdicts, 'models')}; R²: {count_verdicts(r2_verdicts, 'regressions')}",
                        f"{var_thr} and {r2_thr}", ok,
                        "Models in the verdict: the best-λ model of each backbone (criterion a) found in "
                        "variance_reduction.csv, else every FCR model (λ > 0) in it; every regression of notebook "
                        "05 (one per experiment)."))
    return rows


def _trajectory_rows(path: Path) -> list[dict]:
    """Context rows of the per-image trajectory-drift regression, when notebook 05 measured it: the
    seed's R² criterion as written (drift alone; PSNR falls as drift grows, so the slope is
    negative) and on this design (the mixed model's drift slope with its interval)."""
    if not path.is_file():
        return []
    fit = read_json(path)
    written, mixed = fit["as_written"], fit.get("mixed", {})
    r2_ok = bool(written["r2"] >= THRESHOLDS["r2"] and written["slope"] < 0)
    rows = [verdict_row(f"{E_NAME}: trajectory drift, as written", f"{fit['n_points']} images x strides ({path.parent})",
                        f"R² {fmt3(written['r2'])}, slope {fmt3(written['slope'])}",
                        f"R² ≥ {THRESHOLDS['r2']:g}, PSNR falling with drift", r2_ok,
                        "Context only: OLS of each image's PSNR to its own full sampling at FD-s on the encoder drift "
                        "along its own sampling trajectory (trajectory_regression.json).", kind="context",
                        value=written["r2"])]
    if "slope" in mixed:
        shown = mixed["hi"] < 0
        rows.append(verdict_row(f"{E_NAME}: trajectory drift, mixed model", f"{fit['n_pairs']} prompt/noise pairs",
                                f"drift slope {fmt3(mixed['slope'])} [{fmt3(mixed['lo'])}, {fmt3(mixed['hi'])}]; "
                                f"partial R² {fmt3(fit['partial']['partial_r2_drift'])}",
                                "slope < 0 with its 95 % interval (given stride and model)", True if shown else None,
                                "Context only: PSNR ~ drift + stride + model with a random intercept per prompt/noise "
                                "pair; partial R² of drift given stride and model.", kind="context",
                                value=mixed["slope"]))
    return rows
