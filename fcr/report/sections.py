"""Report sections besides the study's: the experiment tables and the verdict as readable tables,
figures, robustness and mechanism CSVs, the frontier's matched-cost tables, stage wall times.
Everything here formats files a run and its analysis stage wrote; nothing is computed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from fcr import contract, markers
from fcr.analysis.rows import LAYOUT, format_number, markdown_table
from fcr.paths import display_path

__all__ = ["METRIC_TITLES", "collect_figures", "csv_section", "format_experiment_table", "format_verdict",
           "frontier_sections", "stage_times", "supplementary_robustness_section", "timing_section"]

METRIC_TITLES = {"fd": "FD (fashioncnn) ↓", "class_accuracy": "class accuracy ↑", "kid": "KID ↓", "is": "IS ↑"}


def _with_ci(v: Any, lo: Any, hi: Any) -> str:
    s = format_number(v)
    if s == "n/a":
        return s
    if format_number(lo) == "n/a" or format_number(hi) == "n/a":
        return s
    return f"{s} [{format_number(lo)}, {format_number(hi)}]"


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


def experiments_under(root: Path) -> list[str]:
    """The experiment folders of a run (``exp-1-...``, ``exp-2-...``, ...), in their order."""
    return [p.name for p in sorted(root.glob("exp-*")) if p.is_dir()]


def collect_figures(root: Path, out_dir: Path) -> list[Path]:
    """Copy the figures of the run (sweeps, robustness, mechanistic) into ``out_dir/figures``."""
    copied = []
    dest = out_dir / "figures"
    for exp in experiments_under(root):
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


def csv_section(title: str, path: Path, max_rows: int = 40) -> str:
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


def timing_section(root: Path, title: str = "Main job wall time") -> list[str]:
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


def supplementary_robustness_section(out_dir: Path) -> list[str]:
    """Criterion c on notebook-04 runs beside the main job's (the analysis's
    ``supplementary_robustness.csv``): not part of the verdict, shown next to it."""
    path = out_dir / contract.SUPPLEMENTARY_ROBUSTNESS
    if not path.is_file():
        return []
    rows = pd.read_csv(path)
    parts: list[str] = []
    for run, group in rows.groupby("run", sort=False):
        folder = Path(str(run))
        criterion = pd.read_csv(folder / contract.CRITERION)
        seeds = sorted(set(criterion["n_seeds"].astype(int))) if "n_seeds" in criterion else []
        shown = format_verdict(group.drop(columns=["run"]).reset_index(drop=True))[["scope", "measured", "passed"]]
        excluded = ""
        if {"diff_lo", "diff_hi"} <= set(criterion.columns):
            stressed = criterion[criterion["stress"].astype(str) != "none"]
            worse = int((stressed["diff_lo"] > 0).sum())
            better = int((stressed["diff_hi"] < 0).sum())
            excluded = (" Paired over seeds, the 95 % interval of drop(FCR) − drop(original) lies above 0 "
                        f"(FCR worse) for {worse} and below 0 (FCR better) for {better} of {len(stressed)} stress × metric × "
                        "stride rows.")
        parts += [f"### Robustness, supplementary run `{folder.name}` (not in the verdict)\n",
                  f"From `{display_path(folder / contract.CRITERION)}`; seeds per row: {seeds or 'n/a'}.{excluded}\n",
                  markdown_table(shown), ""]
    return parts


_MATCHED_COLUMNS = ("budget", "series", "config", "cost_vs_budget", "psnr", "diff_vs_budget", "diff_vs_budget_lo",
                    "diff_vs_budget_hi", "vs_budget", "diff_vs_best", "diff_vs_best_lo", "diff_vs_best_hi",
                    "dominated_by", "n_images")


def frontier_sections(root: Path) -> list[str]:
    """The matched-cost table of every frontier run (notebook 06) under ``root``."""
    parts: list[str] = []
    for exp in experiments_under(root):
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
            fd_inf = path.parent / contract.CACHE_AWARE_FD_INF
            if fd_inf.is_file():
                table = pd.read_csv(fd_inf).map(lambda x: format_number(x) if isinstance(x, float) else x)
                parts += [f"### Cache-aware fine-tunes: FD∞ (secondary, descriptive; {exp}, {path.parent.name})\n",
                          f"From `{display_path(fd_inf)}`: per arm at its configuration the mean FD∞ over its training "
                          "runs, `fd_inf_hi` its upper 95 % bound (extrapolation error; `run_sd` the spread between "
                          "runs); non-inferior when that bound is below (1 + margin) x the original's full-sampling "
                          "FD∞ (`full_fd_inf`).\n", markdown_table(table)]
    return parts
