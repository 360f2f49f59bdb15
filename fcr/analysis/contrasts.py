"""Pre-registered contrasts of the study (``study`` in ``params/experiments.yaml``,
:class:`fcr.manifest.Study`), evaluated on a
sweep's per-image results with Holm's correction within each family.

Every contrast is paired: both sides are the same prompts and initial noise (image ``i`` of seed
``k`` on both sides), pooled over seeds.

- **primary** (superiority, two-sided paired t): FCR(λ) at stride ``s`` against the λ = 0 control at
  the same stride on the primary fidelity endpoint (e.g. PSNR to the model's own full sampling),
  for every λ x stride: did FCR make caching more faithful than the same fine-tune without it?
  With training replicates (several seeds of each fine-tune), the per-image values are averaged
  over each arm's runs first; the test then generalises over prompts and noise for these runs, and
  each replicate pair's estimate is reported beside it (``run_estimates``, spread ``run_sd``).
- **secondary** (non-inferiority, one-sided, the seed's margins): the FCR model at stride ``s``
  against the original model at FD-5, on the FD increase in % (paired bootstrap over images) and
  on the class-accuracy change in points (paired t), at each pre-registered stride and at the
  original model's first unsafe stride (:func:`safe_strides`). Which λ: the one the *selection*
  run (another seed) prefers on the primary endpoint, never chosen on the reported data.

A contrast whose adjusted p-value does not reach ``alpha`` is reported as "not detectable at
n = …" with the minimal detectable effect of the design, never as a pass or a fail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
from safetensors.torch import load_file

from fcr import contract
from fcr.analysis.paired import cell_tensors, check_same_prompts, load_fidelity
from fcr.stats import bootstrap_replicates, holm, paired_mde
from fcr.contract import FIDELITY_DIRECTIONS
from fcr.eval.metrics import FrechetToReference, fd_infinity, feature_statistics
from fcr.manifest import Study

__all__ = [
    "CONTRAST_COLUMNS",
    "adjust_family",
    "common_seeds",
    "evaluate_contrasts",
    "noninferiority",
    "fd_infinity_table",
    "length_contrasts",
    "variant_contrasts",
    "power_table",
    "safe_strides",
    "select_lambda",
]

CONTRAST_COLUMNS = [
    "family", "contrast", "kind", "endpoint", "model", "config", "vs_model", "vs_config", "n", "estimate",
    "lo", "hi", "margin", "p", "p_holm", "m_tests", "sd_diff", "mde", "decision", "n_runs", "run_estimates",
    "run_sd",
]


# ----------------------------------------------------------------------------- per-image inputs


def _seeds(quality: pd.DataFrame, model: str, config: str) -> list[int]:
    hit = quality[(quality["model"].astype(str) == model) & (quality["config"].astype(str) == config)]
    return sorted(int(s) for s in hit["seed"].unique())


def common_seeds(quality: pd.DataFrame, cells: Sequence[tuple[str, str]]) -> list[int]:
    """The seeds every ``(model, configuration)`` cell of ``cells`` ran in ``quality``, sorted: the
    images they share, so their per-image values pair."""
    if not cells:
        return []
    return sorted(set.intersection(*(set(_seeds(quality, m, c)) for m, c in cells)))


def _fidelity_values(sweep_dir: Path, model: str, config: str, endpoint: str, reference: str,
                     seeds: Sequence[int]) -> np.ndarray:
    return np.concatenate([load_fidelity(sweep_dir, model, config, s, reference)[endpoint].double().numpy()
                           for s in seeds])


def _cells(sweep_dir: Path, model: str, config: str, seeds: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-image ``features`` (embedded: the classifier's; SD has none) and ``alignment`` (embedded:
    prompted class correct, 0/1; SD: CLIPScore) of one model x configuration, pooled over seeds."""
    parts = [cell_tensors(sweep_dir, model, config, s)[0] for s in seeds]
    out = {}
    if "features" in parts[0]:
        out["features"] = np.concatenate([p["features"].double().numpy() for p in parts])
    key = "correct" if "correct" in parts[0] else "clip_score"
    out["alignment"] = np.concatenate([p[key].double().numpy() for p in parts])
    return out


def _reference_features(sweep_dir: Path) -> np.ndarray:
    files = sorted((sweep_dir / "reference").glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one reference-feature file in {sweep_dir / 'reference'}, found {len(files)}")
    return load_file(str(files[0]))["features"].double().numpy()


# ----------------------------------------------------------------------------- tests


def _superiority(diff: np.ndarray, study: Study) -> dict[str, Any]:
    n = len(diff)
    t = scipy.stats.ttest_1samp(diff, 0.0) if np.any(diff != diff[0]) else None
    p = float(t.pvalue) if t is not None else (1.0 if diff[0] == 0 else 0.0)
    half = float(scipy.stats.t.ppf(1 - study.alpha / 2, n - 1) * diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    est = float(diff.mean())
    return {"n": n, "estimate": est, "lo": est - half, "hi": est + half, "p": p,
            "sd_diff": float(diff.std(ddof=1)) if n > 1 else math.nan}


def _replicated_superiority(arm: Sequence[np.ndarray], controls: Sequence[np.ndarray], study: Study) -> dict[str, Any]:
    """:func:`_superiority` of the per-image mean over an arm's training runs minus the controls'
    (each array: one run's per-image values, images in the same order), with the estimate of every
    replicate pair (run ``k`` of the arm minus run ``k`` of the controls: same training seed) and
    their spread. With one run per arm it is the plain paired test."""
    out = _superiority(np.mean(arm, axis=0) - np.mean(controls, axis=0), study)
    pairs = [float(np.mean(a - c)) for a, c in zip(arm, controls)]
    out["run_estimates"] = "; ".join(f"{e:.4g}" for e in pairs)
    out["run_sd"] = float(np.std(pairs, ddof=1)) if len(pairs) > 1 else math.nan
    return out


def _fd_change_pct(ref_feats: np.ndarray) -> Any:
    frechet = FrechetToReference(*feature_statistics(ref_feats))

    def change(rows: np.ndarray) -> float:  # rows: [features of the tested cell | of the reference cell]
        d = rows.shape[1] // 2
        base = frechet(rows[:, d:])
        return 100.0 * (frechet(rows[:, :d]) - base) / base

    return change


def _noninferior_fd(a: np.ndarray, b: np.ndarray, ref_feats: np.ndarray, study: Study, seed: int) -> dict[str, Any]:
    """ΔFD % of ``a`` over ``b`` (features of the same images), paired bootstrap over images; one-sided
    p of H0: ΔFD ≥ margin.

    FD is biased upward at small n and a resample's duplicated rows add to that bias, so percentile
    replicates sit above the estimate; the *basic* bootstrap reflects them about the estimate
    (replicate ``2 est − r``), which removes that shift: the interval is ``[2 est − q_hi, 2 est −
    q_lo]`` and p is the share of reflected replicates at or above the margin."""
    rows = np.concatenate([a, b], axis=1)
    f = _fd_change_pct(ref_feats)
    est = f(rows)
    reflected = 2 * est - bootstrap_replicates(f, rows, study.n_boot, seed)
    lo, hi = np.percentile(reflected, [100 * study.alpha / 2, 100 * (1 - study.alpha / 2)])
    p = float((1 + np.sum(reflected >= study.fd_margin_pct)) / (1 + len(reflected)))
    return {"n": len(a), "estimate": est, "lo": float(lo), "hi": float(hi), "p": p,
            "margin": study.fd_margin_pct, "sd_diff": math.nan}


def _noninferior_alignment(a: np.ndarray, b: np.ndarray, study: Study) -> dict[str, Any]:
    """Relative change in % of the prompt alignment (class accuracy; SD: CLIPScore) of ``a`` over
    ``b``, paired per image (differences scaled by ``b``'s mean); one-sided t of H0: Δ ≤ margin."""
    scale = float(np.mean(b))
    diff = 100.0 * (a - b) / scale if scale != 0 else np.full(len(a), math.nan)
    n = len(diff)
    est, sd = float(diff.mean()), float(diff.std(ddof=1))
    if sd == 0:
        p = 0.0 if est > study.alignment_margin_pct else 1.0
    else:
        p = float(scipy.stats.t.sf((est - study.alignment_margin_pct) / (sd / math.sqrt(n)), n - 1))
    half = float(scipy.stats.t.ppf(1 - study.alpha / 2, n - 1) * sd / math.sqrt(n))
    return {"n": n, "estimate": est, "lo": est - half, "hi": est + half, "p": p, "margin": study.alignment_margin_pct,
            "sd_diff": sd}


def noninferiority(sweep_dir: str | Path, model: str, config: str, vs_model: str, vs_config: str,
                   seeds: Sequence[int], study: Study, *, ref_feats: np.ndarray | None = None,
                   seed: int = 0) -> list[dict[str, Any]]:
    """The two one-sided non-inferiority tests of ``model@config`` against ``vs_model@vs_config`` on
    the same images (``seeds``) with the study's margins: ΔFD % (paired bootstrap; nan without
    classifier features or reference features, e.g. SD) and the prompt-alignment change %, as rows
    with ``endpoint``, ``n``, ``estimate``, ``lo``, ``hi``, ``p`` (unadjusted), ``margin``, ``sd_diff``.
    ``ref_feats`` default: the sweep's reference features when present."""
    sweep_dir = Path(sweep_dir)
    if ref_feats is None and any((sweep_dir / "reference").glob("*.safetensors")):
        ref_feats = _reference_features(sweep_dir)
    a = _cells(sweep_dir, model, config, seeds)
    b = _cells(sweep_dir, vs_model, vs_config, seeds)
    if "features" in a and ref_feats is not None:
        fd = _noninferior_fd(a["features"], b["features"], ref_feats, study, seed=seed)
    else:  # SD: FID is a set metric of Inception features the side files do not hold
        fd = {"n": len(a["alignment"]), "estimate": math.nan, "lo": math.nan, "hi": math.nan, "p": math.nan,
              "margin": study.fd_margin_pct, "sd_diff": math.nan}
    return [{"endpoint": "fd_increase_pct", **fd},
            {"endpoint": "alignment_change_pct", **_noninferior_alignment(a["alignment"], b["alignment"], study)}]


def adjust_family(family: list[dict[str, Any]], study: Study) -> list[dict[str, Any]]:
    """One family of tests, in place: ``p_holm`` (Holm over its finite p), ``m_tests`` (how many),
    ``mde`` (at Holm's strictest level, from the row's ``sd_diff``; nan without one) and the
    ``decision`` worded by the row's kind (superiority / non-inferiority). Returns ``family``."""
    adjusted = holm([r["p"] for r in family]) if family else []
    m = int(np.sum(~np.isnan([r["p"] for r in family]))) if family else 0
    for r, p in zip(family, adjusted):
        r["p_holm"], r["m_tests"] = float(p), m
        alpha_adj = study.alpha / max(m, 1)  # Holm's first (strictest) level: a conservative MDE
        sd = r.get("sd_diff", math.nan)
        usable = r["n"] > 1 and math.isfinite(sd)
        r["mde"] = paired_mde(sd, int(r["n"]), alpha_adj, study.power) if usable else math.nan
        r["decision"] = _decide(r, study)
    return family


def _decide(row: dict[str, Any], study: Study) -> str:
    n = int(row["n"])
    if not math.isfinite(float(row.get("p_holm", math.nan))):
        return "not run"
    if row["kind"] == "superiority":
        if row["p_holm"] < study.alpha:
            return "FCR better" if row["estimate"] * FIDELITY_DIRECTIONS[row["endpoint"]] > 0 else "FCR worse"
        return f"not detectable at n = {n} (MDE {row['mde']:.3g})"
    if row["p_holm"] < study.alpha:
        return "non-inferior"
    worse = row["lo"] > row["margin"] if row["endpoint"] == "fd_increase_pct" else row["hi"] < row["margin"]
    return "inferior" if worse else f"not established at n = {n}"


# ----------------------------------------------------------------------------- selection and safe strides


def select_lambda(sweep_dir: str | Path, quality: pd.DataFrame, fcr_models: Mapping[float, str], control: str,
                  study: Study) -> tuple[float, str] | None:
    """The λ whose FCR model beats the control most on the primary endpoint at the first
    pre-registered stride, on the *selection* run (never on the reported data); None when the
    selection run lacks the cells."""
    sweep_dir = Path(sweep_dir)
    config = study.strides[0]
    sign = FIDELITY_DIRECTIONS[study.primary_endpoint]
    best: tuple[float, float, str] | None = None
    for lam, model in sorted(fcr_models.items()):
        seeds = common_seeds(quality, [(model, config), (control, config)])
        if not seeds:
            continue
        gain = sign * float(np.mean(
            _fidelity_values(sweep_dir, model, config, study.primary_endpoint, study.primary_reference, seeds)
            - _fidelity_values(sweep_dir, control, config, study.primary_endpoint, study.primary_reference,
                               seeds)))
        if best is None or gain > best[0]:
            best = (gain, lam, model)
    return None if best is None else (best[1], best[2])


def safe_strides(sweep_dir: str | Path, quality: pd.DataFrame, models: Sequence[str], study: Study) -> pd.DataFrame:
    """Per model, the non-inferiority of every uniform stride ``FD-s`` (s > 5) against the model's
    own FD-5 (the seed's margins; Holm within the model's strides): ``safe_stride`` is the largest
    stride up to which every stride is shown non-inferior, ``first_unsafe`` the first that is not
    (None: every stride run is safe, or FD-5 missing)."""
    sweep_dir = Path(sweep_dir)
    ref_feats = _reference_features(sweep_dir)  # the FD margin needs per-image features (embedded)
    rows = []
    for model in models:
        strided = quality[(quality["model"].astype(str) == model) & quality["stride"].notna()
                          & quality["config"].astype(str).str.fullmatch(r"FD-\d+")]
        strides = sorted({int(s) for s in strided["stride"] if int(s) > 5})
        seeds = _seeds(quality, model, study.reference_config)
        if not seeds:
            continue
        ref = _cells(sweep_dir, model, study.reference_config, seeds)
        tests = []
        for s in strides:
            cell = _cells(sweep_dir, model, f"FD-{s}", seeds)
            fd = _noninferior_fd(cell["features"], ref["features"], ref_feats, study, seed=s)
            acc = _noninferior_alignment(cell["alignment"], ref["alignment"], study)
            tests.append((s, fd, acc))
        p_adj = holm([max(fd["p"], acc["p"]) for _, fd, acc in tests])  # both margins must hold
        safe, first_unsafe = 5, None
        for (s, fd, acc), p in zip(tests, p_adj):
            ok = bool(p < study.alpha)
            rows.append({"model": model, "stride": s, "fd_increase_pct": fd["estimate"], "fd_increase_pct_lo": fd["lo"],
                         "fd_increase_pct_hi": fd["hi"], "alignment_change_pct": acc["estimate"],
                         "alignment_change_pct_lo": acc["lo"], "alignment_change_pct_hi": acc["hi"],
                         "p_holm": float(p), "non_inferior": ok, "n": fd["n"]})
            if ok and first_unsafe is None:
                safe = s
            elif not ok and first_unsafe is None:
                first_unsafe = s
        for r in rows:
            if r["model"] == model:
                r["safe_stride"], r["first_unsafe"] = safe, first_unsafe
    return pd.DataFrame(rows)


def fd_infinity_table(sweep_dir: str | Path, quality: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """Per model x configuration: FD of the images pooled over seeds and its extrapolation to
    infinitely many images (:func:`fcr.eval.metrics.fd_infinity`), which removes the ``1/n``
    small-sample bias that dominates FD at the sizes a CPU run affords."""
    sweep_dir = Path(sweep_dir)
    frechet = FrechetToReference(*feature_statistics(_reference_features(sweep_dir)))
    rows = []
    for model in models:
        configs = quality[quality["model"].astype(str) == model]["config"].astype(str).unique()
        for config in configs:
            seeds = _seeds(quality, model, config)
            feats = _cells(sweep_dir, model, config, seeds).get("features")
            if feats is None or len(feats) <= feats.shape[1] + 2:
                continue  # too few images for a full-rank covariance at the smallest subset
            rows.append({"model": model, "config": config, "n_seeds": len(seeds),
                         **fd_infinity(feats, frechet, seed=len(rows))})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the families


def evaluate_contrasts(
    sweep_dir: str | Path,
    quality: pd.DataFrame,
    *,
    original: str,
    fcr_models: Mapping[float, str],
    control: str | None,
    study: Study,
    selected: tuple[float, str] | None = None,
    first_unsafe: int | None = None,
    replicates: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Both families of one backbone (see the module docstring) as :data:`CONTRAST_COLUMNS` rows.

    ``selected``: (λ, model) from :func:`select_lambda` on the selection run (None: every FCR
    model enters the secondary family). ``first_unsafe``: the original model's first unsafe
    stride (:func:`safe_strides`), added to the secondary strides when it was run. ``replicates``:
    a fine-tune -> its other training seeds (:attr:`fcr.manifest.Backbone.replicates`); the primary
    family then compares the per-image means over each arm's training runs.
    """
    sweep_dir = Path(sweep_dir)
    rows: list[dict[str, Any]] = []
    primary: list[dict[str, Any]] = []
    replicates = dict(replicates or {})
    if control is not None:
        controls = [control, *replicates.get(control, ())]
        for lam, model in sorted(fcr_models.items()):
            arm = [model, *replicates.get(model, ())]
            for config in study.strides:
                row = {"family": "primary", "contrast": f"FCR λ={lam:g} vs λ=0 control", "kind": "superiority",
                       "endpoint": study.primary_endpoint, "model": model, "config": config, "vs_model": control,
                       "vs_config": config, "margin": math.nan, "n_runs": min(len(arm), len(controls))}
                seeds = common_seeds(quality, [(m, config) for m in (*arm, *controls)])
                if seeds:
                    row.update(_replicated_superiority(
                        [_fidelity_values(sweep_dir, m, config, study.primary_endpoint, study.primary_reference,
                                          seeds) for m in arm],
                        [_fidelity_values(sweep_dir, m, config, study.primary_endpoint, study.primary_reference,
                                          seeds) for m in controls], study))
                else:
                    row.update(n=0, estimate=math.nan, lo=math.nan, hi=math.nan, p=math.nan, sd_diff=math.nan)
                primary.append(row)
    secondary: list[dict[str, Any]] = []
    tested = dict([selected[::-1]]) if selected else {m: lam for lam, m in fcr_models.items()}
    configs = list(study.strides)
    if first_unsafe is not None and f"FD-{first_unsafe}" not in configs:
        configs.append(f"FD-{first_unsafe}")
    ref_seeds = _seeds(quality, original, study.reference_config)
    has_reference = ref_seeds and any((sweep_dir / "reference").glob("*.safetensors"))
    ref_feats = _reference_features(sweep_dir) if has_reference else None
    for model, lam in tested.items():
        for config in configs:
            seeds = common_seeds(quality, [(model, config), (original, study.reference_config)])
            base = {"family": "secondary", "contrast": f"FCR λ={lam:g} vs original {study.reference_config}",
                    "kind": "non-inferiority", "model": model, "config": config, "vs_model": original,
                    "vs_config": study.reference_config}
            if not seeds:
                for endpoint in ("fd_increase_pct", "alignment_change_pct"):
                    secondary.append({**base, "endpoint": endpoint, "n": 0, "estimate": math.nan, "lo": math.nan,
                                      "hi": math.nan, "p": math.nan, "margin": math.nan, "sd_diff": math.nan})
                continue
            secondary += [{**base, **r} for r in noninferiority(sweep_dir, model, config, original,
                                                                study.reference_config, seeds, study,
                                                                ref_feats=ref_feats, seed=len(secondary))]
    for family in (primary, secondary):
        rows += adjust_family(family, study)
    return pd.DataFrame(rows, columns=CONTRAST_COLUMNS)


def power_table(contrasts: pd.DataFrame, sizes: Sequence[int], alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """Sizing from a pilot: for every paired contrast with a measured spread (``sd_diff``), the
    minimal detectable mean difference at each number of pairs in ``sizes``, at Holm's strictest
    level for the contrast's family (``alpha / m_tests``)."""
    rows = []
    for _, r in contrasts.iterrows():
        sd = float(r.get("sd_diff", math.nan))
        if not math.isfinite(sd):
            continue
        level = alpha / max(int(r["m_tests"]), 1)
        for n in sizes:
            rows.append({"family": r["family"], "contrast": r["contrast"], "endpoint": r["endpoint"],
                         "config": r["config"], "pilot_n": int(r["n"]), "pilot_estimate": float(r["estimate"]),
                         "sd_diff": sd, "alpha_per_test": level, "power": power, "n": int(n),
                         "mde": paired_mde(sd, int(n), level, power)})
    return pd.DataFrame(rows)


VARIANT_COLUMNS = ["variant", "config", "endpoint", "model", "vs_model", "n", "estimate", "lo", "hi", "p", "p_holm",
                   "m_tests", "mde", "decision"]


def variant_contrasts(points: Sequence[tuple[Any, str | Path, str, str | Path, str]], study: Study) -> pd.DataFrame:
    """FCR variants against their λ = 0 control: for each ``(variant label, FCR sweep folder, FCR
    model, control sweep folder, control model)`` the study's primary test (FCR minus control on the
    primary endpoint, paired over the images both ran, two-sided t) at every study stride, with each
    arm's mean; Holm over all of them (an exploratory family of its own, ``m_tests``), the minimal
    detectable effect at Holm's strictest level and a decision worded like the primary family's.
    Arms from two sweep folders pair only when every shared seed sampled the same prompts (the
    initial noise is a function of the seed and image index); a point whose cells were not run is
    left out."""
    rows: list[dict[str, Any]] = []
    for label, fcr_dir, fcr_model, control_dir, control in points:
        fcr_dir, control_dir = Path(fcr_dir), Path(control_dir)
        if not (fcr_dir / contract.QUALITY).is_file() or not (control_dir / contract.QUALITY).is_file():
            continue
        q_fcr, q_control = pd.read_csv(fcr_dir / contract.QUALITY), pd.read_csv(control_dir / contract.QUALITY)
        for config in study.strides:
            seeds = sorted(set(common_seeds(q_fcr, [(fcr_model, config)])) & set(common_seeds(q_control, [(control, config)])))
            if not seeds:
                continue
            check_same_prompts(fcr_dir, fcr_model, control_dir, control, config, seeds)
            a = _fidelity_values(fcr_dir, fcr_model, config, study.primary_endpoint, study.primary_reference, seeds)
            c = _fidelity_values(control_dir, control, config, study.primary_endpoint, study.primary_reference, seeds)
            rows.append({"variant": label, "config": config, "endpoint": study.primary_endpoint,
                         "model": fcr_model, "vs_model": control, "fcr_mean": float(a.mean()),
                         "control_mean": float(c.mean()), "kind": "superiority", **_superiority(a - c, study)})
    if not rows:
        return pd.DataFrame(columns=VARIANT_COLUMNS)
    return pd.DataFrame(adjust_family(rows, study))


def length_contrasts(points: Sequence[tuple[int, str | Path, str, str]], study: Study) -> pd.DataFrame:
    """Fidelity vs fine-tune length: :func:`variant_contrasts` of ``(training steps, sweep folder,
    FCR model, control)`` points (both arms in one folder), the variant column named ``train_steps``."""
    table = variant_contrasts([(int(steps), d, f, d, c) for steps, d, f, c in points], study)
    return table.rename(columns={"variant": "train_steps"})
