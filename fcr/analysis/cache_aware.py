"""Contrasts of issue #33: a trained model's cached sampling against the original's at the SAME
configuration, both scored by fidelity to the original's full sampling of the same prompt and noise.

Per image, the endpoint of an arm is the mean over its training replicates; the contrast is that mean
minus the original's, tested with a two-sided paired t over the images, Holm within the family (every
row of one call), with the minimal detectable effect at the measured spread. A contrast Holm does not
reject is "not detectable at n = ..." with its MDE, never "no difference".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fcr.analysis.contrasts import fd_infinity_table
from fcr.analysis.paired import per_image_fidelity, per_image_table
from fcr.analysis.rows import LAYOUT
from fcr.contract import CACHE_AWARE_CONTRASTS, CACHE_AWARE_FAMILY, QUALITY
from fcr.stats import decide_family, paired_difference

__all__ = ["ENDPOINT_SUFFIX", "ORIGINAL_FULL", "OWN_FULL", "arm_families", "cache_aware_arms", "differs_only_at",
           "fd_infinity_noninferiority", "same_configuration_contrasts", "study_rows", "study_rows_under"]

ORIGINAL_FULL = "original_full"  # a trained model's images against the original's full sampling
OWN_FULL = "own_full"  # the original's images against its own full sampling
ENDPOINT_SUFFIX = "_vs_original_full"  # its endpoint there: fidelity to the ORIGINAL's full sampling


def _arm_of(label: str) -> str:
    return re.sub(r"_seed\d+$", "", label)  # replicates differ only by their training seed's suffix


def cache_aware_arms(records: Mapping[str, dict | None]) -> dict[str, tuple[str, list[str]]]:
    """The arms among models ``{label: cache-training record or None}``: runs trained for the same
    configuration whose labels differ only by a ``_seed<k>`` suffix are one arm's replicates."""
    arms: dict[str, tuple[str, list[str]]] = {}
    for label, record in records.items():
        if record is None:
            continue
        arm = _arm_of(label)
        config, replicates = arms.setdefault(arm, (record["configuration"], []))
        if config != record["configuration"]:
            raise ValueError(f"{label} was trained for {record['configuration']}, its arm {arm!r} for {config}")
        replicates.append(label)
    return arms


def arm_families(records: Mapping[str, dict | None]) -> dict[str, str]:
    """The Holm family of each arm: its trainable part (``all`` weights were the pre-registered
    family of the study; a ``scale_shift`` arm, added after it, is a family of its own)."""
    return {_arm_of(label): str(record.get("trainable", "all"))
            for label, record in records.items() if record is not None}


def differs_only_at(records: Mapping[str, dict | None]) -> dict[str, str]:
    """{label: configuration} of the runs that trained a scale-shift beside the frozen UNet
    (``trainable: scale_shift``): the correction acts only at the configuration it was trained for
    (:meth:`fcr.eval.context.LoadedModel.correction_for`), so at every other one the run samples
    with the original's weights and sampler: the original's images again, not a point of its own."""
    return {label: str(record["configuration"]) for label, record in records.items()
            if record is not None and str(record.get("trainable", "all")) == "scale_shift"}


def same_configuration_contrasts(sweep_dir: str | Path, arms: Mapping[str, tuple[str, Sequence[str]]], original: str,
                                 seeds: Sequence[int] | None = None, *, endpoint: str = "psnr", alpha: float = 0.05,
                                 power: float = 0.8, families: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per arm (``{arm: (configuration, [replicate model labels])}``): ``estimate`` (mean over
    images of the replicates' mean endpoint minus the original's, same configuration), its 95 % t
    interval, ``p`` and ``p_holm`` (family of every arm, ``m`` tests), ``sd_diff``, ``mde`` (at
    ``alpha / m``, ``power``) and ``verdict``: better / worse / not detectable at n = ... . ``seeds``
    None: every seed the original sampled the configuration with. ``families`` ({arm: name},
    :func:`arm_families`): Holm within each named family (column ``family``); None: one family."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for arm, (config, replicates) in arms.items():
        if not replicates:
            raise ValueError(f"arm {arm!r} has no replicate models")
        arm_seeds = seeds
        if arm_seeds is None:  # the seeds of this arm's configuration
            table = per_image_table(sweep_dir)
            arm_seeds = sorted(int(s) for s in table.loc[(table["model"] == original) & (table["config"] == config)
                                                         & (table["reference"] == OWN_FULL), "seed"].unique())
        runs = [per_image_fidelity(sweep_dir, m, config, ORIGINAL_FULL, arm_seeds, endpoint) for m in replicates]
        ours = np.mean(runs, axis=0)
        theirs = per_image_fidelity(sweep_dir, original, config, OWN_FULL, arm_seeds, endpoint)
        per_run = [float(np.mean(r - theirs)) for r in runs]  # each training run's own estimate
        rows.append({"arm": arm, "config": config, "endpoint": endpoint, "replicates": len(replicates),
                     "original_model": original, "original": float(theirs.mean()), "trained": float(ours.mean()),
                     **paired_difference(ours, theirs),
                     "run_estimates": "; ".join(f"{e:.4g}" for e in per_run),
                     "run_sd": float(np.std(per_run, ddof=1)) if len(per_run) > 1 else float("nan")})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table.insert(0, "family", [(families or {}).get(arm, "all") for arm in table["arm"]])
    return pd.concat([decide_family(group, alpha, power) for _, group in table.groupby("family", sort=False)],
                     ignore_index=True)


def study_rows(table: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """:func:`same_configuration_contrasts`' rows (notebook 06's ``cache_aware_contrasts.csv``) as rows
    of the study's contrasts table (:data:`fcr.contract.CONTRASTS`): family ``cache-aware: <family>``,
    the arm against the original at the same configuration, endpoint ``<endpoint>_vs_original_full``,
    the decision ``trained better`` / ``trained worse`` / ``not detectable at n = ...``."""
    if table.empty:
        return pd.DataFrame()
    endpoint = table["endpoint"].astype(str) if "endpoint" in table else pd.Series("psnr", index=table.index)
    original = table["original_model"] if "original_model" in table else pd.Series("original", index=table.index)
    family = table["family"] if "family" in table else pd.Series("all", index=table.index)
    return pd.DataFrame({
        "family": CACHE_AWARE_FAMILY + family.astype(str),
        "contrast": "cache-aware " + table["arm"].astype(str) + " vs original",
        "kind": "superiority", "endpoint": endpoint + ENDPOINT_SUFFIX,
        "model": table["arm"], "config": table["config"], "vs_model": original, "vs_config": table["config"],
        "n": table["n"], "estimate": table["estimate"], "lo": table["ci_lo"], "hi": table["ci_hi"],
        "margin": np.nan, "p": table["p"], "p_holm": table["p_holm"], "m_tests": table["m"],
        "sd_diff": table["sd_diff"], "mde": table["mde"],
        "decision": [v if v.startswith("not detectable") else f"trained {v}" for v in table["verdict"].astype(str)],
        "n_runs": table["replicates"], "run_estimates": table.get("run_estimates", np.nan),
        "run_sd": table.get("run_sd", np.nan), "backbone": original, "experiment": experiment,
    })


def study_rows_under(root: str | Path) -> pd.DataFrame:
    """:func:`study_rows` of every frontier run's ``cache_aware_contrasts.csv`` under a run's ``root``
    (``<experiment>/frontier/<run>/``); empty when no frontier run has trained arms."""
    paths = sorted(Path(root).glob(f"*/{LAYOUT['frontier']}/*/{CACHE_AWARE_CONTRASTS}"))
    frames = [study_rows(pd.read_csv(p), p.parents[2].name) for p in paths]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def fd_infinity_noninferiority(sweep_dir: str | Path, arms: Mapping[str, tuple[str, Sequence[str]]], original: str, *,
                               margin_pct: float = 5.0, z: float = 1.959964) -> pd.DataFrame:
    """The secondary endpoint of issue #33 (descriptive): per arm at its configuration, FD∞
    (:func:`fcr.eval.metrics.fd_infinity`, the classifier features of each training run's images
    against the real reference) as the mean over its runs, ``fd_inf_hi`` = mean + ``z`` x the
    extrapolations' standard error of that mean (``run_sd``: the spread between runs, beside it);
    ``non_inferior`` when ``fd_inf_hi`` is below (1 + ``margin_pct`` %) x the original's full-sampling
    FD∞. The original at the arm's configuration is shown for context (``original_fd_inf``)."""
    sweep_dir = Path(sweep_dir)
    quality = pd.read_csv(sweep_dir / QUALITY)
    cells = {(original, "full")} | {(original, c) for c, _ in arms.values()} | {
        (m, c) for c, reps in arms.values() for m in reps}
    keep = [(str(m), str(c)) in cells for m, c in zip(quality["model"], quality["config"])]
    table = fd_infinity_table(sweep_dir, quality[keep], list(dict.fromkeys(m for m, _ in sorted(cells))))
    # A cell with too few images for FD∞ (fcr.analysis.contrasts.fd_infinity_table skips it) reads NaN.
    table = table.set_index(["model", "config"]) if not table.empty else pd.DataFrame(
        columns=["fd_inf", "fd_inf_se"], index=pd.MultiIndex.from_tuples([], names=["model", "config"]))
    table = table.reindex(sorted(cells))
    full = float(table.loc[(original, "full"), "fd_inf"])
    rows = []
    for arm, (config, replicates) in arms.items():
        runs = table.loc[[(m, config) for m in replicates]]
        est = float(runs["fd_inf"].mean())
        hi = est + z * float(np.sqrt((runs["fd_inf_se"] ** 2).sum())) / len(runs)
        rows.append({"arm": arm, "config": config, "runs": len(runs), "fd_inf": est, "fd_inf_hi": hi,
                     "run_sd": float(runs["fd_inf"].std(ddof=1)) if len(runs) > 1 else np.nan,
                     "original_fd_inf": float(table.loc[(original, config), "fd_inf"]), "full_fd_inf": full,
                     "margin_pct": margin_pct,
                     "non_inferior": bool(hi < (1 + margin_pct / 100) * full) if np.isfinite(hi + full) else None})
    return pd.DataFrame(rows)
