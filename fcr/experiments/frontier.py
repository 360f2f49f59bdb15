"""Quality-vs-cost frontier of one sweep: every (model, configuration) a point, cost against quality.

A user with a compute budget asks which sampler gives the best images at that cost. Every point of
a sweep run sampled the same prompts from the same initial noise, so quality is measured *paired*:
the per-image fidelity to the original model's 50-step full-UNet image of the same prompt and
noise (``own_full`` for the original, ``original_full`` for a fine-tune; written by
:func:`fcr.experiments.paired_fidelity.fidelity_table`), next to the set metric (FD over seeds).
Cost is what the sweep measured per architecture x configuration: counted FLOPs per image and wall
time per image at each profiled batch size.

Points are grouped into *series* (model x method family: plain DDIM at N steps, DPM-Solver++ at k,
FD-s encoder caching, DPM-Solver++ with FD, DeepCache per branch); :func:`pareto_mask` marks the
points no other point beats on both axes, and :func:`matched_cost` compares, at the cost of a
budget configuration of the original (FD-5, FD-10), each series' best point within that budget
with the budget configuration itself and with the best point there, with paired bootstrap CIs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fcr import contract
from fcr.contract import FIDELITY_DIRECTIONS
from fcr.eval.scoring import FD_COLUMN
from fcr.stats import bootstrap_ci, pareto_mask
from fcr.analysis.paired import per_image_fidelity
from fcr.experiments.sweep import summarize

__all__ = [
    "APPROACHES",
    "COST_COLUMNS",
    "approach",
    "frontier_from_sweep",
    "frontier_points",
    "matched_cost",
    "method_family",
    "pareto_mask",
    "per_image_fidelity",
    "pooled_arms",
    "series_model",
]

# Cost axes a frontier can use: counted FLOPs (exact, machine-independent) or measured wall time.
COST_COLUMNS: tuple[str, ...] = ("flops_per_image", "time_per_image_s_bs1", "time_per_image_s_bs8")

_FAMILIES: tuple[tuple[str, str], ...] = (
    (r"^(PD|CD)-\d+$", "{0}"),
    (r"^(PD|CD)-\d+-FD-\d+$", "{0} + FD"),
    (r"^(PD|CD)-\d+-DeepCache-\d+-b(\d+)$", "{0} + DeepCache b{1}"),
    (r"^DeepCache-\d+-b(\d+)$", "DeepCache b{0}"),
    (r"^DPM\+\+-FD-\d+$", "DPM-Solver++ + FD"),
    (r"^DPM\+\+-\d+$", "DPM-Solver++"),
    (r"^FD-(\d+|50ls)$", "FD"),
    (r"^ToMe-\d+-d\d+$", "ToMe"),
    (r"^TGATE-g\d+$", "T-GATE"),
    (r"^Searched-(FD|DeepCache-b\d+)-\d+kr?$", "Searched {0}"),
)


def method_family(config: str, scheduler: str = "ddim") -> str:
    """The method family of a configuration name: ``FD`` (encoder caching, uniform or '50ls'),
    ``DPM-Solver++``, ``DPM-Solver++ + FD``, ``DeepCache b<B>``, ``ToMe``, ``T-GATE``, ``Searched <mode>`` (budgeted
    schedules, :mod:`fcr.experiments.cache_schedules`), the distilled
    students' ``PD`` / ``CD`` (progressive / consistency), ``PD + FD``, ``PD + DeepCache b<B>`` (and CD's), or the plain sweep scheduler
    (``full`` and ``DDIM-N``: the fewer-steps peer, named by the scheduler)."""
    for pattern, family in _FAMILIES:
        match = re.match(pattern, config)
        if match:
            return family.format(*match.groups())
    if config == "full" or re.match(rf"^{re.escape(scheduler.upper())}-\d+$", config):
        return scheduler.upper()
    raise ValueError(f"configuration {config!r} belongs to no method family")


# What was done to the original to get a point: nothing (a sampler or cache on the original's
# weights), fine-tuning of its weights (FCR, its control, cache-aware), or distillation into a student.
APPROACHES = contract.APPROACHES


def approach(model: str, family: str, origins: Mapping[str, str]) -> str:
    """The :data:`APPROACHES` entry of a point: the original's own points are training-free, a
    distilled student's (family ``PD…`` / ``CD…``) distilled, every other model's fine-tuned."""
    if model not in origins:
        return "training-free"
    return "distilled" if family.startswith(("PD", "CD")) else "fine-tuned"


def series_model(model: str, family: str) -> str:
    """The model part of a point's series: a distillation's rounds (``<run>@round<r>``, one student
    per step count) form one series per run; every other model is its own."""
    if family.startswith(("PD", "CD")) and "@round" in model:
        return model.rsplit("@round", 1)[0]
    return model


def _reference_of(model: str, origins: Mapping[str, str]) -> str:
    return "original_full" if model in origins else "own_full"


def frontier_points(
    summary: pd.DataFrame,
    cost: pd.DataFrame,
    fidelity: pd.DataFrame,
    origins: Mapping[str, str],
    *,
    endpoint: str = "psnr",
) -> pd.DataFrame:
    """One row per model x configuration of a sweep: its series (``model · family``), cost columns
    (:data:`COST_COLUMNS` present in ``cost``, joined on architecture x configuration), the set
    metric with its interval over seeds (``summary``: :func:`fcr.experiments.sweep.summarize`) and
    the paired fidelity ``endpoint`` to the original's full sampling with its interval
    (``fidelity``: notebook 03's table). The original's own ``full`` is the reference itself:
    ``is_reference`` True, no fidelity value. ``origins``: {fine-tuned label: original label}."""
    missing = {"model", "config", "architecture"} - set(summary.columns)
    if missing:
        raise ValueError(f"summary lacks columns {sorted(missing)} (fcr.experiments.sweep.summarize of run_sweep's table)")
    cost_cols = [c for c in COST_COLUMNS if c in cost.columns]
    if not cost_cols:
        raise ValueError(f"cost has none of the cost columns {COST_COLUMNS}")
    costs = cost.set_index(["architecture", "config"])[cost_cols]
    fid = fidelity.set_index(["model", "config", "reference"]) if not fidelity.empty else None
    rows = []
    for _, s in summary.iterrows():
        model, config = str(s["model"]), str(s["config"])
        row: dict[str, Any] = {
            "model": model, "config": config, "family": method_family(config, str(s.get("scheduler", "ddim"))),
            "original": origins.get(model, model), "n_seeds": int(s["n_seeds"]),
            "num_inference_steps": s.get("num_inference_steps"),
        }
        row["series"] = f"{series_model(model, row['family'])} · {row['family']}"
        row["approach"] = approach(model, row["family"], origins)
        key = (s["architecture"], config)
        if key not in costs.index:
            raise ValueError(f"no cost row for {config!r} on architecture {s['architecture']!r}: run_sweep writes one per "
                             "architecture x configuration")
        row.update(costs.loc[key].to_dict())
        for col in (FD_COLUMN, f"{FD_COLUMN}_lo", f"{FD_COLUMN}_hi"):
            row[col] = s.get(col, np.nan)
        reference = _reference_of(model, origins)
        row["reference"] = reference
        row["is_reference"] = model not in origins and config == "full"
        ref_key = (model, config, reference)
        if fid is not None and ref_key in fid.index and endpoint in fid.columns:
            hit = fid.loc[ref_key]
            row.update({endpoint: hit[endpoint], f"{endpoint}_lo": hit[f"{endpoint}_lo"],
                        f"{endpoint}_hi": hit[f"{endpoint}_hi"], "n_images": hit["n_images"]})
        else:
            row.update({endpoint: np.nan, f"{endpoint}_lo": np.nan, f"{endpoint}_hi": np.nan, "n_images": np.nan})
        rows.append(row)
    return pd.DataFrame(rows)


def _paired_row(a: np.ndarray, b: np.ndarray, n_boot: int, prefix: str) -> dict[str, float]:
    est, lo, hi = bootstrap_ci(a - b, n_boot=n_boot, seed=0)
    return {f"{prefix}": est, f"{prefix}_lo": lo, f"{prefix}_hi": hi}


def _verdict(lo: float, hi: float, direction: int) -> str:
    if (lo > 0 and direction > 0) or (hi < 0 and direction < 0):
        return "better"
    if (hi < 0 and direction > 0) or (lo > 0 and direction < 0):
        return "worse"
    return "not distinguishable"


def matched_cost(
    points: pd.DataFrame,
    sweep_dir: str | Path,
    seeds: Sequence[int],
    *,
    original: str,
    budgets: Sequence[str] = ("FD-5", "FD-10"),
    cost_column: str = "flops_per_image",
    endpoint: str = "psnr",
    n_boot: int = 2000,
) -> pd.DataFrame:
    """Best quality at matched cost. For each budget configuration of the ``original`` model, its
    cost is the budget; every series' best point (best ``endpoint``: its direction in
    :data:`fcr.contract.FIDELITY_DIRECTIONS`) that costs at most that
    much is compared, image by image over ``seeds``, with the budget configuration itself
    (``diff_vs_budget`` and its percentile bootstrap 95 % interval, ``vs_budget``: better / worse /
    not distinguishable) and with the best point of all series within the budget (``diff_vs_best``,
    ``dominated_by``: the best series when its interval excludes zero). A series with no point
    within the budget is left out. Budgets the original did not run raise ValueError. A trained
    series (a fine-tune or a distilled student) is also compared with the best training-free series
    there, the original's own samplers (``best_training_free``, ``diff_vs_training_free`` and ``vs_training_free``: better / worse /
    not distinguishable)."""
    if endpoint not in FIDELITY_DIRECTIONS:
        raise ValueError(f"endpoint {endpoint!r}: allowed {sorted(FIDELITY_DIRECTIONS)}")
    direction = FIDELITY_DIRECTIONS[endpoint]
    if cost_column not in points.columns:
        raise ValueError(f"cost column {cost_column!r} not among the points' columns; allowed {COST_COLUMNS}")
    rows: list[dict[str, Any]] = []
    usable = points[~points["is_reference"] & points[endpoint].notna()]
    for budget_config in budgets:
        hit = points[(points["model"] == original) & (points["config"] == budget_config)]
        if hit.empty:
            raise ValueError(f"budget {budget_config!r}: the original {original!r} did not run it in this sweep")
        budget = float(hit[cost_column].iloc[0])
        within = usable[usable[cost_column] <= budget]
        best = within.sort_values(endpoint, ascending=direction < 0, kind="stable").groupby("series", sort=False).head(1)
        if best.empty:
            continue
        values = {(r.model, r.config): per_image_fidelity(sweep_dir, r.model, r.config, r.reference, seeds, endpoint)
                  for r in best.itertuples()}
        base = per_image_fidelity(sweep_dir, original, budget_config, _reference_of(original, {}), seeds, endpoint)
        top = best.iloc[0]
        top_values = values[(top["model"], top["config"])]
        free = best[best["model"] == original]  # the original's own samplers: no training at all
        free_top = free.iloc[0] if not free.empty else None
        free_values = None if free_top is None else values[(free_top["model"], free_top["config"])]
        for r in best.itertuples():
            v = values[(r.model, r.config)]
            row: dict[str, Any] = {
                "budget": budget_config, "budget_cost": budget, "cost_column": cost_column, "series": r.series,
                "model": r.model, "config": r.config, "family": r.family, "cost": getattr(r, cost_column),
                "cost_vs_budget": getattr(r, cost_column) / budget, endpoint: getattr(r, endpoint),
                FD_COLUMN: getattr(r, FD_COLUMN), "n_images": int(v.size),
            }
            row.update(_paired_row(v, base, n_boot, "diff_vs_budget"))
            row["vs_budget"] = _verdict(row["diff_vs_budget_lo"], row["diff_vs_budget_hi"], direction)
            if r.series == top["series"]:
                row.update({"diff_vs_best": 0.0, "diff_vs_best_lo": 0.0, "diff_vs_best_hi": 0.0, "dominated_by": ""})
            else:
                row.update(_paired_row(v, top_values, n_boot, "diff_vs_best"))
                worse = _verdict(row["diff_vs_best_lo"], row["diff_vs_best_hi"], direction) == "worse"
                row["dominated_by"] = top["series"] if worse else ""
            row["best_training_free"] = "" if free_top is None else free_top["series"]
            if free_values is not None and r.model != original:
                row.update(_paired_row(v, free_values, n_boot, "diff_vs_training_free"))
                row["vs_training_free"] = _verdict(row["diff_vs_training_free_lo"], row["diff_vs_training_free_hi"],
                                                   direction)
            rows.append(row)
    if not rows:  # no series within any budget: the columns still name what the table holds
        return pd.DataFrame(columns=["budget", "budget_cost", "cost_column", "series", "model", "config", "family",
                                     "cost", "cost_vs_budget", endpoint, "diff_vs_budget", "vs_budget", "dominated_by"])
    return pd.DataFrame(rows)


def frontier_from_sweep(
    sweep_dir: str | Path,
    origins: Mapping[str, str],
    original: str,
    *,
    cost_column: str = "flops_per_image",
    endpoint: str = "psnr",
    budgets: Sequence[str] = ("FD-5", "FD-10"),
    n_boot: int = 2000,
    differs_only_at: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The frontier points (with ``pareto``: on the front of all points, on ``cost_column`` x
    ``endpoint``) and the matched-cost table of a finished sweep folder (notebook 03's
    ``quality.csv``, ``cost.csv`` and ``fidelity.csv``, per-image fidelity files under it).
    ``differs_only_at`` ({model: configuration}, :func:`fcr.analysis.cache_aware.differs_only_at`):
    models that are their original at every other configuration (a scale-shift beside a frozen
    UNet); their cells there are the original's sampler again and are no points of the frontier."""
    sweep_dir = Path(sweep_dir)
    missing = [name for name in (contract.QUALITY, contract.COST, contract.FIDELITY) if not (sweep_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{sweep_dir} lacks {missing}: the frontier reads a finished 03_stride_sweep run")
    quality = pd.read_csv(sweep_dir / contract.QUALITY)
    for model, config in (differs_only_at or {}).items():
        quality = quality[(quality["model"] != model) | (quality["config"] == config)]
    points = frontier_points(summarize(quality), pd.read_csv(sweep_dir / contract.COST),
                             pd.read_csv(sweep_dir / contract.FIDELITY), origins, endpoint=endpoint)
    if original not in set(points["model"]):
        raise ValueError(f"the original {original!r} is not a model of the sweep {sweep_dir}")
    points["pareto"] = pareto_mask(points[cost_column], points[endpoint], FIDELITY_DIRECTIONS[endpoint] > 0)
    seeds = sorted(int(s) for s in quality["seed"].unique())
    table = matched_cost(points, sweep_dir, seeds, original=original, budgets=budgets, cost_column=cost_column,
                         endpoint=endpoint, n_boot=n_boot)
    return points, table


def pooled_arms(points: pd.DataFrame, sweep_dir: str | Path, arms: Mapping[str, tuple[str, Sequence[str]]],
                seeds: Sequence[int] | None = None, *, cost_column: str = "flops_per_image", endpoint: str = "psnr",
                n_boot: int = 2000) -> pd.DataFrame:
    """``points`` with each arm's training runs (``{arm: (configuration, [replicate labels])}``, as
    :func:`fcr.analysis.cache_aware.cache_aware_arms` groups cache-aware fine-tunes) replaced by one
    point per arm x configuration, approach ``cache-aware``: per image the mean over the runs of
    ``endpoint``, its mean with a percentile bootstrap 95 % interval over the images (the unit the
    contrasts test), ``n_runs``; the set metric is the runs' mean (no interval). ``pareto`` is
    recomputed over the returned points. Costs are the runs' own (one architecture). ``seeds`` None:
    every seed of the sweep's ``quality.csv``."""
    if seeds is None:
        seeds = sorted(int(v) for v in pd.read_csv(Path(sweep_dir) / contract.QUALITY)["seed"].unique())
    runs = {label for _, replicates in arms.values() for label in replicates}
    out = [points[~points["model"].isin(runs)]]
    for arm, (_, replicates) in arms.items():
        rows = points[points["model"].isin(replicates)]
        for config, group in rows.groupby("config", sort=False):
            if len(group) != len(replicates):
                raise ValueError(f"arm {arm!r}: {config} was sampled by {len(group)} of its {len(replicates)} runs")
            values = np.mean([per_image_fidelity(sweep_dir, m, config, str(r), seeds, endpoint)
                              for m, r in zip(group["model"], group["reference"])], axis=0)
            est, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=0)
            row = group.iloc[0].copy()
            row[["model", "series", "approach", endpoint, f"{endpoint}_lo", f"{endpoint}_hi", "n_images"]] = [
                arm, f"{arm} · {row['family']}", "cache-aware", est, lo, hi, len(values)]
            if FD_COLUMN in row:
                row[[FD_COLUMN, f"{FD_COLUMN}_lo", f"{FD_COLUMN}_hi"]] = [group[FD_COLUMN].mean(), np.nan, np.nan]
            row["n_runs"] = len(replicates)
            out.append(row.to_frame().T)
    pooled = pd.concat(out, ignore_index=True).infer_objects()
    pooled["pareto"] = pareto_mask(pooled[cost_column], pooled[endpoint], FIDELITY_DIRECTIONS[endpoint] > 0)
    return pooled
