"""The report's study section: the pre-registered contrasts of every backbone whose experiment has a
``study`` in ``params/experiments.yaml`` (:mod:`fcr.experiments.contrasts`), and each model's safe
stride, written as ``contrasts.csv`` / ``safe_strides.csv`` with a markdown section."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from fcr import contract
from fcr.eval.stats import holm, paired_n
from fcr.experiments.contrasts import (
    common_seeds,
    evaluate_contrasts,
    fd_infinity_table,
    length_contrasts,
    noninferiority,
    safe_strides,
    select_lambda,
    variant_contrasts,
)
from fcr.experiments.robustness.fidelity import STRESS_DID_COLUMNS, stress_did
from fcr.manifest import Backbone
from fcr.report.rows import format_number, markdown_table, result_dir

__all__ = ["ablation_section", "few_steps_section", "length_section", "power_section", "regime_section",
           "stress_did_table", "stress_section", "study_section", "study_summary", "study_tables"]


def _quality(folder: Path) -> pd.DataFrame | None:
    path = folder / contract.QUALITY
    return pd.read_csv(path) if path.is_file() else None


def study_tables(root: str | Path, backbones: Sequence[Backbone]) -> tuple[pd.DataFrame, pd.DataFrame, list[str], pd.DataFrame]:
    """(contrasts, safe strides, notes, FD∞ per model x configuration) over the backbones with a
    study; a backbone whose sweep (or selection run) has not been run is named in the notes instead."""
    root = Path(root)
    contrasts, safe, notes, fd_inf = [], [], [], []
    for b in backbones:
        study = b.study
        if study is None:
            continue
        sweep_dir = result_dir(root, b.experiment, "sweep", b.sweep_run)
        quality = _quality(sweep_dir)
        if quality is None or not (sweep_dir / contract.FIDELITY).is_file():
            notes.append(f"{b.name}: no {contract.QUALITY} / {contract.FIDELITY} in {sweep_dir} (notebook 03 not run)")
            continue
        models = [b.name, *([b.control] if b.control else []), *b.fcr_models.values()]
        first_unsafe = None
        if (sweep_dir / "reference").is_dir():  # the FD margin needs per-image features (embedded)
            fd_inf.append(fd_infinity_table(sweep_dir, quality, models).assign(backbone=b.name))
            table = safe_strides(sweep_dir, quality, models, study)
            if not table.empty:
                safe.append(table.assign(backbone=b.name, experiment=b.experiment))
                original = table[table["model"] == b.name]
                if not original.empty and pd.notna(original["first_unsafe"].iloc[0]):
                    first_unsafe = int(original["first_unsafe"].iloc[0])
        selected = None
        if study.selection_run is not None:
            sel_dir = result_dir(root, b.experiment, "sweep", study.selection_run)
            sel_quality = _quality(sel_dir)
            if sel_quality is None or b.control is None:
                notes.append(f"{b.name}: λ not selected (no selection sweep in {sel_dir} or no λ = 0 control); "
                             "every FCR model enters the secondary family")
            else:
                selected = select_lambda(sel_dir, sel_quality, b.fcr_models, b.control, study)
        table = evaluate_contrasts(sweep_dir, quality, original=b.name, fcr_models=b.fcr_models, control=b.control,
                                   study=study, selected=selected, first_unsafe=first_unsafe,
                                   replicates=b.replicates)
        if selected is not None:
            notes.append(f"{b.name}: λ = {selected[0]:g} ({selected[1]}) selected on sweep run "
                         f"{study.selection_run!r}, reported on {b.sweep_run!r}")
        contrasts.append(table.assign(backbone=b.name, experiment=b.experiment))
    join = (lambda frames: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
    return join(contrasts), join(safe), notes, join(fd_inf)


def study_section(
    backbones: Sequence[Backbone], out_dir: Path, tables: tuple[pd.DataFrame, pd.DataFrame, list[str], pd.DataFrame]
) -> tuple[list[str], list[Path]]:
    """Markdown lines of the study section for :func:`study_tables`' ``tables`` and the files
    written (empty when no backbone has a study)."""
    if not any(b.study is not None for b in backbones):
        return [], []
    contrasts, safe, notes, fd_inf = tables
    files = []
    lines = ["### Pre-registered contrasts (params/experiments.yaml `study`)\n",
             "Paired over images (same prompt and initial noise, pooled over seeds). Primary: FCR(λ) vs the λ = 0 "
             "control at the same stride on the primary fidelity endpoint (superiority, two-sided); secondary: the "
             "selected FCR model vs the original model's FD-5 within the seed's margins (non-inferiority, one-sided). "
             "Holm's correction within each family; `m_tests` says how many tests it covers. A contrast the design "
             "cannot decide is reported as not detectable / not established at its n, with the minimal detectable "
             "effect (power as pre-registered, at Holm's strictest level).\n"]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    if not contrasts.empty:
        path = out_dir / contract.CONTRASTS
        contrasts.to_csv(path, index=False)
        files.append(path)
        show = contrasts[["backbone", "family", "contrast", "endpoint", "config", "n", "estimate", "lo", "hi",
                          "p_holm", "m_tests", "mde", "decision"]].copy()
        for col in ("estimate", "lo", "hi", "p_holm", "mde"):
            show[col] = show[col].map(format_number)
        lines.append(markdown_table(show))
        study = next(b.study for b in backbones if b.study is not None)
        lines += power_section(contrasts, study.alpha, study.power)
    if not safe.empty:
        path = out_dir / contract.SAFE_STRIDES
        safe.to_csv(path, index=False)
        files.append(path)
        lines.append("Safe stride per model: every uniform stride up to it is shown non-inferior to the model's own "
                     "FD-5 (ΔFD ≤ +5 % and Δ accuracy ≥ −2 %, paired, Holm over the model's strides).\n")
        summary = safe.groupby("model", sort=False)[["safe_stride", "first_unsafe"]].first().reset_index()
        lines.append(markdown_table(summary))
    if not fd_inf.empty:
        path = out_dir / contract.FD_INFINITY
        fd_inf.to_csv(path, index=False)
        files.append(path)
        lines.append("FD with the small-sample bias removed: FD of the images pooled over seeds (`fd_at_n`) and its "
                     "extrapolation to infinitely many images (`fd_inf` ± `se`; FD of random subsets at 10 sizes, OLS "
                     "in 1/n; fcr.eval.metrics.fd_infinity).\n")
        show = fd_inf[["model", "config", "n", "fd_at_n", "fd_inf", "fd_inf_se"]].copy()
        for col in ("fd_at_n", "fd_inf", "fd_inf_se"):
            show[col] = show[col].map(format_number)
        lines.append(markdown_table(show))
    return lines, files


_UNITS = {"psnr": " dB", "rmse": "", "ssim": "", "feature_distance": "", "embedding_drift": "",
          "fd_increase_pct": " %", "alignment_change_pct": " %"}


def _effect(r: pd.Series) -> str:
    unit = _UNITS.get(str(r["endpoint"]), "")
    return (f"{format_number(r['estimate'])}{unit} [{format_number(r['lo'])}, {format_number(r['hi'])}], "
            f"Holm p = {format_number(r['p_holm'])}")


def study_summary(tables: tuple[pd.DataFrame, pd.DataFrame, list[str], pd.DataFrame]) -> list[str]:
    """A plain-language summary of :func:`study_tables`' results, every number read from them:
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
    for family, label in (("primary", "Primary (superiority, FCR vs the λ = 0 control)"),
                          ("secondary", "Secondary (non-inferiority vs the original's FD-5, the seed's margins)")):
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


def _train_steps(root: Path, experiment: str, model: str) -> int | None:
    import yaml

    path = root / experiment / model / contract.RUN_PARAMS
    return int(yaml.safe_load(path.read_text())["max_train_steps"]) if path.is_file() else None


def length_section(root: str | Path, backbones: Sequence[Backbone], out_dir: Path) -> tuple[list[str], list[Path]]:
    """Fidelity vs fine-tune length (``length_run`` of a backbone with a study): the study's primary
    test at every length, the study's own first FCR / control pair as the shortest point
    (``length_contrasts.csv``); nothing when no backbone declares a length run."""
    root = Path(root)
    frames = []
    for b in backbones:
        if b.study is None or b.length_run is None:
            continue
        points = []
        if b.fcr_models and b.control:
            first = next(iter(b.fcr_models.values()))
            steps = _train_steps(root, b.experiment, first)
            if steps is not None:
                points.append((steps, result_dir(root, b.experiment, "sweep", b.sweep_run), first, b.control))
        length_dir = result_dir(root, b.experiment, "sweep", b.length_run)
        points += [(steps, length_dir, fcr_model, control) for steps, (fcr_model, control) in sorted(b.length_models.items())]
        frames.append(length_contrasts(points, b.study).assign(backbone=b.name))
    intro = ("FCR vs the λ = 0 control trained for the same number of steps (same data order), paired over images on "
             "the primary endpoint at the study's strides; the shortest length is the study's own first training-seed "
             "pair. An exploratory family: Holm over its tests (`m_tests`), decisions worded as in the primary family.\n")
    return _family_section(frames, out_dir / contract.LENGTH_CONTRASTS, "Caching fidelity vs fine-tune length", intro,
                           "train_steps", lambda t: t.empty, "_Not run yet: no length point has both models sampled._\n")


def ablation_section(root: str | Path, backbones: Sequence[Backbone], out_dir: Path) -> tuple[list[str], list[Path]]:
    """FCR ablations (``ablation_run`` of a backbone with a study, e.g. Δ_max 20): each ablated FCR
    model against the backbone's control as sampled in its sweep run, and the backbone's first FCR
    model beside it, all one exploratory Holm family (``ablation_contrasts.csv``); nothing when no
    backbone declares ablations."""
    root = Path(root)
    frames = []
    for b in backbones:
        if b.study is None or b.ablation_run is None or not b.control or not b.fcr_models:
            continue
        main_dir = result_dir(root, b.experiment, "sweep", b.sweep_run)
        ablation_dir = result_dir(root, b.experiment, "sweep", b.ablation_run)
        first = next(iter(b.fcr_models.values()))
        points = [(f"as trained ({first})", main_dir, first, main_dir, b.control)]
        points += [(label, ablation_dir, model, main_dir, b.control) for label, model in b.ablation_models.items()]
        frames.append(variant_contrasts(points, b.study).assign(backbone=b.name))
    intro = ("Each FCR variant against the λ = 0 control of the study (training seed 0, same data order and steps), "
             "paired over images on the primary endpoint at the study's strides; the study's own FCR model is the "
             "first row. An exploratory family: Holm over its tests (`m_tests`).\n")
    return _family_section(frames, out_dir / contract.ABLATION_CONTRASTS, "FCR ablations", intro, "variant",
                           lambda t: t.empty or t["variant"].astype(str).str.startswith("as trained").all(),
                           "_Not run yet: no ablated model has been sampled._\n")


def few_steps_section(root: str | Path, backbones: Sequence[Backbone], out_dir: Path) -> tuple[list[str], list[Path]]:
    """The few-step sampler regime (``few_steps_run`` of a backbone with a study, e.g. 25-step DDIM):
    FCR (the first FCR model) vs the λ = 0 control on the primary endpoint at every uniform stride
    above 1 that run sampled (one exploratory Holm family, ``few_steps_contrasts.csv``) and each
    model's safe stride against its own FD-5 there (``few_steps_safe_strides.csv``); nothing when no
    backbone declares such a run."""
    root = Path(root)
    contrasts, strides, declared = [], [], False
    for b in backbones:
        if b.study is None or b.few_steps_run is None or not b.fcr_models or not b.control:
            continue
        declared = True
        sweep_dir = result_dir(root, b.experiment, "sweep", b.few_steps_run)
        quality = _quality(sweep_dir)
        if quality is None:
            continue
        steps = sorted({int(n) for n in quality["num_inference_steps"].dropna()})
        label = "/".join(map(str, steps)) + "-step sampling"
        uniform = quality[quality["config"].astype(str).str.fullmatch(r"FD-\d+") & (quality["stride"] > 1)]
        configs = tuple(sorted(set(uniform["config"].astype(str)), key=lambda c: int(c[3:])))
        first = next(iter(b.fcr_models.values()))
        family = replace(b.study, strides=configs)
        contrasts.append(variant_contrasts([(label, sweep_dir, first, sweep_dir, b.control)], family)
                         .assign(backbone=b.name))
        if (sweep_dir / "reference").is_dir():
            ran = set(quality["model"].astype(str))
            models = [m for m in (b.name, b.control, first) if m in ran]
            strides.append(safe_strides(sweep_dir, quality, models, b.study).assign(backbone=b.name, sampler=label))
    if not declared:
        return [], []
    intro = ("With fewer sampling steps each cached step spans more of the trajectory. FCR against the λ = 0 control "
             "(training seed 0, same data order and steps), paired over the run's prompt/noise pairs on the primary "
             "endpoint at every stride it sampled: an exploratory family, Holm over its tests (`m_tests`).\n")
    lines, files = _family_section(contrasts, out_dir / contract.FEW_STEPS_CONTRASTS, "Few-step sampler regime",
                                   intro, "variant", lambda t: t.empty,
                                   "_Not run yet: no few-step cell was sampled._\n")
    if not lines:
        lines = ["### Few-step sampler regime\n", "_Not run yet: the few-step sweep has no results._\n"]
    strides = [t for t in strides if not t.empty]
    if strides:
        table = pd.concat(strides, ignore_index=True)
        path = out_dir / contract.FEW_STEPS_SAFE_STRIDES
        table.to_csv(path, index=False)
        files.append(path)
        lines.append("Safe strides with that sampler: each stride above 5 against the model's own FD-5 (ΔFD ≤ +5 % and "
                     "Δ accuracy ≥ −2 %, paired, Holm over the model's strides).\n")
        lines.append(_noninferiority_markdown(table, ["backbone", "sampler", "model", "stride", "n"], ["safe_stride"]))
    return lines, files


def _family_section(frames: list[pd.DataFrame], path: Path, title: str, intro: str, label: str,
                    not_run: Callable[[pd.DataFrame], bool], not_run_text: str) -> tuple[list[str], list[Path]]:
    """An exploratory contrast family's CSV at ``path`` and its report lines (``label`` names the
    variant column; ``not_run(table)`` says when to add ``not_run_text``); nothing without frames."""
    if not frames:
        return [], []
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(path, index=False)
    lines = [f"### {title}\n", intro]
    if not_run(table):
        lines.append(not_run_text)
    if len(table):
        show = table[["backbone", label, "config", "n", "fcr_mean", "control_mean", "estimate", "lo", "hi",
                      "p_holm", "m_tests", "mde", "decision"]].copy()
        for col in ("fcr_mean", "control_mean", "estimate", "lo", "hi", "p_holm", "mde"):
            show[col] = show[col].map(format_number)
        lines.append(markdown_table(show))
    return lines, [path]


def stress_look(b: Backbone, seeds_run: set[int]) -> str:
    """``"final"`` when the robustness run holds every seed it declares (or declares none), else
    ``"interim (k of K declared seeds)"``: a look that is reported but never decided (no optional
    stopping)."""
    if not b.robustness_seeds or set(b.robustness_seeds) <= seeds_run:
        return "final"
    return f"interim ({len(seeds_run & set(b.robustness_seeds))} of {len(b.robustness_seeds)} declared seeds)"


def stress_did_table(root: str | Path, backbones: Sequence[Backbone]) -> pd.DataFrame:
    """Criterion c as a difference in differences (:func:`fcr.experiments.robustness.fidelity.stress_did`)
    for every backbone whose study declares ``stress_margin``: its first FCR model (with its training
    replicates) against the original model and against the λ = 0 control (with theirs), on the
    study's primary endpoint at its strides, from the notebook-04 run's ``stress_fidelity.csv``; one
    Holm family per backbone. Empty (with the columns) when nothing was run."""
    root = Path(root)
    frames = []
    for b in backbones:
        if b.study is None or b.study.stress_margin is None or b.robustness_run is None or not b.fcr_models:
            continue
        path = result_dir(root, b.experiment, "robustness", b.robustness_run) / contract.STRESS_FIDELITY
        if not path.is_file():
            continue
        per_image = pd.read_csv(path, keep_default_na=False, na_values=[""])
        present = set(per_image["model"].astype(str))
        first = next(iter(b.fcr_models.values()))
        arm = [m for m in (first, *b.replicates.get(first, ())) if m in present]
        comparisons = [("FCR vs original", arm, [b.name])]
        if b.control:
            comparisons.append(("FCR vs control", arm, [m for m in (b.control, *b.replicates.get(b.control, ()))
                                                        if m in present]))
        comparisons = [c for c in comparisons if c[1] and c[2] and set(c[2]) <= present]
        if not comparisons:
            continue
        table = stress_did(per_image, comparisons, endpoint=b.study.primary_endpoint, margin=b.study.stress_margin,
                           alpha=b.study.alpha, power=b.study.power, configs=list(b.study.strides))
        frames.append(table.assign(backbone=b.name, look=stress_look(b, set(per_image["seed"].astype(int)))))
    if not frames:
        return pd.DataFrame(columns=["backbone", *STRESS_DID_COLUMNS, "look"])
    return pd.concat(frames, ignore_index=True)


def stress_section(table: pd.DataFrame, out_dir: Path) -> tuple[list[str], list[Path]]:
    """The report lines and ``stress_did.csv`` of :func:`stress_did_table`; nothing when empty."""
    if table.empty:
        return [], []
    path = out_dir / contract.STRESS_DID
    table.to_csv(path, index=False)
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
    return lines, [path]


def regime_section(root: str | Path, backbones: Sequence[Backbone], out_dir: Path) -> tuple[list[str], list[Path]]:
    """The sensitive regime on the frontier sweep (``frontier_run`` of a backbone with a study; strides
    to 25 and Faster Diffusion's non-uniform ``FD-50ls``): every model's safe stride against its own
    FD-5 (:func:`fcr.experiments.contrasts.safe_strides`) and, for each model that ran ``FD-50ls``, its
    non-inferiority to its FD-5 (both margins; Holm over those models), as ``regime_safe_strides.csv``
    (``stride`` 0 marks the FD-50ls row); nothing without a frontier sweep."""
    root = Path(root)
    frames = []
    for b in backbones:
        if b.study is None or b.frontier_run is None:
            continue
        sweep_dir = result_dir(root, b.experiment, "sweep", b.frontier_run)
        quality = _quality(sweep_dir)
        if quality is None or not (sweep_dir / "reference").is_dir():
            continue
        ran = set(quality["model"].astype(str))
        models = [m for m in dict.fromkeys([b.name, *([b.control] if b.control else []), *b.fcr_models.values(),
                                            *b.fcr_deep_models.values()]) if m in ran]
        table = safe_strides(sweep_dir, quality, models, b.study)
        ls_rows = []
        for model in models:
            seeds = common_seeds(quality, [(model, "FD-50ls"), (model, b.study.reference_config)])
            if not seeds:
                continue
            fd, acc = noninferiority(sweep_dir, model, "FD-50ls", model, b.study.reference_config, seeds, b.study)
            ls_rows.append({"model": model, "stride": 0, "config": "FD-50ls", "fd_increase_pct": fd["estimate"],
                            "fd_increase_pct_lo": fd["lo"], "fd_increase_pct_hi": fd["hi"],
                            "alignment_change_pct": acc["estimate"], "alignment_change_pct_lo": acc["lo"],
                            "alignment_change_pct_hi": acc["hi"], "p": max(fd["p"], acc["p"]), "n": fd["n"]})
        for r, p in zip(ls_rows, holm([r["p"] for r in ls_rows]) if ls_rows else []):
            r["p_holm"], r["non_inferior"] = float(p), bool(p < b.study.alpha)
        if not table.empty:
            table = table.assign(config=[f"FD-{int(s)}" for s in table["stride"]])
        frames.append(pd.concat([table, pd.DataFrame(ls_rows)], ignore_index=True).assign(backbone=b.name))
    frames = [f for f in frames if not f.empty]
    if not frames:
        return [], []
    table = pd.concat(frames, ignore_index=True)
    path = out_dir / contract.REGIME_SAFE_STRIDES
    table.to_csv(path, index=False)
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
    return lines, [path]


def _noninferiority_markdown(table: pd.DataFrame, keys: list[str], extra: Sequence[str] = ()) -> str:
    """A safe-stride / non-inferiority table (:func:`safe_strides` rows) as markdown: ``keys``, the
    two margins' estimates with the FD interval, Holm's p and the decision, then ``extra``."""
    numbers = ["fd_increase_pct", "fd_increase_pct_lo", "fd_increase_pct_hi", "alignment_change_pct", "p_holm"]
    show = table[[*keys, *numbers, "non_inferior", *extra]].copy()
    for col in numbers:
        show[col] = show[col].map(format_number)
    return markdown_table(show)
