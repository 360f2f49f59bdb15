"""Mechanistic check of FCR: encoder-feature variance across timestep gaps, and how it predicts the
quality lost to encoder caching.

**Feature variance** (:mod:`fcr.experiments.feature_variance`): σ²_Δ of encoder features per model,
measured on shared draws; here it is tabulated, compared with the original model and regressed on
quality.

**Regression.** For every model x stride ``s > 1`` x stress in the quality tables of notebooks 03 /
04: ``y`` = relative FD increase (%) of stride ``s`` over stride 1 (same model, stress and seed,
averaged over seeds), ``x`` = mean over ``Δ = 1..s−1`` of ``σ²_Δ`` in sampling units (the average
staleness of a stride-``s`` cache), feature group ``all``; OLS of ``y`` on ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fcr.core.unet import FEATURE_GROUPS
from fcr.stats import bootstrap_ci, bootstrap_metric, ols, relative_change
from fcr.experiments.feature_variance import UNITS, ModelVariance

__all__ = [
    "FD_COLUMN",
    "fit_regressions",
    "load_quality_tables",
    "mechanistic_criterion",
    "plot_regression",
    "plot_variance",
    "quality_drops",
    "regression_points",
    "regression_report",
    "variance_reduction",
    "variance_table",
]

FD_COLUMN = "fd_fashioncnn"
ACC_COLUMN = "class_accuracy"
SD_FD_COLUMN, SD_ALIGN_COLUMN = "fid", "clip_score"  # the SD setting's FD and prompt alignment
# Regression columns: y (quality drop) and x (feature variance at the cache's gaps).
Y_COLUMNS: tuple[str, ...] = ("fd_increase_pct", "class_accuracy_drop_pp")
X_COLUMNS: tuple[str, ...] = ("sigma2_norm_gap", "sigma2_gap")
PRIMARY = ("fd_increase_pct", "sigma2_norm_gap")


# ----------------------------------------------------------------------------- tables


def _deltas(m: ModelVariance, units: str) -> list[int]:
    return sorted({k[1] for k in m.values if k[0] == units and k[2] not in ("t", "t_prev")})


def _groups(m: ModelVariance) -> list[str]:
    return [g for g in FEATURE_GROUPS if any(k[2] == g for k in m.values)]


def variance_table(models: Sequence[ModelVariance], n_boot: int, seed: int) -> pd.DataFrame:
    """``variance.csv``: per model x feature group x units x Δ, the mean over images of the raw
    (``sigma2``) and normalised (``sigma2_norm``) distance with 95 % percentile bootstrap
    intervals over images."""
    rows = []
    for m in models:
        for group in _groups(m):
            for units in UNITS:
                for delta in _deltas(m, units):
                    a = m.values[(units, delta, group, "abs")]
                    z = m.values[(units, delta, group, "norm")]
                    s, s_lo, s_hi = bootstrap_ci(a, n_boot=n_boot, seed=seed)
                    q, q_lo, q_hi = bootstrap_ci(z, n_boot=n_boot, seed=seed)
                    rows.append({
                        "model": m.label, "model_source": m.source, "original_model": m.original_model,
                        "lambda_fcr": m.lambda_fcr, "feature_group": group, "units": units, "delta": delta,
                        "sigma2": s, "sigma2_lo": s_lo, "sigma2_hi": s_hi,
                        "sigma2_norm": q, "sigma2_norm_lo": q_lo, "sigma2_norm_hi": q_hi, "n_images": int(a.size),
                    })
    return pd.DataFrame(rows)


def _mean_over_deltas(m: ModelVariance, units: str, group: str, variant: str, deltas: Sequence[int]) -> np.ndarray:
    return np.mean([m.values[(units, d, group, variant)] for d in deltas], axis=0)


def _reduction_pct(pairs: np.ndarray) -> float:
    # pairs: (N, 2) per-image [model, original]; reduction of the mean, in % of the original's.
    return 100.0 * (1.0 - pairs[:, 0].mean() / pairs[:, 1].mean())


def variance_reduction(
    models: Sequence[ModelVariance], n_boot: int, seed: int, threshold_pct: float = 30.0
) -> pd.DataFrame:
    """``variance_reduction.csv``: for every model whose original model was measured too, per
    feature group and units, ``100 (1 − mean σ²_model / mean σ²_original)`` with σ² the per-image
    mean over the Δ both share, normalised (``reduction_pct``, primary) and raw (``reduction_pct_abs``),
    with paired bootstrap 95 % intervals (images resampled jointly for both models).
    ``passed_30pct``: normalised reduction ≥ ``threshold_pct`` (the primary test: shrinking features
    cannot pass it); ``passed_30pct_abs``: the same for the raw one."""
    by_label = {m.label: m for m in models}
    rows = []
    for m in models:
        o = by_label.get(m.original_label)
        if o is None:
            continue
        if o.style != m.style:
            raise ValueError(f"{m.label} and its original {o.label} were measured on different image styles")
        for group in _groups(m):
            for units in UNITS:
                deltas = sorted(set(_deltas(m, units)) & set(_deltas(o, units)))
                if not deltas:
                    continue
                row: dict[str, Any] = {
                    "model": m.label, "original_model": o.label, "lambda_fcr": m.lambda_fcr, "feature_group": group,
                    "units": units, "delta_min": min(deltas), "delta_max": max(deltas),
                }
                for variant, col in (("abs", "sigma2"), ("norm", "sigma2_norm")):
                    pairs = np.stack([_mean_over_deltas(m, units, group, variant, deltas),
                                      _mean_over_deltas(o, units, group, variant, deltas)], axis=1)
                    est, lo, hi = bootstrap_metric(_reduction_pct, pairs, n_boot=n_boot, seed=seed)
                    name = "reduction_pct_abs" if variant == "abs" else "reduction_pct"
                    row.update({
                        f"{col}_mean": float(pairs[:, 0].mean()), f"{col}_mean_original": float(pairs[:, 1].mean()),
                        name: est, f"{name}_lo": lo, f"{name}_hi": hi,
                    })
                row["n_images"] = int(len(pairs))
                row["passed_30pct"] = bool(row["reduction_pct"] >= threshold_pct)
                row["passed_30pct_abs"] = bool(row["reduction_pct_abs"] >= threshold_pct)
                rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- quality drops and regression


def load_quality_tables(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The quality CSVs of notebooks 03 / 04 as one table with a ``table`` column (position in
    ``paths``) and ``stress`` ('none' where a table has no stress column or leaves it empty)."""
    frames = []
    for i, path in enumerate(paths):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"quality table {path} not found: it is written by notebook 03 (quality.csv) or 04 (robustness.csv)"
            )
        df = pd.read_csv(path)
        missing = [c for c in ("model", "seed", "stride") if c not in df.columns]
        if FD_COLUMN not in df.columns and SD_FD_COLUMN not in df.columns:
            missing.append(f"{FD_COLUMN} (embedded) or {SD_FD_COLUMN} (SD)")
        if missing:
            raise ValueError(f"quality table {path} lacks column(s) {missing}")
        df["stress"] = df["stress"].fillna("none") if "stress" in df.columns else "none"
        df["table"] = i
        df["table_path"] = str(path)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def quality_drops(quality: pd.DataFrame) -> pd.DataFrame:
    """Quality drop of stride ``s > 1`` against stride 1, per model x stress x stride.

    Pairs come from the same table, model, stress, seed (and ``num_inference_steps`` /
    ``scheduler`` when present). ``fd_increase_pct`` = ``100 (FD_s − FD_1) / FD_1``;
    ``class_accuracy_drop_pp`` = ``100 (acc_1 − acc_s)`` (percentage points); both averaged over
    seeds. Rows without a uniform stride (NaN) are ignored; a (model, stress, stride, seed) found
    in several tables is taken from the first table. Two rows for one pair key raise ValueError.
    SD tables (no embedded FD column) use FID for the FD and CLIPScore for the accuracy: its drop
    is in CLIPScore points (already on a 0-100 scale).
    """
    sd = not quality.empty and FD_COLUMN not in quality.columns
    fd_col, acc_col, acc_scale = (SD_FD_COLUMN, SD_ALIGN_COLUMN, 1.0) if sd else (FD_COLUMN, ACC_COLUMN, 100.0)
    cols = ["model", "stress", "stride", "n_seeds", "seeds", fd_col + "_stride1", fd_col + "_stride",
            "fd_increase_pct", "class_accuracy_drop_pp", "num_inference_steps", "scheduler", "table"]
    if quality.empty:
        return pd.DataFrame(columns=cols)
    q = quality[quality["stride"].notna()].copy()
    q["stride"] = q["stride"].astype(int)
    extra = [c for c in ("num_inference_steps", "scheduler") if c in q.columns]
    for c in ("num_inference_steps", "scheduler"):
        if c not in q.columns:
            q[c] = None
    group_keys = ["table", "model", "stress", "seed", *extra]
    dupes = q[q.duplicated(group_keys + ["stride"], keep=False)]
    if not dupes.empty:
        raise ValueError(f"quality rows are ambiguous (several rows per table/model/stress/seed/stride): "
                         f"{dupes[group_keys + ['stride']].drop_duplicates().to_dict('records')[:5]}")
    per_seed = []
    for keys, g in q.groupby(group_keys, sort=False, dropna=False):
        base = g[g["stride"] == 1]
        if base.empty:
            continue
        b = base.iloc[0]
        for _, r in g[g["stride"] > 1].iterrows():
            acc = (acc_scale * (b[acc_col] - r[acc_col])) if acc_col in g.columns else math.nan
            fd_inc = relative_change(r[fd_col], b[fd_col]) if b[fd_col] != 0 else math.nan
            per_seed.append({
                "table": r["table"], "model": r["model"], "stress": r["stress"], "seed": int(r["seed"]),
                "stride": int(r["stride"]), "num_inference_steps": r["num_inference_steps"],
                "scheduler": r["scheduler"],
                "fd1": float(b[fd_col]), "fds": float(r[fd_col]), "fd_inc": fd_inc, "acc_drop": acc,
            })
    if not per_seed:
        return pd.DataFrame(columns=cols)
    ps = pd.DataFrame(per_seed)
    # The first table wins for a pair found in several tables.
    ps = ps.sort_values("table", kind="stable").drop_duplicates(["model", "stress", "stride", "seed"], keep="first")
    rows = []
    for (model, stress, stride), g in ps.groupby(["model", "stress", "stride"], sort=False):
        rows.append({
            "model": model, "stress": stress, "stride": int(stride), "n_seeds": len(g),
            "seeds": ",".join(str(s) for s in sorted(g["seed"])),
            fd_col + "_stride1": float(g["fd1"].mean()), fd_col + "_stride": float(g["fds"].mean()),
            "fd_increase_pct": float(g["fd_inc"].mean()), "class_accuracy_drop_pp": float(g["acc_drop"].mean()),
            "num_inference_steps": g["num_inference_steps"].iloc[0], "scheduler": g["scheduler"].iloc[0],
            "table": ",".join(str(t) for t in sorted(g["table"].unique())),
        })
    return pd.DataFrame(rows, columns=cols)


def regression_points(
    drops: pd.DataFrame, variance: pd.DataFrame, num_inference_steps: int, scheduler: str
) -> tuple[pd.DataFrame, list[str]]:
    """Join quality drops with the feature variance at the matching gaps: ``sigma2_gap`` /
    ``sigma2_norm_gap`` = mean over Δ = 1..s−1 of σ²_Δ (sampling units, feature group 'all') of
    the model's UNSTRESSED measurement (σ² is measured without stress). Returns the points and
    notes on what was left out (model not measured, other sampling grid, Δ not measured)."""
    notes: list[str] = []
    cols = ["model", "stress", "stride", "n_seeds", "fd_increase_pct", "class_accuracy_drop_pp",
            "sigma2_gap", "sigma2_norm_gap", "sigma2_stress"]
    v = variance
    if not v.empty:
        v = v[(v["units"] == "sampling") & (v["feature_group"] == "all")]
    rows = []
    for _, d in drops.iterrows():
        what = f"{d['model']} stride {d['stride']} ({d['stress']})"
        steps = d["num_inference_steps"]
        if steps is not None and not pd.isna(steps) and int(steps) != num_inference_steps:
            notes.append(f"{what}: quality at {int(steps)} steps, variance on the {num_inference_steps}-step grid: "
                         "left out")
            continue
        if d["scheduler"] is not None and not pd.isna(d["scheduler"]) and d["scheduler"] != scheduler:
            notes.append(f"{what}: scheduler {d['scheduler']} != {scheduler}: left out")
            continue
        mv = v[v["model"] == d["model"]] if not v.empty else v
        if mv.empty:
            notes.append(f"{d['model']}: no feature variance measured (add it to variance_models): left out")
            continue
        wanted = list(range(1, int(d["stride"])))
        got = mv.set_index("delta")
        if not set(wanted) <= set(got.index):
            notes.append(f"{what}: needs Δ up to {wanted[-1]} > variance_max_stride: left out")
            continue
        if not math.isfinite(float(d["fd_increase_pct"])):
            notes.append(f"{what}: FD increase undefined: left out")
            continue
        rows.append({
            "model": d["model"], "stress": d["stress"], "stride": int(d["stride"]), "n_seeds": int(d["n_seeds"]),
            "fd_increase_pct": float(d["fd_increase_pct"]),
            "class_accuracy_drop_pp": float(d["class_accuracy_drop_pp"]),
            "sigma2_gap": float(got.loc[wanted, "sigma2"].mean()),
            "sigma2_norm_gap": float(got.loc[wanted, "sigma2_norm"].mean()), "sigma2_stress": "none",
        })
    return pd.DataFrame(rows, columns=cols), notes


def fit_regressions(points: pd.DataFrame, min_points: int = 3) -> pd.DataFrame:
    """OLS of each quality drop on each variance column (:func:`fcr.stats.ols`): ``status``
    'fitted', 'not enough points' (fewer than ``min_points`` finite points) or 'x constant';
    ``primary`` marks FD increase on normalised σ²."""
    rows = []
    for y in Y_COLUMNS:
        for x in X_COLUMNS:
            row: dict[str, Any] = {"y": y, "x": x, "primary": (y, x) == PRIMARY}
            ok = points[[x, y]].apply(pd.to_numeric, errors="coerce").dropna() if not points.empty else points
            n = len(ok)
            row["n"] = n
            if n < min_points:
                row["status"] = "not enough points"
            elif ok[x].nunique() < 2:
                row["status"] = "x constant"
            else:
                fit = ols(ok[y].to_numpy(float), ok[x].to_numpy(float))
                row.update({k: v for k, v in fit.items() if k != "n"}, status="fitted")
            rows.append(row)
    cols = ["y", "x", "primary", "status", "n", "r2", "slope", "slope_lo", "slope_hi", "intercept",
            "pearson_r", "pearson_p"]
    return pd.DataFrame(rows).reindex(columns=cols)


def mechanistic_criterion(
    reduction: pd.DataFrame,
    fits: pd.DataFrame,
    reduction_threshold_pct: float = 30.0,
    r2_threshold: float = 0.6,
    units: str = "sampling",
    feature_group: str = "all",
) -> dict[str, Any]:
    """The seed's mechanistic criterion: normalised variance reduced ≥ ``reduction_threshold_pct``
    (feature group ``feature_group``, ``units``; met when some fine-tuned model meets it) AND
    R² ≥ ``r2_threshold`` of the primary fit. Parts that cannot be evaluated are None."""
    red = reduction
    if not red.empty:
        red = red[(red["units"] == units) & (red["feature_group"] == feature_group)]
    reductions = {f"{r['model']} vs {r['original_model']}": float(r["reduction_pct"]) for _, r in red.iterrows()}
    reduced = None if not reductions else bool(max(reductions.values()) >= reduction_threshold_pct)
    prim = fits[fits["primary"]].iloc[0] if not fits.empty and fits["primary"].any() else None
    r2 = float(prim["r2"]) if prim is not None and prim["status"] == "fitted" else None
    r2_ok = None if r2 is None else bool(r2 >= r2_threshold)
    passed = None if reduced is None or r2_ok is None else bool(reduced and r2_ok)
    return {
        "reduction_threshold_pct": reduction_threshold_pct, "r2_threshold": r2_threshold, "units": units,
        "feature_group": feature_group, "variant": "normalised", "reductions_norm_pct": reductions,
        "variance_reduced": reduced, "r2": r2, "r2_passed": r2_ok,
        "fit_status": None if prim is None else str(prim["status"]), "passed": passed,
    }


def _json_safe(obj: Any) -> Any:
    # NaN / numpy scalars -> JSON-valid Python values (NaN becomes None).
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def regression_report(
    points: pd.DataFrame, fits: pd.DataFrame, criterion: Mapping[str, Any], notes: Sequence[str]
) -> dict[str, Any]:
    """The content of ``regression.json``: the primary fit (FD increase on normalised σ²) with its
    numbers also at the top level (``r2, slope, slope_lo, slope_hi, intercept, pearson_r,
    pearson_p, n``; left out when it could not be fitted), every fit, the points, what was left
    out and the criterion (NaN written as null)."""
    primary = fits[fits["primary"]].iloc[0].to_dict() if not fits.empty and fits["primary"].any() else None
    top: dict[str, Any] = {}
    if primary is not None and primary["status"] == "fitted":
        keys = ("r2", "slope", "slope_lo", "slope_hi", "intercept", "pearson_r", "pearson_p", "n")
        top = {k: primary[k] for k in keys}
    return _json_safe({
        **top,
        "y": PRIMARY[0],
        "x": PRIMARY[1],
        "status": None if primary is None else primary["status"],
        "primary": primary,
        "fits": fits.to_dict("records"),
        "n_points": int(len(points)),
        "points": points.to_dict("records"),
        "left_out": list(notes),
        "sigma2_under_stress": "never measured: stress rows use the model's unstressed σ²",
        "criterion": dict(criterion),
    })


# ----------------------------------------------------------------------------- figures


def plot_variance(table: pd.DataFrame, variant: str = "norm"):
    """σ²_Δ against Δ, one panel per units (training timesteps, sampling steps), hue model, style
    feature group; 95 % bootstrap intervals as bands for group 'all'."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    col = "sigma2_norm" if variant == "norm" else "sigma2"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    models = list(dict.fromkeys(table["model"]))
    palette = dict(zip(models, sns.color_palette(n_colors=len(models))))
    for ax, units in zip(axes.flat, UNITS):
        part = table[table["units"] == units]
        if part.empty:
            ax.axis("off")
            continue
        sns.lineplot(data=part, x="delta", y=col, hue="model", style="feature_group", palette=palette,
                     markers=True, errorbar=None, ax=ax)
        for model, g in part[part["feature_group"] == "all"].groupby("model"):
            g = g.sort_values("delta")
            ax.fill_between(g["delta"], g[f"{col}_lo"], g[f"{col}_hi"], color=palette[model], alpha=0.15)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("Δ (training timesteps)" if units == "train" else "Δ (sampling steps)")
        ax.set_ylabel("normalised σ²_Δ" if variant == "norm" else "σ²_Δ (mean squared difference)")
        if variant != "norm" and (part[col] > 0).all():
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_regression(points: pd.DataFrame, fit: Mapping[str, Any] | None, x: str, y: str):
    """Quality drop against feature variance, one point per model x stride x stress, with the OLS line."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6, 4))
    if not points.empty:
        sns.scatterplot(data=points, x=x, y=y, hue="model", style="stress", s=70, ax=ax)
        for _, r in points.iterrows():
            ax.annotate(f"s={r['stride']}", (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    title = "not enough points for a fit"
    if fit is not None and fit.get("status") == "fitted":
        xs = np.linspace(points[x].min(), points[x].max(), 50)
        ax.plot(xs, fit["intercept"] + fit["slope"] * xs, color="black", linewidth=1)
        title = (f"OLS: R² = {fit['r2']:.2f}, slope {fit['slope']:.3g} "
                 f"[{fit['slope_lo']:.3g}, {fit['slope_hi']:.3g}], n = {int(fit['n'])}")
    elif fit is not None:
        title = f"{fit.get('status')} (n = {int(fit.get('n', 0))})"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"{x}: mean σ² over Δ = 1..s−1 (sampling steps, all features)")
    ax.set_ylabel(y)
    fig.tight_layout()
    return fig
