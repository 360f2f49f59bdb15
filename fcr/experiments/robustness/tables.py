"""Robustness tables and figures: results, per-seed drops, drops with intervals, the seed's
criterion (drop with FCR <= drop of the original), stress sample grids."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from fcr.eval.metrics import DEFAULT_EXTRACTOR_NAME
from fcr.eval.scoring import FD_COLUMN
from fcr.stats import mean_ci_over_seeds
from fcr.experiments.robustness.stresses import result_stem
from fcr.experiments.sweep import load_side_file

# +1: higher is worse (distances); -1: higher is better. A drop is positive when quality got worse.
METRIC_DIRECTIONS: dict[str, int] = {
    FD_COLUMN: 1,
    f"kid_{DEFAULT_EXTRACTOR_NAME}": 1,
    f"precision_{DEFAULT_EXTRACTOR_NAME}": -1,
    f"recall_{DEFAULT_EXTRACTOR_NAME}": -1,
    "class_accuracy": -1,
    "class_prob": -1,
    "fid": 1,
    "clip_score": -1,
}
DROP_METRICS: dict[str, tuple[str, ...]] = {
    "embedded": (FD_COLUMN, "class_accuracy", "class_prob", f"kid_{DEFAULT_EXTRACTOR_NAME}"),
    "sd": ("fid", "clip_score"),
}
CRITERION_METRICS: dict[str, tuple[str, ...]] = {"embedded": (FD_COLUMN, "class_accuracy"), "sd": ("fid", "clip_score")}


# ----------------------------------------------------------------------------- tables

ID_COLUMNS: tuple[str, ...] = (
    "model", "model_source", "original_model", "lambda_fcr", "config", "stride", "stress", "seed",
)


def robustness_table(results: pd.DataFrame) -> pd.DataFrame:
    """The result rows with the identifying columns first (``model, model_source, original_model,
    lambda_fcr, config, stride, stress, seed``), then quality metrics and their ``_lo``/``_hi``
    bootstrap bounds, then everything else."""
    front = [c for c in ID_COLUMNS if c in results.columns]
    metrics = []
    for m in METRIC_DIRECTIONS:
        metrics += [c for c in (m, f"{m}_lo", f"{m}_hi") if c in results.columns]
    rest = [c for c in results.columns if c not in front and c not in metrics]
    return results[front + metrics + rest]


def per_seed_drops(results: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per model x config x stress (other than ``none``) x seed x metric: the stressed and
    unstressed (``none``, same model, config and seed) values and ``drop``: ``stressed -
    unstressed`` for metrics where higher is worse (FD), ``unstressed - stressed`` where higher is
    better (accuracy), so a positive drop always means worse under stress. Metrics missing from
    ``results`` or nan in a row are skipped."""
    if "none" not in set(results["stress"]):
        raise ValueError("drops need the unstressed reference: add 'none' to stresses")
    keys = ["model", "config", "seed"]
    base = results[results["stress"] == "none"].set_index(keys)
    if base.index.duplicated().any():
        raise ValueError("more than one 'none' row per model x config x seed")
    rows = []
    for _, row in results[results["stress"] != "none"].iterrows():
        ref_key = tuple(row[k] for k in keys)
        if ref_key not in base.index:
            raise ValueError(f"no 'none' row for model {row['model']!r}, config {row['config']!r}, seed {row['seed']}")
        ref = base.loc[ref_key]
        for metric in metrics:
            if metric not in results.columns:
                continue
            if metric not in METRIC_DIRECTIONS:
                raise ValueError(f"no direction known for metric {metric!r}; known: {sorted(METRIC_DIRECTIONS)}")
            stressed, unstressed = float(row[metric]), float(ref[metric])
            if math.isnan(stressed) or math.isnan(unstressed):
                continue
            rows.append({
                "model": row["model"], "lambda_fcr": row.get("lambda_fcr"), "config": row["config"],
                "stride": row.get("stride"), "stress": row["stress"], "seed": row["seed"], "metric": metric,
                "value_stressed": stressed, "value_unstressed": unstressed,
                "drop": METRIC_DIRECTIONS[metric] * (stressed - unstressed),
            })
    return pd.DataFrame(rows, columns=["model", "lambda_fcr", "config", "stride", "stress", "seed", "metric",
                                       "value_stressed", "value_unstressed", "drop"])


def drop_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per model x config x stress x metric: means over seeds of the stressed and unstressed
    values, the mean paired drop with its Student-t 95 % interval over seeds
    (:func:`fcr.stats.mean_ci_over_seeds`; nan bounds with one seed) and the relative drop
    ``100 * drop / |mean unstressed|`` (nan when that is 0)."""
    rows = []
    for (model, config, stress, metric), g in per_seed.groupby(["model", "config", "stress", "metric"], sort=False):
        drop, lo, hi = mean_ci_over_seeds(g["drop"].to_numpy(dtype=float))
        unstressed = float(g["value_unstressed"].mean())
        rows.append({
            "model": model, "lambda_fcr": g["lambda_fcr"].iloc[0], "config": config, "stride": g["stride"].iloc[0],
            "stress": stress, "metric": metric,
            "n_seeds": len(g), "value_stressed": float(g["value_stressed"].mean()), "value_unstressed": unstressed,
            "drop": drop, "drop_lo": lo, "drop_hi": hi,
            "relative_drop_pct": 100.0 * drop / abs(unstressed) if unstressed != 0 else math.nan,
        })
    return pd.DataFrame(rows)


def criterion_table(
    per_seed: pd.DataFrame, origins: Mapping[str, str], metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """The seed's criterion, per fine-tuned model (``origins``: label -> label of its original
    model) x config x stress x metric: ``drop_fcr`` and ``drop_original`` (mean drops over seeds,
    t-intervals), ``diff = drop_fcr - drop_original`` over the seeds both have (paired by seed,
    t-interval) and ``passed = drop_fcr <= drop_original`` (point estimates: the quality drop
    under stress with FCR is no larger than the original model's)."""
    if metrics is not None:
        per_seed = per_seed[per_seed["metric"].isin(metrics)]
    cols = ["model", "lambda_fcr", "original_model", "config", "stride", "stress", "metric", "n_seeds", "drop_fcr",
            "drop_fcr_lo",
            "drop_fcr_hi", "drop_original", "drop_original_lo", "drop_original_hi", "diff", "diff_lo", "diff_hi",
            "passed"]
    rows = []
    for model, original in origins.items():
        mine = per_seed[per_seed["model"] == model]
        theirs = per_seed[per_seed["model"] == original]
        for (config, stress, metric), g in mine.groupby(["config", "stress", "metric"], sort=False):
            o = theirs[(theirs["config"] == config) & (theirs["stress"] == stress) & (theirs["metric"] == metric)]
            if o.empty:
                continue
            paired = g.merge(o, on="seed", suffixes=("_fcr", "_orig"))
            fcr = mean_ci_over_seeds(g["drop"].to_numpy(dtype=float))
            orig = mean_ci_over_seeds(o["drop"].to_numpy(dtype=float))
            diff = (mean_ci_over_seeds((paired["drop_fcr"] - paired["drop_orig"]).to_numpy(dtype=float))
                    if len(paired) else (math.nan,) * 3)
            rows.append({
                "model": model, "lambda_fcr": g["lambda_fcr"].iloc[0], "original_model": original, "config": config,
                "stride": g["stride"].iloc[0],
                "stress": stress, "metric": metric, "n_seeds": len(paired),
                "drop_fcr": fcr[0], "drop_fcr_lo": fcr[1], "drop_fcr_hi": fcr[2],
                "drop_original": orig[0], "drop_original_lo": orig[1], "drop_original_hi": orig[2],
                "diff": diff[0], "diff_lo": diff[1], "diff_hi": diff[2], "passed": bool(fcr[0] <= orig[0]),
            })
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------- figures and samples


def plot_drops(drops: pd.DataFrame, metric: str, ylabel: str | None = None):
    """Mean drop per stress (bars, one colour per model) with the t-interval over seeds (lines;
    none with one seed), one panel per configuration. Positive = worse under stress."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from fcr.plots import interval_bars

    sub = drops[drops["metric"] == metric]
    configs = list(dict.fromkeys(sub["config"]))
    stresses = list(dict.fromkeys(sub["stress"]))
    models = list(dict.fromkeys(sub["model"]))
    panel_width = max(3.5, 0.5 * len(stresses) * max(len(models), 1) + 1.0)
    fig, axes = plt.subplots(1, max(len(configs), 1), figsize=(panel_width * max(len(configs), 1), 3.8),
                             squeeze=False, sharey=True)
    palette = dict(zip(models, sns.color_palette(n_colors=max(len(models), 1))))
    for ax, config in zip(axes.flat, configs):
        part = sub[sub["config"] == config]
        sns.barplot(data=part, x="stress", y="drop", hue="model", order=stresses, hue_order=models,
                    palette=palette, errorbar=None, ax=ax)
        for model, container in zip(models, ax.containers):
            rows = part[part["model"] == model].set_index("stress")
            xs, lo, hi = [], [], []
            for bar in container:  # a bar's centre lies within 0.5 of its category's position
                x = bar.get_x() + bar.get_width() / 2
                stress = stresses[int(round(x))]
                if stress in rows.index:
                    xs.append(x)
                    lo.append(rows.loc[stress, "drop_lo"])
                    hi.append(rows.loc[stress, "drop_hi"])
            if xs:
                interval_bars(ax, xs, lo, hi, "black")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_title(config)
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=35)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[m]) for m in models]
    axes.flat[len(configs) - 1 if configs else 0].legend(handles, models, title="model", fontsize=8,
                                                          bbox_to_anchor=(1.02, 1), loc="upper left")
    axes.flat[0].set_ylabel(ylabel or f"drop in {metric} (positive = worse)")
    fig.tight_layout()
    return fig


def load_stress_samples(
    out_dir: str | Path, model: str, config: str, stresses: Sequence[str], seed: int, n: int = 10
) -> dict[str, torch.Tensor]:
    """The first ``n`` images (uint8, native side) of ``model`` x ``config`` under each stress."""
    folder = Path(out_dir) / "results"
    return {s: load_side_file(folder / f"{result_stem(model, config, s, seed)}.safetensors")["images"][:n] for s in stresses}


def stress_sample_grid(samples: Mapping[str, torch.Tensor], titles: Sequence[str] | None = None):
    """Rows = stresses, columns = images; rows of another side (high resolution) are shown resized
    (nearest neighbour) to the largest side so every row has the same cell size."""
    from fcr.plots import config_sample_grid

    side = max(int(v.shape[-1]) for v in samples.values())
    resized = {k: v if v.shape[-1] == side else F.interpolate(v.float(), size=(side, side), mode="nearest").to(v.dtype)
               for k, v in samples.items()}
    return config_sample_grid(resized, titles=titles)
