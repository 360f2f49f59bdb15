"""Result tables of both experiments, the success-criteria verdict, and the README results section.

Everything here reads result files a pipeline run wrote (notebooks 03-05, the fine-tune run
folders); nothing is computed from scratch except paired tests between configurations, which are
run on the per-image side files notebook 03 saved. Numbers are printed with 3 significant digits,
95 % intervals as ``[lo, hi]``.

    python -m fcr.report.tables --root outputs/embedded [--readme README.md]
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fcr import contract, markers
from fcr.manifest import MANIFEST, Backbone, backbones_of
from fcr.paths import REPO_ROOT, display_path, portable_text
from fcr.report.mechanism import trajectory_section
from fcr.report.quality_cost import A_NAME
from fcr.report.readme import update_readme
from fcr.report.robustness_criterion import robustness_rows
from fcr.report.rows import EXP1, EXP2, LAYOUT, InputError, format_number, markdown_table, read_table, result_dir
from fcr.report.study import (
    ablation_section,
    few_steps_section,
    length_section,
    regime_section,
    stress_did_table,
    stress_section,
    study_section,
    study_summary,
    study_tables,
)
from fcr.report.verdict import evaluate_criteria

__all__ = [
    "build_report",
    "exp1_table",
    "exp2_table",
    "format_number",
    "main",
    "markdown_table",
    "paired_vs_reference",
]


# Metric label -> accepted summary.csv columns (embedded first, SD second).
TABLE_METRICS: dict[str, tuple[str, ...]] = {
    "fd": ("fd_fashioncnn", "fid"),
    "class_accuracy": ("class_accuracy", "clip_score"),
    "kid": ("kid_fashioncnn",),
    "is": ("is_fashioncnn",),
}
METRIC_TITLES = {"fd": "FD (fashioncnn) ↓", "class_accuracy": "class accuracy ↑", "kid": "KID ↓", "is": "IS ↑"}


# ----------------------------------------------------------------------------- formatting


# The GPU cost benchmark at SD scale, when one was run (benchmarks/bench_sd_gpu.py).
SD_GPU_COST = REPO_ROOT / "benchmarks" / "results" / "bench_sd_gpu.csv"


def _with_ci(v: Any, lo: Any, hi: Any) -> str:
    s = format_number(v)
    if s == "n/a":
        return s
    if format_number(lo) == "n/a" or format_number(hi) == "n/a":
        return s
    return f"{s} [{format_number(lo)}, {format_number(hi)}]"


# ----------------------------------------------------------------------------- paired tests


# Per-image endpoints of the sweep's side files a paired test uses, first found in both files wins.
PAIRED_ENDPOINTS: tuple[str, ...] = ("prompted_prob", "clip_score")


def paired_vs_reference(
    sweep_dir: str | Path, model: str, config: str, ref_model: str, ref_config: str
) -> dict[str, Any]:
    """Paired t / Wilcoxon test of ``model@config`` vs ``ref_model@ref_config`` on the per-image
    probability of the prompted class (SD: the per-image CLIPScore; :data:`PAIRED_ENDPOINTS`), pooled
    over every seed both have side files for (same seed: same prompts and initial noise in every
    model and configuration, checked on the labels where the side files have them).

    Falls back to ``paired_tests.csv`` (same model only; the mean difference averaged and the
    largest p over seeds). Returns ``paired_mean_diff, paired_p_t, paired_p_wilcoxon, paired_n,
    paired_source``; empty values when neither source has the pair.
    """
    from fcr.eval.stats import paired_test
    from fcr.experiments.sweep import load_side_file, quality_stem

    sweep_dir = Path(sweep_dir)
    empty = {"paired_mean_diff": math.nan, "paired_p_t": math.nan, "paired_p_wilcoxon": math.nan,
             "paired_n": math.nan, "paired_source": ""}
    if (model, config) == (ref_model, ref_config):
        return empty
    folder = sweep_dir / "quality"
    stem = quality_stem(model, config, 0).rsplit("seed", 1)[0]
    a_all, b_all, seeds = [], [], []
    for path in sorted(folder.glob(f"{stem}seed*.safetensors")):
        seed = int(path.stem.rsplit("seed", 1)[1])
        ref = folder / f"{quality_stem(ref_model, ref_config, seed)}.safetensors"
        if not ref.is_file():
            continue
        a, b = load_side_file(path), load_side_file(ref)
        if "labels" in a and "labels" in b and (
                a["labels"].shape != b["labels"].shape or not bool((a["labels"] == b["labels"]).all())):
            raise ValueError(f"{path} and {ref} were not made from the same prompts")
        endpoint = next((k for k in PAIRED_ENDPOINTS if k in a and k in b), None)
        if endpoint is None:
            continue
        a_all.append(a[endpoint].double().numpy())
        b_all.append(b[endpoint].double().numpy())
        seeds.append(seed)
    if seeds:
        test = paired_test(np.concatenate(a_all), np.concatenate(b_all))
        what = "" if endpoint == PAIRED_ENDPOINTS[0] else f" (per-image {endpoint})"
        return {"paired_mean_diff": test["mean_diff"], "paired_p_t": test["p_t"],
                "paired_p_wilcoxon": test["p_wilcoxon"], "paired_n": test["n"],
                "paired_source": f"side files{what}, seeds {seeds}"}
    path = sweep_dir / contract.PAIRED_TESTS
    if model == ref_model and path.is_file():
        tests = pd.read_csv(path)
        rows = tests[(tests["model"].astype(str) == model) & (tests["config_a"] == config)
                     & (tests["config_b"] == ref_config)]
        if not rows.empty:
            return {"paired_mean_diff": float(rows["mean_diff"].mean()), "paired_p_t": float(rows["p_t"].max()),
                    "paired_p_wilcoxon": float(rows["p_wilcoxon"].max()), "paired_n": float(rows["n"].sum()),
                    "paired_source": f"paired_tests.csv ({len(rows)} seed(s); mean difference, largest p)"}
    return empty


# ----------------------------------------------------------------------------- experiment tables


def _first_col(df: pd.DataFrame, names: Sequence[str]) -> str | None:
    return next((n for n in names if n in df.columns), None)


def _cost_lookup(sweep_dir: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    cost = pd.read_csv(sweep_dir / contract.COST) if (sweep_dir / contract.COST).is_file() else None
    table = pd.read_csv(sweep_dir / contract.COST_TABLE) if (sweep_dir / contract.COST_TABLE).is_file() else None
    return cost, table


def _variation_table(sweep_dir: str | Path, specs: Sequence[tuple[str, str, str, str, str]]) -> pd.DataFrame:
    """One row per ``(variation, model, config, ref_model, ref_config)`` with quality (mean and 95 %
    interval over seeds), cost against ``ref_config`` of the same architecture and a paired test
    against ``ref_model@ref_config``."""
    sweep_dir = Path(sweep_dir)
    summary = read_table(sweep_dir / contract.SUMMARY)
    quality = pd.read_csv(sweep_dir / contract.QUALITY) if (sweep_dir / contract.QUALITY).is_file() else None
    cost, table = _cost_lookup(sweep_dir)
    rows = []
    for variation, model, config, ref_model, ref_config in specs:
        out: dict[str, Any] = {"variation": variation, "model": model, "config": config, "note": ""}
        hit = summary[(summary["model"].astype(str) == model) & (summary["config"].astype(str) == config)]
        if hit.empty:
            out["note"] = f"not in {sweep_dir / 'summary.csv'} (model or configuration not run)"
            rows.append(out)
            continue
        s = hit.iloc[0]
        out["n_seeds"] = int(s.get("n_seeds", 1))
        out["ci_source"] = "t interval over seeds"
        for key, names in TABLE_METRICS.items():
            col = _first_col(summary, names)
            if col is None:
                continue
            out[key] = s[col]
            out[f"{key}_lo"], out[f"{key}_hi"] = s.get(f"{col}_lo", math.nan), s.get(f"{col}_hi", math.nan)
            single = out["n_seeds"] == 1 and quality is not None and f"{col}_lo" in quality.columns
            if single and not (math.isfinite(float(out[f"{key}_lo"])) and math.isfinite(float(out[f"{key}_hi"]))):
                q = quality[(quality["model"].astype(str) == model) & (quality["config"].astype(str) == config)]
                if not q.empty:
                    out[f"{key}_lo"], out[f"{key}_hi"] = q[f"{col}_lo"].iloc[0], q[f"{col}_hi"].iloc[0]
                    out["ci_source"] = "1 seed: bootstrap over images (FD, accuracy only)"
        arch = str(s["architecture"]) if "architecture" in s.index else None
        if arch is not None and cost is not None:
            c = cost[(cost["architecture"].astype(str) == arch)].set_index("config")
            for tcol in sorted(col for col in cost.columns if col.startswith("time_per_image_s_bs")):
                b = tcol[len("time_per_image_s_bs"):]
                if config in c.index:
                    out[f"time_per_image_s_bs{b}"] = float(c.loc[config, tcol])
                    if ref_config in c.index:
                        out[f"time_speedup_bs{b}"] = float(c.loc[ref_config, tcol]) / float(c.loc[config, tcol])
            # On CPU the profiler's peak is the process's resident-set high-water mark: it never falls,
            # so it cannot tell configurations apart and is no memory result. Only the CUDA allocator's is.
            on_gpu = "device" in c.columns and str(c["device"].iloc[0]).startswith("cuda")
            if on_gpu and config in c.index and ref_config in c.index and "peak_memory_bytes" in c.columns:
                mem = c["peak_memory_bytes"].astype(float)
                out["peak_memory_vs_ref"] = mem[config] / mem[ref_config]
        if arch is not None and table is not None:
            t = table[(table["architecture"].astype(str) == arch) & (table["config"].astype(str) == config)]
            if not t.empty:
                r = t.iloc[0]
                out["flops_per_image"] = r.get("flops_per_image", math.nan)
                if f"flops_speedup_vs_{ref_config}" in r.index:
                    out["flops_speedup"] = r[f"flops_speedup_vs_{ref_config}"]
                    out["bound_flops_speedup"] = r.get(f"bound_flops_speedup_vs_{ref_config}", math.nan)
        out.update(paired_vs_reference(sweep_dir, model, config, ref_model, ref_config))
        rows.append(out)
    return pd.DataFrame(rows)


def exp1_table(
    sweep_dir: str | Path,
    *,
    backbone: Backbone | None = None,
    full_config: str = "full",
    reference_config: str = "FD-5",
    stride_config: str = "FD-10",
) -> pd.DataFrame:
    """exp-1 (main ablation): full sampling, the FD-5 and FD-10 baselines of the original model,
    the λ = 0 control and every FCR λ at ``stride_config``. Quality: mean and 95 % interval over
    seeds; time per image (per timed batch size) and speed-ups vs ``reference_config`` of the
    same architecture (measured time, counted FLOPs, analytic bound); paired test vs the original
    model's ``reference_config`` (per-image prompted-class probability; mean_diff = row − FD-5).
    ``backbone``: default the embedded exp-1 backbone of ``params/experiments.yaml``. The rows are
    the manifest's variations and controls on the backbone's models (named as there); a manifest
    without them gets the rows above, named by model and configuration."""
    if backbone is None:
        backbone = next(b for b in backbones_of("embedded") if b.experiment == EXP1)
    ref = (backbone.name, reference_config)
    if backbone.rows:  # the manifest's variations and controls, by their names
        return _variation_table(sweep_dir, [(name, model, config, *ref) for name, model, config in backbone.rows])
    specs = [
        ("Full sampling", backbone.name, full_config, *ref),
        (f"{reference_config}-baseline", backbone.name, reference_config, *ref),
        (f"{stride_config}-baseline", backbone.name, stride_config, *ref),
    ]
    if backbone.control:
        specs.append((f"λ=0 control, {stride_config}", backbone.control, stride_config, *ref))
    specs += [(f"FCR λ={lam:g}, {stride_config}", model, stride_config, *ref)
              for lam, model in sorted(backbone.fcr_models.items())]
    return _variation_table(sweep_dir, specs)


def exp2_table(
    sweep_dir: str | Path,
    *,
    backbones: Sequence[Backbone] | None = None,
    dpm_config: str = "DPM++-FD-10",
    lambda_fcr: float = 0.10,
    reference_config: str = "FD-5",
    stride_config: str = "FD-10",
) -> pd.DataFrame:
    """exp-2 (generalisation): per backbone the manifest's variations and controls on its models
    (named as there); for a manifest without them, its original model at ``reference_config``, the
    FCR model (λ = ``lambda_fcr``) at ``stride_config`` and, where the manifest reads a backbone's
    FCR model at ``dpm_config``, that too (encoder caching on DPM-Solver++). Same columns as
    :func:`exp1_table`; speed-ups and paired tests are against the backbone's original model at
    ``reference_config``. ``backbones``: default the embedded exp-2 backbones of ``params/experiments.yaml``."""
    if backbones is None:
        backbones = [b for b in backbones_of("embedded") if b.experiment == EXP2]
    specs = []
    for b in backbones:
        ref = (b.name, reference_config)
        if b.rows:  # the manifest's variations and controls, by their names
            specs += [(name, model, config, *ref) for name, model, config in b.rows]
            continue
        fcr = b.fcr_models.get(lambda_fcr) or next(iter(b.fcr_models.values()), None)
        specs.append((f"{b.role}: {b.name} {reference_config}", b.name, reference_config, *ref))
        if fcr is None:
            continue
        specs.append((f"{b.role}: FCR λ={lambda_fcr:g} {stride_config}", fcr, stride_config, *ref))
        if dpm_config in b.fcr_configs:
            specs.append((f"{b.role}: FCR λ={lambda_fcr:g} + DPM-Solver++ {stride_config}", fcr, dpm_config, *ref))
    return _variation_table(sweep_dir, specs)


def _exp2_table_by_sweep_run(root: Path, backbones: Sequence[Backbone], dpm_config: str) -> pd.DataFrame:
    """exp-2's table over every sweep run its backbones were evaluated in (one run in the embedded
    setting; one per backbone for SD, whose backbones differ in resolution and prediction type)."""
    exp2 = [b for b in backbones if b.experiment == EXP2]
    runs = list(dict.fromkeys(b.sweep_run for b in exp2))
    parts = [exp2_table(result_dir(root, EXP2, "sweep", run), backbones=[b for b in exp2 if b.sweep_run == run],
                        dpm_config=dpm_config) for run in runs]
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def format_experiment_table(table: pd.DataFrame, reference_config: str = "FD-5") -> pd.DataFrame:
    """The readable version of an experiment table (3 significant digits, CIs as [lo, hi])."""
    out = pd.DataFrame({"variation": table.get("variation", pd.Series(dtype=str))})
    out["model @ config"] = [f"{m} @ {c}" for m, c in zip(table["model"], table["config"])]
    if "n_seeds" in table:
        out["seeds"] = [format_number(x) for x in table["n_seeds"]]
    for key, title in METRIC_TITLES.items():
        if key in table:
            out[title] = [_with_ci(*vals) for vals in zip(table[key], table[f"{key}_lo"], table[f"{key}_hi"])]
    for col in sorted(c for c in table.columns if c.startswith("time_per_image_s_bs")):
        b = col[len("time_per_image_s_bs"):]
        out[f"s/image (batch {b})"] = [format_number(x) for x in table[col]]
        if f"time_speedup_bs{b}" in table:
            out[f"time speed-up vs {reference_config} (batch {b})"] = [
                format_number(x) for x in table[f"time_speedup_bs{b}"]]
    if "flops_speedup" in table:
        out[f"FLOP speed-up vs {reference_config} [bound]"] = [
            f"{format_number(f)} [{format_number(bd)}]" if format_number(f) != "n/a" else "n/a"
            for f, bd in zip(table["flops_speedup"], table.get("bound_flops_speedup", table["flops_speedup"]))]
    if "paired_mean_diff" in table:
        out[f"paired vs {reference_config}: Δ prob (p_t)"] = [
            f"{format_number(d)} (p={format_number(p)})" if format_number(d) != "n/a" else ""
            for d, p in zip(table["paired_mean_diff"], table["paired_p_t"])]
    if "note" in table:
        out["note"] = table["note"].fillna("")
    return out


def format_verdict(verdict: pd.DataFrame) -> pd.DataFrame:
    """The readable verdict (passed as PASS / FAIL / n/a)."""
    word = {True: "PASS", False: "FAIL"}
    out = verdict[["criterion", "scope", "kind", "measured", "threshold"]].copy()
    out["passed"] = [word.get(v, "n/a") if v is not None else "n/a" for v in verdict["passed"]]
    out["note"] = verdict["note"]
    return out


# ----------------------------------------------------------------------------- the report


def _collect_figures(root: Path, out_dir: Path) -> list[Path]:
    """Copy the figures of the run (sweeps, robustness, mechanistic) into ``out_dir/figures``."""
    copied = []
    dest = out_dir / "figures"
    for exp in (EXP1, EXP2):
        for kind in ("sweep", "robustness", "mechanistic", "frontier"):
            base = root / exp / LAYOUT[kind]
            for fig in sorted(base.rglob("figures/*.png")) if base.is_dir() else []:
                # exp1_sweep_<name>.png, with the run folder in between when it is not the default one
                run = fig.parent.parent.relative_to(base).as_posix().replace("/", "_")
                middle = "" if run in (".", LAYOUT["run"]) else f"{run}_"
                target = dest / f"{exp.split('-')[0]}{exp.split('-')[1]}_{kind}_{middle}{fig.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(fig, target)
                copied.append(target)
    return copied


def _csv_section(title: str, path: Path, max_rows: int = 40) -> str:
    if not path.is_file():
        return (f"### {title}\n\n_Not available: {display_path(path)} is missing "
                "(see the verdict notes for the stage that writes it)._\n")
    df = pd.read_csv(path)
    shown = df.head(max_rows).map(lambda x: format_number(x) if isinstance(x, float) else x)
    more = f"\n_{len(df) - max_rows} more rows in `{display_path(path)}`._\n" if len(df) > max_rows else ""
    return f"### {title}\n\nFrom `{display_path(path)}`.\n\n{markdown_table(shown)}{more}"


def stage_times(root: str | Path) -> pd.DataFrame:
    """Wall time of every finished pipeline stage under ``root`` (:func:`fcr.markers.stage_times`):
    stage (folder relative to root), seconds, attempts, finished."""
    return pd.DataFrame(markers.stage_times(root), columns=["stage", "seconds", "attempts", "finished"])


def _timing_section(root: Path, title: str = "Main job wall time") -> list[str]:
    # The report stage is left out: it is running while this is written, so its marker is the
    # previous report's, and standalone report runs write into its folder between attempts.
    times = stage_times(root).query("stage != 'report'")
    if times.empty:
        return []
    total = times["seconds"].sum()
    shown = times.assign(minutes=(times["seconds"] / 60).round(1))[["stage", "minutes", "attempts", "finished"]]
    return [f"### {title}\n\nSum of the finished stages of `{display_path(root)}`: **{total / 60:.1f} min** "
            f"({len(times)} stages, the report itself not counted; each stage's wall time read from its "
            "`.pipeline_done.json`, earlier interrupted attempts of a resumed stage included: an attempt killed "
            "without warning counts until its last written file, a lower bound; markers written before 2026-11-25 "
            "hold only the last attempt).\n",
            markdown_table(shown), ""]


def _robustness_dirs(root: Path, backbones: Sequence[Backbone]) -> list[Path]:
    """The notebook-04 result folders of the backbones' robustness runs (the verdict's)."""
    return list(dict.fromkeys(result_dir(root, b.experiment, "robustness", b.robustness_run)
                              for b in backbones if b.robustness_run is not None))


def _supplementary_robustness(root: Path, backbones: Sequence[Backbone]) -> list[str]:
    """Criterion c on notebook-04 runs beside the main job's (``<exp-2>/robustness/<run>/``, e.g. the
    3-seed run of params/robustness_seeds3.yaml): not part of the verdict, shown next to it."""
    base = Path(root) / EXP2 / LAYOUT.get("robustness", "robustness")
    main_runs = set(_robustness_dirs(root, backbones))
    runs = sorted(p for p in base.glob("*/criterion.csv") if p.parent not in main_runs) if base.is_dir() else []
    parts: list[str] = []
    for path in runs:
        criterion = pd.read_csv(path)
        seeds = sorted(set(criterion["n_seeds"].astype(int))) if "n_seeds" in criterion else []
        rows = pd.DataFrame(robustness_rows([path.parent], backbones))
        rows = rows[rows["kind"] == "part"] if (rows["kind"] == "part").any() else rows
        shown = format_verdict(rows.reset_index(drop=True))[["scope", "measured", "passed"]]
        excluded = ""
        if {"diff_lo", "diff_hi"} <= set(criterion.columns):
            stressed = criterion[criterion["stress"].astype(str) != "none"]
            worse = int((stressed["diff_lo"] > 0).sum())
            better = int((stressed["diff_hi"] < 0).sum())
            excluded = (" Paired over seeds, the 95 % interval of drop(FCR) − drop(original) lies above 0 "
                        f"(FCR worse) for {worse} and below 0 (FCR better) for {better} of {len(stressed)} stress × metric × "
                        "stride rows.")
        parts += [f"### Robustness, supplementary run `{path.parent.name}` (not in the verdict)\n",
                  f"From `{display_path(path)}`; seeds per row: {seeds or 'n/a'}.{excluded}\n",
                  markdown_table(shown), ""]
    return parts


_MATCHED_COLUMNS = ("budget", "series", "config", "cost_vs_budget", "psnr", "diff_vs_budget", "diff_vs_budget_lo",
                    "diff_vs_budget_hi", "vs_budget", "diff_vs_best", "diff_vs_best_lo", "diff_vs_best_hi",
                    "dominated_by", "n_images")


def _frontier_sections(root: Path) -> list[str]:
    """The matched-cost table of every frontier run (notebook 06) under ``root``."""
    parts: list[str] = []
    for exp in (EXP1, EXP2):
        base = root / exp / LAYOUT["frontier"]
        for path in sorted(base.glob(f"*/{contract.MATCHED_COST}")) if base.is_dir() else []:
            table = pd.read_csv(path)
            shown = table[[c for c in _MATCHED_COLUMNS if c in table.columns]]
            shown = shown.map(lambda x: format_number(x) if isinstance(x, float) else x)
            cost = str(table["cost_column"].iloc[0]) if "cost_column" in table and len(table) else "cost"
            parts += [f"### Best quality at matched cost (notebook 06, {exp}, {path.parent.name})\n",
                      f"From `{display_path(path)}`. Budget = the {cost} of the original model's budget configuration; "
                      "per series its best point within the budget; differences are paired over images (same prompt "
                      "and initial noise) with percentile bootstrap 95 % intervals; `dominated_by` names the best "
                      "series when it is better with an interval that excludes zero. Every point: "
                      f"`{display_path(path.parent / contract.FRONTIER)}`.\n",
                      markdown_table(shown) if not shown.empty else "_No series within a budget._\n"]
    return parts


def build_report(
    root: str | Path,
    out_dir: str | Path | None = None,
    *,
    link_base: str | Path | None = None,
    setting: str = "embedded",
    manifest: str | Path = MANIFEST,
    backbones: Sequence[Backbone] | None = None,
    dpm_config: str = "DPM++-FD-10",
    verdict_kwargs: Mapping[str, Any] | None = None,
    sd_gpu_cost: str | Path | None = SD_GPU_COST,
    timing_beside: str | Path | None = None,
    reference: str | Path | None = None,
) -> dict[str, Any]:
    """Write the report of the run under ``root`` into ``out_dir`` (default ``root/report``):
    ``exp1_table.csv``, ``exp2_table.csv``, ``verdict.csv`` (numbers as measured), ``report.md``
    (formatted tables, the verdict, notebook 04/05 tables, figures copied to ``figures/``).
    ``backbones``: default those of ``setting`` in ``manifest`` (``params/experiments.yaml``).
    ``timing_beside``: another run's root (e.g. the demo's, beside the study) whose stage times are
    shown after this run's. ``reference``: a committed run (the demo's) whose numbers the report
    sets beside this run's (:mod:`fcr.report.reproduction`, ``reproduction.csv``).

    Returns ``{"markdown": <the text of report.md>, "readme_markdown": <a shorter version for the
    README: criterion rows of the verdict, both experiment tables, figure links relative to
    link_base (default out_dir)>, "verdict": DataFrame, "exp1": DataFrame | None, "exp2":
    DataFrame | None, "files": [...]}``.
    ``sd_gpu_cost``: ``benchmarks/bench_sd_gpu.py``'s CSV (criterion-b context at SD scale; skipped
    when the file does not exist, e.g. on a machine that never had a GPU).
    A missing input becomes a 'not available' line naming the file, never an error.
    """
    import os

    root = Path(root)
    backbones = backbones_of(setting, manifest) if backbones is None else backbones
    out_dir = Path(out_dir) if out_dir is not None else root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    link_base = Path(link_base) if link_base is not None else out_dir
    files: list[Path] = []

    kwargs = dict(verdict_kwargs or {})
    if sd_gpu_cost is not None and Path(sd_gpu_cost).is_file():
        kwargs.setdefault("sd_gpu_cost", sd_gpu_cost)
    study_results = study_tables(root, backbones)
    stress_did = stress_did_table(root, backbones)
    verdict = evaluate_criteria(root, setting=setting, backbones=backbones, contrasts=study_results[0],
                                 safe_strides=study_results[1], stress_did=stress_did, **kwargs)
    # Paths in the notes as a reader of this checkout opens them (relative to the repository).
    for col in ("scope", "measured", "note"):
        verdict[col] = verdict[col].astype(str).map(portable_text)
    verdict.to_csv(out_dir / "verdict.csv", index=False)
    files.append(out_dir / "verdict.csv")
    intro = ["### Success criteria (seed section 5)",
             "",
             "Embedded equivalents: FD of the `fashioncnn` classifier features plays FID; accuracy of the prompted "
             "class plays CLIPScore. `passed` is n/a where an input is missing or the quantity cannot be measured "
             "on this machine (the note says which). Kinds: *criterion* rows make the verdict, *part* rows feed "
             "them, *context* rows are for reading only.",
             ""]
    full_verdict = [markdown_table(format_verdict(verdict))]
    criterion_rows = verdict[verdict["kind"] == "criterion"].reset_index(drop=True)
    compact_verdict = [markdown_table(format_verdict(criterion_rows).drop(columns=["kind"])),
                       f"Every part and context row: `{display_path(out_dir / 'verdict.csv')}` and "
                       f"`{display_path(out_dir / 'report.md')}`.\n"]
    beside_a = verdict[(verdict["kind"] == "context") & (verdict["criterion"] == A_NAME)]
    if not beside_a.empty:
        # Criterion a means little without the same margins for the models that have no FCR.
        compact_verdict += ["Criterion a beside the models without FCR (context rows, same margins and images):\n",
                            markdown_table(format_verdict(beside_a.reset_index(drop=True))[["scope", "measured", "passed"]]),
                            ""]
    sd_rows = verdict[verdict["criterion"].astype(str).str.contains("SD scale", regex=False)]
    if not sd_rows.empty and sd_rows["passed"].notna().any():
        compact_verdict += [
            "#### Criterion b at Stable Diffusion scale (GPU, cost only)\n",
            f"{sd_rows['note'].iloc[0]}\n",
            markdown_table(format_verdict(sd_rows.reset_index(drop=True))[
                ["scope", "measured", "threshold", "passed"]]),
        ]

    exp_parts: list[str] = []
    tables: dict[str, pd.DataFrame | None] = {"exp1": None, "exp2": None}
    exp1_backbone = next((b for b in backbones if b.experiment == EXP1), None)
    for key, title, make in (
        ("exp1", "exp-1 main ablation (original model: "
         + (f"{exp1_backbone.name}, {exp1_backbone.role})" if exp1_backbone else "n/a)"),
         (lambda: exp1_table(result_dir(root, EXP1, "sweep", exp1_backbone.sweep_run), backbone=exp1_backbone))
         if exp1_backbone else None),
        ("exp2", "exp-2 generalisation", (lambda: _exp2_table_by_sweep_run(root, backbones, dpm_config))
         if any(b.experiment == EXP2 for b in backbones) else None),
    ):
        exp_parts.append(f"### {title}\n")
        if make is None:
            exp_parts.append("_No backbone of this experiment is configured._\n")
            continue
        try:
            table = make()
        except InputError as exc:
            exp_parts.append(f"_Not available: {exc}._\n")
            continue
        tables[key] = table
        table.to_csv(out_dir / f"{key}_table.csv", index=False)
        files.append(out_dir / f"{key}_table.csv")
        exp_parts.append("Mean over seeds with 95 % t intervals (a single seed: the percentile bootstrap interval "
                         "over images, FD and accuracy only; the FD one is shifted upward, see "
                         "fcr.eval.stats.bootstrap_metric); time "
                         "per image measured per batch size; speed-ups against FD-5 of the same architecture; paired "
                         "test against the original model's FD-5 on the per-image prompted-class probability "
                         "(Δ = row − FD-5).\n")
        exp_parts.append(markdown_table(format_experiment_table(table)))

    robustness_dirs = _robustness_dirs(root, backbones)
    extra = [_csv_section("Robustness (notebook 04): drop under stress, FCR vs original"
                          + (f" ({folder.name})" if len(robustness_dirs) > 1 else ""), folder / contract.CRITERION)
             for folder in robustness_dirs]
    mechanistic = dict.fromkeys((b.experiment, b.mechanistic_run) for b in backbones if b.mechanistic_run is not None)
    extra += [_csv_section(f"Mechanistic (notebook 05, {exp}{'' if run == 'main' else f', {run}'}): "
                           "encoder-feature variance reduction",
                           result_dir(root, exp, "mechanistic", run) / contract.VARIANCE_REDUCTION)
              for exp, run in mechanistic]
    for exp, run in mechanistic:
        extra += trajectory_section(result_dir(root, exp, "mechanistic", run),
                                    f"Mechanism along sampled trajectories (notebook 05, {exp}, {run})")

    frontier = _frontier_sections(root)
    figures = _collect_figures(root, out_dir)
    files += figures

    def figs(base: Path) -> list[str]:
        if not figures:
            return []
        return ["### Figures\n"] + [f"![{f.stem}]({Path(os.path.relpath(f, base)).as_posix()})\n" for f in figures]

    study, study_files = study_section(backbones, out_dir, study_results)
    length, length_files = length_section(root, backbones, out_dir)
    ablation, ablation_files = ablation_section(root, backbones, out_dir)
    stress, stress_files = stress_section(stress_did, out_dir)
    regime, regime_files = regime_section(root, backbones, out_dir)
    few_steps, few_steps_files = few_steps_section(root, backbones, out_dir)
    study += length + ablation + regime + few_steps + stress
    files += study_files + length_files + ablation_files + regime_files + few_steps_files + stress_files
    supplementary = _supplementary_robustness(root, backbones)
    timing = _timing_section(root, "Wall time of this run")
    if timing_beside is not None:
        beside = _timing_section(Path(timing_beside), "Wall time of the demo (make main)")
        if beside:
            timing += beside
        else:  # only a report marker: the demo's stages ran elsewhere or not at all
            timing += ["### Wall time of the demo (make main)\n",
                       f"No finished demo stage in `{display_path(timing_beside)}` (run `make main`).", ""]
    reproduction: list[str] = []
    if reference is not None:
        from fcr.report.reproduction import reproduction_section

        reproduction, table = reproduction_section(root, out_dir, Path(reference))
        if table is not None:
            table.to_csv(out_dir / contract.REPRODUCTION, index=False)
            files.append(out_dir / contract.REPRODUCTION)
    summary = study_summary(study_results)  # plain language first (issue #12), every number from the tables
    report_md = "\n".join(summary + intro + full_verdict + study + exp_parts + frontier + extra + supplementary
                          + timing + reproduction + figs(out_dir))
    (out_dir / "report.md").write_text(report_md)
    files.append(out_dir / "report.md")
    readme_md = "\n".join(summary + intro + compact_verdict + study + exp_parts + frontier + supplementary + timing
                          + figs(link_base))
    return {"markdown": report_md, "readme_markdown": readme_md, "verdict": verdict, **tables, "files": files}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m fcr.report --root outputs/embedded [--setting sd] [--out-dir DIR] [--readme README.md]
    [--manifest FILE]``."""
    parser = argparse.ArgumentParser(description="Write the result tables and the success-criteria verdict of a run.")
    parser.add_argument("--root", default="outputs/embedded", help="the run's output folder")
    parser.add_argument("--setting", default="embedded", choices=("embedded", "sd"),
                        help="whose backbones (params/experiments.yaml) the report reads")
    parser.add_argument("--out-dir", default=None, help="where the report goes (default ROOT/report)")
    parser.add_argument("--readme", default=None, help="README whose results section is replaced")
    parser.add_argument("--dpm-config", default="DPM++-FD-10", help="name of the cached DPM-Solver++ configuration")
    parser.add_argument("--manifest", default=str(MANIFEST), help="experiments manifest whose backbones are read "
                        "(default params/experiments.yaml; e.g. params/pilot/experiments.yaml)")
    parser.add_argument("--timing-beside", default=None,
                        help="another run's root whose stage times are shown too (e.g. outputs/embedded beside the study)")
    args = parser.parse_args(argv)
    from fcr.paths import chdir_repo_root

    chdir_repo_root()
    link_base = Path(args.readme).resolve().parent if args.readme else None
    report = build_report(args.root, args.out_dir, link_base=link_base, setting=args.setting,
                          dpm_config=args.dpm_config, manifest=args.manifest, timing_beside=args.timing_beside)
    print(format_verdict(report["verdict"])[["criterion", "scope", "measured", "passed"]].to_string(index=False))
    print(f"report: {Path(args.out_dir or Path(args.root) / 'report') / 'report.md'}")
    if args.readme:
        update_readme(args.readme, report["readme_markdown"], root=args.root)
        print(f"updated the results section of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
