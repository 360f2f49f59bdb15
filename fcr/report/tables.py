"""The report of a run: ``report.md`` composed from the tables its analysis stage wrote.

Reads, through the names of :mod:`fcr.contract`, what :func:`fcr.analysis.run.analyze` wrote into
the report folder (verdict, experiment tables, the study's contrasts and families) and what the
notebooks wrote (robustness, mechanism, frontier CSVs, figures); computes nothing and never imports
torch or a runner. Numbers are printed with 3 significant digits, 95 % intervals as ``[lo, hi]``.

    python -m fcr.pipeline report --root outputs/embedded     # analysis, then this report
    python -m fcr.report --root outputs/embedded              # this report only (tables already there)
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fcr import contract
from fcr.analysis.quality_cost import A_NAME
from fcr.analysis.rows import EXP1, EXP2, InputError, markdown_table, producer, result_dir, robustness_dirs
from fcr.manifest import MANIFEST, Backbone, backbones_of
from fcr.paths import display_path
from fcr.report.mechanism import trajectory_section
from fcr.report.sections import (
    collect_figures,
    csv_section,
    format_experiment_table,
    format_verdict,
    frontier_sections,
    supplementary_robustness_section,
    timing_section,
)
from fcr.report.grid import grid_section
from fcr.report.headline import headline_figure
from fcr.report.study import (
    ablation_section,
    few_steps_section,
    length_section,
    read_derived,
    read_study_tables,
    regime_section,
    stress_section,
    study_section,
    study_summary,
)

__all__ = ["build_report", "main"]

_EXPERIMENT_INTRO = ("Mean over seeds with 95 % t intervals (a single seed: the percentile bootstrap interval "
                     "over images, FD and accuracy only; the FD one is shifted upward, see "
                     "fcr.stats.bootstrap_metric); time "
                     "per image measured per batch size; speed-ups against FD-5 of the same architecture; paired "
                     "test against the original model's FD-5 on the per-image prompted-class probability "
                     "(Δ = row − FD-5).\n")


def _read_required(path: Path) -> pd.DataFrame:
    """A table the analysis must have written; :class:`InputError` naming the stage otherwise."""
    if not path.is_file():
        raise InputError(f"missing {path}: it is written by {producer(path)}")
    return read_derived(path)


def _verdict_sections(verdict: pd.DataFrame, out_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """(intro, the full verdict, the README's compact verdict) as markdown lines."""
    intro = ["### Success criteria (seed section 5)",
             "",
             "Embedded equivalents: FD of the `fashioncnn` classifier features plays FID; accuracy of the prompted "
             "class plays CLIPScore. `passed` is n/a where an input is missing or the quantity cannot be measured "
             "on this machine (the note says which). Kinds: *criterion* rows make the verdict, *part* rows feed "
             "them, *context* rows are for reading only.",
             ""]
    full = [markdown_table(format_verdict(verdict))]
    criterion_rows = verdict[verdict["kind"] == "criterion"].reset_index(drop=True)
    compact = [markdown_table(format_verdict(criterion_rows).drop(columns=["kind"])),
               f"Every part and context row: `{display_path(out_dir / contract.VERDICT)}` and "
               f"`{display_path(out_dir / 'report.md')}`.\n"]
    beside_a = verdict[(verdict["kind"] == "context") & (verdict["criterion"] == A_NAME)]
    if not beside_a.empty:
        # Criterion a means little without the same margins for the models that have no FCR.
        compact += ["Criterion a beside the models without FCR (context rows, same margins and images):\n",
                    markdown_table(format_verdict(beside_a.reset_index(drop=True))[["scope", "measured", "passed"]]),
                    ""]
    sd_rows = verdict[verdict["criterion"].astype(str).str.contains("SD scale", regex=False)]
    if not sd_rows.empty and sd_rows["passed"].notna().any():
        compact += [
            "#### Criterion b at Stable Diffusion scale (GPU, cost only)\n",
            f"{sd_rows['note'].iloc[0]}\n",
            markdown_table(format_verdict(sd_rows.reset_index(drop=True))[
                ["scope", "measured", "threshold", "passed"]]),
        ]
    return intro, full, compact


def _experiment_sections(out_dir: Path, backbones: Sequence[Backbone]) -> tuple[list[str], dict[str, pd.DataFrame | None]]:
    """The exp-1 and exp-2 tables as markdown, and the tables themselves."""
    notes_path = out_dir / contract.ANALYSIS_NOTES
    missing = json.loads(notes_path.read_text()).get("missing_tables", {}) if notes_path.is_file() else {}
    exp1_backbone = next((b for b in backbones if b.experiment == EXP1), None)
    parts: list[str] = []
    tables: dict[str, pd.DataFrame | None] = {"exp1": None, "exp2": None}
    for key, title, configured, name in (
        ("exp1", "exp-1 main ablation (original model: "
         + (f"{exp1_backbone.name}, {exp1_backbone.role})" if exp1_backbone else "n/a)"),
         exp1_backbone is not None, contract.EXP1_TABLE),
        ("exp2", "exp-2 generalisation", any(b.experiment == EXP2 for b in backbones), contract.EXP2_TABLE),
    ):
        parts.append(f"### {title}\n")
        if not configured:
            parts.append("_No backbone of this experiment is configured._\n")
            continue
        if key in missing:
            parts.append(f"_Not available: {missing[key]}._\n")
            continue
        try:
            table = _read_required(out_dir / name)
        except InputError as exc:
            parts.append(f"_Not available: {exc}._\n")
            continue
        tables[key] = table
        parts += [_EXPERIMENT_INTRO, markdown_table(format_experiment_table(table))]
    return parts, tables


def build_report(
    root: str | Path,
    out_dir: str | Path | None = None,
    *,
    link_base: str | Path | None = None,
    setting: str = "embedded",
    manifest: str | Path = MANIFEST,
    backbones: Sequence[Backbone] | None = None,
    timing_beside: str | Path | None = None,
    reference: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``report.md`` of the run under ``root`` into ``out_dir`` (default ``root/report``),
    where :func:`fcr.analysis.run.analyze` wrote the tables it formats. ``backbones``: default
    those of ``setting`` in ``manifest``. ``timing_beside``: another run's root (e.g. the demo's,
    beside the study) whose stage times are shown after this run's. ``reference``: a committed run
    (the demo's) whose numbers the report sets beside this run's (:mod:`fcr.report.reproduction`,
    ``reproduction.csv``).

    Returns ``{"markdown": <the text of report.md>, "readme_markdown": <a shorter version for the
    README: criterion rows of the verdict, both experiment tables, figure links relative to
    link_base (default out_dir)>, "verdict": DataFrame, "exp1": DataFrame | None, "exp2":
    DataFrame | None, "files": [...]}``. A missing input becomes a 'not available' line naming the
    file, never an error; a missing verdict means the analysis stage did not run (InputError).
    """
    root = Path(root)
    backbones = backbones_of(setting, manifest) if backbones is None else backbones
    out_dir = Path(out_dir) if out_dir is not None else root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    link_base = Path(link_base) if link_base is not None else out_dir
    files: list[Path] = []

    verdict = _read_required(out_dir / contract.VERDICT)
    intro, full_verdict, compact_verdict = _verdict_sections(verdict, out_dir)
    exp_parts, tables = _experiment_sections(out_dir, backbones)

    extra = [csv_section("Robustness (notebook 04): drop under stress, FCR vs original"
                         + (f" ({folder.name})" if len(robustness_dirs(root, backbones)) > 1 else ""),
                         folder / contract.CRITERION)
             for folder in robustness_dirs(root, backbones)]
    mechanistic = dict.fromkeys((b.experiment, b.mechanistic_run) for b in backbones if b.mechanistic_run is not None)
    extra += [csv_section(f"Mechanistic (notebook 05, {exp}{'' if run == 'main' else f', {run}'}): "
                          "encoder-feature variance reduction",
                          result_dir(root, exp, "mechanistic", run) / contract.VARIANCE_REDUCTION)
              for exp, run in mechanistic]
    for exp, run in mechanistic:
        extra += trajectory_section(result_dir(root, exp, "mechanistic", run),
                                    f"Mechanism along sampled trajectories (notebook 05, {exp}, {run})")

    gated = dict.fromkeys(b.experiment for b in backbones if b.study is not None and b.study.stopping_rule)
    extra += [csv_section(f"The seed's stopping rule ({exp}): criterion a of each FCR candidate before the later phases",
                          root / exp / "stopping_rule" / contract.STOPPING_RULE) for exp in gated]
    frontier = frontier_sections(root)
    figures = collect_figures(root, out_dir)
    headline = headline_figure(root, out_dir)  # every frontier run of one original on one figure
    figures += [headline] if headline is not None else []
    files += figures

    def figs(base: Path) -> list[str]:
        if not figures:
            return []
        return ["### Figures\n"] + [f"![{f.stem}]({Path(os.path.relpath(f, base)).as_posix()})\n" for f in figures]

    study_tables = read_study_tables(out_dir)
    grid, grid_figures = grid_section(out_dir, study_tables.contrasts)
    files += grid_figures
    figures += grid_figures  # linked under Figures, relative to the README's base too
    study = (study_section(backbones, study_tables) + grid + length_section(out_dir) + ablation_section(out_dir)
             + regime_section(out_dir) + few_steps_section(backbones, out_dir) + stress_section(out_dir))
    supplementary = supplementary_robustness_section(out_dir)
    timing = timing_section(root, "Wall time of this run")
    if timing_beside is not None:
        beside = timing_section(Path(timing_beside), "Wall time of the demo (make main)")
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
    summary = study_summary(study_tables)  # plain language first (issue #12), every number from the tables
    report_md = "\n".join(summary + intro + full_verdict + study + exp_parts + frontier + extra + supplementary
                          + timing + reproduction + figs(out_dir))
    (out_dir / "report.md").write_text(report_md)
    files.append(out_dir / "report.md")
    readme_md = "\n".join(summary + intro + compact_verdict + study + exp_parts + frontier + supplementary + timing
                          + figs(link_base))
    return {"markdown": report_md, "readme_markdown": readme_md, "verdict": verdict, **tables, "files": files}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m fcr.report --root outputs/embedded [--setting sd] [--out-dir DIR] [--manifest FILE]``
    (the analysis stage must have written the tables: ``python -m fcr.pipeline report`` runs both)."""
    parser = argparse.ArgumentParser(description="Format the report of a run from its analysis tables.")
    parser.add_argument("--root", default="outputs/embedded", help="the run's output folder")
    parser.add_argument("--setting", default="embedded", choices=("embedded", "sd"),
                        help="whose backbones (params/experiments.yaml) the report reads")
    parser.add_argument("--out-dir", default=None, help="where the report goes (default ROOT/report)")
    parser.add_argument("--manifest", default=str(MANIFEST), help="experiments manifest whose backbones are read "
                        "(default params/experiments.yaml; e.g. params/pilot/experiments.yaml)")
    parser.add_argument("--timing-beside", default=None,
                        help="another run's root whose stage times are shown too (e.g. outputs/embedded beside the study)")
    args = parser.parse_args(argv)
    from fcr.paths import chdir_repo_root

    chdir_repo_root()
    report = build_report(args.root, args.out_dir, setting=args.setting, manifest=args.manifest,
                          timing_beside=args.timing_beside)
    print(format_verdict(report["verdict"])[["criterion", "scope", "measured", "passed"]].to_string(index=False))
    print(f"report: {Path(args.out_dir or Path(args.root) / 'report') / 'report.md'}")
    return 0
