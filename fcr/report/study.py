"""The report's study section: formats the tables the analysis stage wrote
(:mod:`fcr.analysis.study`): the pre-registered contrasts, safe strides, FD∞, power, the
exploratory families and criterion c's difference in differences."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from fcr import contract
from fcr.analysis.rows import format_number, markdown_table, read_derived, read_optional
from fcr.manifest import Backbone
from fcr.stats import paired_n

__all__ = ["StudyTables", "ablation_section", "few_steps_section", "length_section", "power_section",
           "read_derived", "read_optional", "read_study_tables", "regime_section", "stress_section", "study_section", "study_summary"]


class StudyTables(NamedTuple):
    """The study's tables as the analysis wrote them (empty frames where it wrote none)."""

    contrasts: pd.DataFrame
    safe: pd.DataFrame
    notes: list[str]
    fd_inf: pd.DataFrame


def read_study_tables(out_dir: Path) -> StudyTables:
    """The study's contrasts, safe strides, notes and FD∞ from ``out_dir``."""
    def table(name: str) -> pd.DataFrame:
        found = read_optional(out_dir / name)
        return pd.DataFrame() if found is None else found

    notes_path = out_dir / contract.ANALYSIS_NOTES
    notes = json.loads(notes_path.read_text()).get("study_notes", []) if notes_path.is_file() else []
    return StudyTables(table(contract.CONTRASTS), table(contract.SAFE_STRIDES), notes, table(contract.FD_INFINITY))


def study_section(backbones: Sequence[Backbone], tables: StudyTables) -> list[str]:
    """Markdown lines of the study section (empty when no backbone has a study)."""
    if not any(b.study is not None for b in backbones):
        return []
    contrasts, safe, notes, fd_inf = tables
    if not contrasts.empty:  # the ablation grid's families have their own section (fcr.report.grid)
        contrasts = contrasts[~contrasts["family"].astype(str).str.startswith("grid: ")]
    lines = ["### Pre-registered contrasts (params/experiments.yaml `study`)\n",
             "Paired over images (same prompt and initial noise, pooled over seeds). Primary: FCR(λ) vs the λ = 0 "
             "control at the same stride on the primary fidelity endpoint (superiority, two-sided); secondary: the "
             "selected FCR model vs the original model's FD-5 within the seed's margins (non-inferiority, one-sided). "
             "Holm's correction within each family; `m_tests` says how many tests it covers. A contrast the design "
             "cannot decide is reported as not detectable / not established at its n, with the minimal detectable "
             "effect (power as pre-registered, at Holm's strictest level).\n"]
    if not contrasts.empty and contrasts["family"].astype(str).str.startswith(contract.CACHE_AWARE_FAMILY).any():
        lines.append("Families `cache-aware: ...` (issue #33, params/study/cache_aware.yaml): each arm's per-image "
                     "mean over its training runs minus the original model at the same cached configuration, both "
                     "scored by PSNR to the original's full sampling of the same prompt and noise (two-sided).\n")
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    if not contrasts.empty:
        show = contrasts[["backbone", "family", "contrast", "endpoint", "config", "n", "estimate", "lo", "hi",
                          "p_holm", "m_tests", "mde", "decision"]].copy()
        for col in ("estimate", "lo", "hi", "p_holm", "mde"):
            show[col] = show[col].map(format_number)
        lines.append(markdown_table(show))
        study = next(b.study for b in backbones if b.study is not None)
        lines += power_section(contrasts, study.alpha, study.power)
    if not safe.empty:
        lines.append("Safe stride per model: every uniform stride up to it is shown non-inferior to the model's own "
                     "FD-5 (ΔFD ≤ +5 % and Δ accuracy ≥ −2 %, paired, Holm over the model's strides).\n")
        summary = safe.groupby("model", sort=False)[["safe_stride", "first_unsafe"]].first().reset_index()
        lines.append(markdown_table(summary))
    if not fd_inf.empty:
        lines.append("FD with the small-sample bias removed: FD of the images pooled over seeds (`fd_at_n`) and its "
                     "extrapolation to infinitely many images (`fd_inf` ± `se`; FD of random subsets at 10 sizes, OLS "
                     "in 1/n; fcr.eval.metrics.fd_infinity).\n")
        show = fd_inf[["model", "config", "n", "fd_at_n", "fd_inf", "fd_inf_se"]].copy()
        for col in ("fd_at_n", "fd_inf", "fd_inf_se"):
            show[col] = show[col].map(format_number)
        lines.append(markdown_table(show))
    return lines


_UNITS = {"psnr": " dB", "rmse": "", "ssim": "", "feature_distance": "", "embedding_drift": "",
          "fd_increase_pct": " %", "alignment_change_pct": " %"}


def _effect(r: pd.Series) -> str:
    unit = _UNITS.get(str(r["endpoint"]), "")
    return (f"{format_number(r['estimate'])}{unit} [{format_number(r['lo'])}, {format_number(r['hi'])}], "
            f"Holm p = {format_number(r['p_holm'])}")


def study_summary(tables: StudyTables) -> list[str]:
    """A plain-language summary of the study's tables, every number read from them:
    which pre-registered contrasts are significant after Holm (and out of how many tests), the
    effects with their 95 % intervals, the safe strides, and what the data do not support."""
    contrasts, safe = tables[0], tables[1]
    if contrasts.empty:
        return []
    lines = ["### Summary of the pre-registered study (generated from the contrasts below)\n"]
    run = contrasts[contrasts["p_holm"].notna()]
    if run.empty:
        return lines + ["- No pre-registered contrast could be evaluated: the sweep has no cells at the study's "
                        f"strides ({', '.join(dict.fromkeys(contrasts['config'].astype(str)))}).", ""]
    families = [("primary", "Primary (superiority, FCR vs the λ = 0 control)"),
                ("secondary", "Secondary (non-inferiority vs the original's FD-5, the seed's margins)")]
    prefix = contract.CACHE_AWARE_FAMILY  # issue #33's arms against the original at the same configuration
    families += [(f, f"Cache-aware fine-tuning, family `{f.removeprefix(prefix)}` (superiority vs the original "
                     "at the same configuration; fidelity to the original's full sampling)")
                 for f in dict.fromkeys(run["family"].astype(str)) if f.startswith(prefix)]
    for family, label in families:
        rows = run[run["family"] == family]
        if rows.empty:
            continue
        m = int(rows["m_tests"].max())
        decided = rows[~rows["decision"].str.startswith(("not detectable", "not established"))]
        lines.append(f"- **{label}**: {len(decided)} of {m} tests decided at α = 0.05 after Holm.")
        for _, r in rows.iterrows():
            runs = r.get("run_estimates")
            extra = (f"; per training run {runs}" if isinstance(runs, str) and ";" in runs else "")
            lines.append(f"  - {r['backbone']}, {r['contrast']}, {r['endpoint']} at {r['config']} "
                         f"(n = {int(r['n'])}): {_effect(r)}: **{r['decision']}**{extra}.")
    if not safe.empty:
        by_model = safe.groupby("model", sort=False)[["safe_stride", "first_unsafe"]].first()
        lines.append("- **Safe stride** (largest stride shown non-inferior to the model's own FD-5): " + ", ".join(
            f"{m} {int(v['safe_stride'])}" + (f" (first unsafe {int(v['first_unsafe'])})"
                                             if pd.notna(v["first_unsafe"]) else " (every stride run is safe)")
            for m, v in by_model.iterrows()) + ".")
        for _, b in contrasts.drop_duplicates("backbone").iterrows():  # FCR's benefit: the safe stride it gains
            original, fcr = str(b["backbone"]), contrasts[(contrasts["backbone"] == b["backbone"])
                                                          & (contrasts["family"] == "primary")]["model"]
            for model in dict.fromkeys(fcr.astype(str)):
                if original in by_model.index and model in by_model.index:
                    gain = int(by_model.loc[model, "safe_stride"]) - int(by_model.loc[original, "safe_stride"])
                    lines.append(f"- **Safe-stride gain** of {model} over {original}: {gain:+d} (strides run: "
                                 f"{sorted(int(s) for s in safe['stride'].unique())}).")
    unsupported = run[(run["family"] == "primary") & ~run["decision"].isin(["FCR better"])]
    if not unsupported.empty:
        configs = ", ".join(dict.fromkeys(unsupported["config"].astype(str)))
        lines.append(f"- **Not supported by these data**: that FCR makes caching more faithful than the same "
                     f"fine-tune without it at {configs} (see the power table for the smallest effect this run "
                     "could have detected).")
    return lines + [""]


def power_section(contrasts: pd.DataFrame, alpha: float = 0.05, power: float = 0.8) -> list[str]:
    """The power table of the primary contrasts: from the measured spread of the paired
    differences, the minimal detectable effect at the run's n (at Holm's strictest level), the
    95 % interval's half-width, and the pairs a design would need to detect the observed effect."""
    rows = contrasts[(contrasts["family"] == "primary") & contrasts["sd_diff"].notna()] if not contrasts.empty else contrasts
    if rows.empty:
        return []
    out = []
    for _, r in rows.iterrows():
        m = max(int(r["m_tests"]), 1)
        needed = (paired_n(float(r["sd_diff"]), abs(float(r["estimate"])), alpha / m, power)
                  if float(r["estimate"]) != 0 else float("nan"))
        out.append({"backbone": r["backbone"], "contrast": r["contrast"], "endpoint": r["endpoint"],
                    "config": r["config"], "n": int(r["n"]), "sd_diff": format_number(r["sd_diff"]),
                    "alpha_per_test": format_number(alpha / m), "mde": format_number(r["mde"]),
                    "ci_half_width": format_number((float(r["hi"]) - float(r["lo"])) / 2),
                    "estimate": format_number(r["estimate"]), "n_to_detect_estimate": needed})
    return [f"Power of the primary contrasts (power {power:g}, at Holm's strictest level α/m; sd_diff is the measured "
            "spread of the paired per-image differences; n_to_detect_estimate: pairs a design would need to detect "
            "an effect as large as the one estimated):\n", markdown_table(pd.DataFrame(out))]


def length_section(out_dir: Path) -> list[str]:
    """Fidelity vs fine-tune length (``length_contrasts.csv``); nothing when no backbone declares a length run."""
    intro = ("FCR vs the λ = 0 control trained for the same number of steps (same data order), paired over images on "
             "the primary endpoint at the study's strides; the shortest length is the study's own first training-seed "
             "pair. An exploratory family: Holm over its tests (`m_tests`), decisions worded as in the primary family.\n")
    return _family_section(out_dir / contract.LENGTH_CONTRASTS, "Caching fidelity vs fine-tune length", intro,
                           "train_steps", lambda t: t.empty, "_Not run yet: no length point has both models sampled._\n")


def ablation_section(out_dir: Path) -> list[str]:
    """FCR ablations (``ablation_contrasts.csv``); nothing when no backbone declares ablations."""
    intro = ("Each FCR variant against the λ = 0 control of the study (training seed 0, same data order and steps), "
             "paired over images on the primary endpoint at the study's strides; the study's own FCR model is the "
             "first row. An exploratory family: Holm over its tests (`m_tests`).\n")
    return _family_section(out_dir / contract.ABLATION_CONTRASTS, "FCR ablations", intro, "variant",
                           lambda t: t.empty or t["variant"].astype(str).str.startswith("as trained").all(),
                           "_Not run yet: no ablated model has been sampled._\n")


def few_steps_section(backbones: Sequence[Backbone], out_dir: Path) -> list[str]:
    """The few-step sampler regime (``few_steps_contrasts.csv``, ``few_steps_safe_strides.csv``);
    nothing when no backbone declares such a run."""
    declared = any(b.study is not None and b.few_steps_run is not None and b.fcr_models and b.control
                   for b in backbones)
    if not declared:
        return []
    intro = ("With fewer sampling steps each cached step spans more of the trajectory. FCR against the λ = 0 control "
             "(training seed 0, same data order and steps), paired over the run's prompt/noise pairs on the primary "
             "endpoint at every stride it sampled: an exploratory family, Holm over its tests (`m_tests`).\n")
    lines = _family_section(out_dir / contract.FEW_STEPS_CONTRASTS, "Few-step sampler regime", intro, "variant",
                            lambda t: t.empty, "_Not run yet: no few-step cell was sampled._\n")
    if not lines:
        lines = ["### Few-step sampler regime\n", "_Not run yet: the few-step sweep has no results._\n"]
    table = read_optional(out_dir / contract.FEW_STEPS_SAFE_STRIDES)
    if table is not None:
        lines.append("Safe strides with that sampler: each stride above 5 against the model's own FD-5 (ΔFD ≤ +5 % and "
                     "Δ accuracy ≥ −2 %, paired, Holm over the model's strides).\n")
        lines.append(_noninferiority_markdown(table, ["backbone", "sampler", "model", "stride", "n"], ["safe_stride"]))
    return lines


def _family_section(path: Path, title: str, intro: str, label: str,
                    not_run: Callable[[pd.DataFrame], bool], not_run_text: str) -> list[str]:
    """The report lines of an exploratory contrast family's CSV at ``path`` (``label`` names the
    variant column; ``not_run(table)`` says when to add ``not_run_text``); nothing without the file."""
    table = read_optional(path)
    if table is None:
        return []
    lines = [f"### {title}\n", intro]
    if not_run(table):
        lines.append(not_run_text)
    if len(table):
        show = table[["backbone", label, "config", "n", "fcr_mean", "control_mean", "estimate", "lo", "hi",
                      "p_holm", "m_tests", "mde", "decision"]].copy()
        for col in ("fcr_mean", "control_mean", "estimate", "lo", "hi", "p_holm", "mde"):
            show[col] = show[col].map(format_number)
        lines.append(markdown_table(show))
    return lines


def stress_section(out_dir: Path) -> list[str]:
    """The report lines of criterion c's difference in differences (``stress_did.csv``); nothing
    when it was not run."""
    table = read_optional(out_dir / contract.STRESS_DID)
    if table is None or table.empty:
        return []
    margin = format_number(float(table["margin"].iloc[0]))
    lines = ["### Criterion c: caching fidelity under stress (difference in differences)\n",
             "Per image, the drop of the primary endpoint (cached image vs the same model's full image, same prompt, "
             "noise and stress) from the unstressed run to the stressed one; FCR's drop (mean over its training "
             f"replicates) minus the comparator's, non-inferiority with the pre-registered margin {margin} (one-sided "
             "paired t), Holm over the family (`m_tests`). `mde`: how far below the margin the true difference must "
             "lie for this design to establish it (power at Holm's strictest level).\n"]
    show = table[["backbone", "comparison", "config", "stress", "n", "n_runs", "drop_fcr", "drop_comparator", "estimate",
                  "lo", "hi", "p_holm", "m_tests", "mde", "decision", "look"]].copy()
    for col in ("drop_fcr", "drop_comparator", "estimate", "lo", "hi", "p_holm", "mde"):
        show[col] = show[col].map(format_number)
    lines.append(markdown_table(show))
    return lines


def regime_section(out_dir: Path) -> list[str]:
    """The sensitive regime on the frontier sweep (``regime_safe_strides.csv``); nothing without it."""
    table = read_optional(out_dir / contract.REGIME_SAFE_STRIDES)
    if table is None:
        return []
    lines = ["### Sensitive regime: safe strides to 25 and FD-50ls (frontier sweep)\n",
             "On the frontier sweep's 320 prompt/noise pairs (training seed 0 of each fine-tune): a model's safe stride "
             "is the largest uniform stride up to which every stride is non-inferior to its own FD-5 (ΔFD ≤ +5 % and "
             "Δ accuracy ≥ −2 %, paired, Holm over its strides); FD-50ls (Faster Diffusion's non-uniform key steps) "
             "is tested the same way against FD-5 where it ran (Holm over those models).\n"]
    strided = table[table["stride"] > 0]
    if not strided.empty:
        summary = strided.groupby(["backbone", "model"], sort=False)[["safe_stride", "first_unsafe"]].first()
        lines.append(markdown_table(summary.reset_index()))
    lines.append(_noninferiority_markdown(table, ["backbone", "model", "config", "n"]))
    return lines


def _noninferiority_markdown(table: pd.DataFrame, keys: list[str], extra: Sequence[str] = ()) -> str:
    """A safe-stride / non-inferiority table (:func:`safe_strides` rows) as markdown: ``keys``, the
    two margins' estimates with the FD interval, Holm's p and the decision, then ``extra``."""
    numbers = ["fd_increase_pct", "fd_increase_pct_lo", "fd_increase_pct_hi", "alignment_change_pct", "p_holm"]
    show = table[[*keys, *numbers, "non_inferior", *extra]].copy()
    for col in numbers:
        show[col] = show[col].map(format_number)
    return markdown_table(show)
