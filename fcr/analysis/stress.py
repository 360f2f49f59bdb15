"""Criterion c as a difference in differences of the paired caching error under stress.

The seed's criterion c ("the quality drop under stress with FCR is no larger than the original
model's") compared mean FD / accuracy drops, point estimate against point estimate. What caching
changes is each image, so here the endpoint is paired caching fidelity: within one model, stress
and seed, each cached image against the same model's ``full`` image of the same prompt and initial
noise (:func:`fcr.eval.fidelity.fidelity`, e.g. PSNR). Per image ``i`` the *drop* under stress
``s`` is ``direction * (e_none,i - e_s,i)`` (positive: caching got less faithful under stress).
The contrast of FCR against a comparator (the original model, or the λ = 0 control) is

    DiD = mean_i [ mean_r drop_FCR_r,i  -  mean_r drop_comparator_r,i ]

over training replicates ``r`` and the images both sides sampled from the same prompts and noise
(the same seeds), tested for non-inferiority with a pre-registered margin: H0 DiD >= margin
against H1 DiD < margin (one-sided paired t), Holm over every row of the family.

The adversarial stress attacks ``z_T`` against one key interval; ``full`` reuses the attack of the
largest stride (:func:`fcr.experiments.robustness.stresses.attack_stride`), so under that stress a
cached configuration pairs with ``full`` only when it is that stride (others are left out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from fcr.stats import holm, mean_ci_over_seeds, paired_mde
from fcr.contract import FIDELITY_DIRECTIONS

__all__ = ["STRESS_DID_COLUMNS", "stress_did", "stress_fidelity_summary"]

STRESS_DID_COLUMNS = [
    "comparison", "model", "vs_model", "config", "stress", "endpoint", "n", "n_runs", "drop_fcr", "drop_comparator",
    "estimate", "lo", "hi", "margin", "p", "p_holm", "m_tests", "sd_diff", "mde", "decision", "run_estimates",
]


def _drops(per_image: pd.DataFrame, model: str, config: str, stress: str, endpoint: str,
           seeds: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    """Per image (pooled over ``seeds``, in order) the drop of ``model@config`` under ``stress`` and
    the stressed prompts."""
    rows = per_image[(per_image["model"] == model) & (per_image["config"] == config)]
    drops, prompts = [], []
    for seed in seeds:
        stressed = rows[(rows["stress"] == stress) & (rows["seed"] == seed)].sort_values("image")
        nominal = rows[(rows["stress"] == "none") & (rows["seed"] == seed)].sort_values("image")
        if len(stressed) != len(nominal) or not np.array_equal(stressed["image"].to_numpy(), nominal["image"].to_numpy()):
            raise ValueError(f"{model}@{config}, seed {seed}: {stress!r} and 'none' hold different images")
        direction = FIDELITY_DIRECTIONS[endpoint]
        drops.append(direction * (nominal[endpoint].to_numpy(float) - stressed[endpoint].to_numpy(float)))
        prompts += stressed["prompt"].astype(str).tolist()
    return np.concatenate(drops), prompts


def stress_fidelity_summary(per_image: pd.DataFrame, endpoint: str, alpha: float = 0.05) -> pd.DataFrame:
    """Per model x cached configuration x stress: the mean caching fidelity (``value``) and, for the
    stresses, the mean per-image drop from ``none`` with its t-interval over the pooled images
    (``drop``, ``drop_lo``, ``drop_hi``; positive: less faithful under stress)."""
    rows = []
    for (model, config, stress), group in per_image.groupby(["model", "config", "stress"], sort=False):
        row: dict[str, Any] = {"model": model, "config": config, "stress": stress, "endpoint": endpoint,
                               "n": len(group), "value": float(group[endpoint].mean())}
        if stress != "none":
            seeds = _seeds_of(per_image, [model], config, stress)
            drops, _ = _drops(per_image, model, config, stress, endpoint, seeds)
            row["drop"], row["drop_lo"], row["drop_hi"] = mean_ci_over_seeds(drops, alpha)  # t-interval over images
        rows.append(row)
    return pd.DataFrame(rows)


def _seeds_of(per_image: pd.DataFrame, models: Sequence[str], config: str, stress: str) -> list[int]:
    sets = [set(per_image.loc[(per_image["model"] == m) & (per_image["config"] == config)
                              & (per_image["stress"] == s), "seed"].astype(int))
            for m in models for s in (stress, "none")]
    return sorted(set.intersection(*sets)) if sets else []


def _noninferior(diff: np.ndarray, margin: float, alpha: float) -> dict[str, Any]:
    """Mean of ``diff`` with its two-sided 1 - alpha t-interval and the one-sided p of H0: mean >= margin."""
    n = len(diff)
    est, lo, hi = mean_ci_over_seeds(diff, alpha)
    sd = float(diff.std(ddof=1)) if n > 1 else math.nan
    if not n > 1 or sd == 0:
        p = 0.0 if est < margin else 1.0
    else:
        p = float(scipy.stats.t.cdf((est - margin) / (sd / math.sqrt(n)), n - 1))
    return {"n": n, "estimate": est, "lo": lo, "hi": hi, "p": p, "sd_diff": sd}


def stress_did(
    per_image: pd.DataFrame,
    comparisons: Sequence[tuple[str, Sequence[str], Sequence[str]]],
    *,
    endpoint: str,
    margin: float,
    alpha: float = 0.05,
    power: float = 0.8,
    configs: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The difference-in-differences family of :func:`stress_fidelity_table`'s ``per_image``: for
    each ``(label, FCR runs, comparator runs)`` of ``comparisons`` (runs: training replicates of one
    fine-tune, or the original model alone), each cached configuration (``configs``, default all)
    and each stress other than ``none``, over the seeds every run has under both that stress and
    ``none``. Replicates pair by position for ``run_estimates`` (one comparator run pairs with every
    FCR run). Holm over the whole family; ``mde``: how far below the margin the true DiD must lie
    for the design to establish it (power ``power`` at Holm's strictest level). Decisions: ``no
    larger drop (margin …)`` (non-inferior after Holm), ``larger drop`` (interval above the margin),
    else ``not established at n = …``. Raises ValueError when the two sides' images were not
    sampled from the same prompts."""
    if endpoint not in FIDELITY_DIRECTIONS:
        raise ValueError(f"endpoint {endpoint!r}: allowed {sorted(FIDELITY_DIRECTIONS)}")
    if endpoint not in per_image.columns:
        return pd.DataFrame(columns=STRESS_DID_COLUMNS)
    stresses = [s for s in dict.fromkeys(per_image["stress"].astype(str)) if s != "none"]
    wanted = list(dict.fromkeys(per_image["config"].astype(str))) if configs is None else list(configs)
    rows: list[dict[str, Any]] = []
    for label, arm, comparator in comparisons:
        arm, comparator = list(arm), list(comparator)
        for config in wanted:
            for stress in stresses:
                seeds = _seeds_of(per_image, arm + comparator, config, stress)
                if not seeds:
                    continue
                arm_runs, cmp_runs = [], []
                for runs, out in ((arm, arm_runs), (comparator, cmp_runs)):
                    for model in runs:
                        drops, prompts = _drops(per_image, model, config, stress, endpoint, seeds)
                        out.append((drops, prompts))
                first = arm_runs[0][1]
                for model, (_, prompts) in zip(arm + comparator, arm_runs + cmp_runs):
                    if prompts != first:
                        raise ValueError(f"{model}@{config} under {stress!r} was sampled from other prompts than "
                                         f"{arm[0]}: no paired comparison")
                a = np.mean([d for d, _ in arm_runs], axis=0)
                c = np.mean([d for d, _ in cmp_runs], axis=0)
                pairs = [float(np.mean(d - cmp_runs[k % len(cmp_runs)][0])) for k, (d, _) in enumerate(arm_runs)]
                rows.append({
                    "comparison": label, "model": "+".join(arm), "vs_model": "+".join(comparator), "config": config,
                    "stress": stress, "endpoint": endpoint, "n_runs": len(arm), "drop_fcr": float(a.mean()),
                    "drop_comparator": float(c.mean()), "margin": float(margin),
                    "run_estimates": "; ".join(f"{e:.4g}" for e in pairs), **_noninferior(a - c, margin, alpha),
                })
    if not rows:
        return pd.DataFrame(columns=STRESS_DID_COLUMNS)
    adjusted = holm([r["p"] for r in rows])
    for r, p in zip(rows, adjusted):
        r["p_holm"], r["m_tests"] = float(p), len(rows)
        usable = r["n"] > 1 and math.isfinite(r["sd_diff"]) and r["sd_diff"] > 0
        r["mde"] = paired_mde(r["sd_diff"], int(r["n"]), alpha / len(rows), power, sides=1) if usable else math.nan
        if r["p_holm"] < alpha:
            r["decision"] = f"no larger drop (margin {margin:g})"
        elif r["lo"] > margin:
            r["decision"] = "larger drop"
        else:
            r["decision"] = f"not established at n = {int(r['n'])}"
    return pd.DataFrame(rows)[STRESS_DID_COLUMNS]
