"""The analysis stage: every derived table of a run, written into its report folder.

Reads what the runners wrote (sweeps, robustness, mechanism, fine-tune run folders) and writes,
under the names of :mod:`fcr.contract`: the study's contrasts and safe strides, the exploratory
families, criterion c's difference in differences, both experiment tables, the success-criteria
verdict and the supplementary robustness rows, plus ``analysis_notes.json`` (what could not be
computed and why). The report (:mod:`fcr.report`) formats these files and computes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fcr import contract
from fcr.analysis.cache_aware import study_rows_under
from fcr.analysis.experiment_tables import exp1_table, exp2_table_by_sweep_run
from fcr.analysis.grid import grid_tables
from fcr.analysis.robustness_criterion import robustness_rows
from fcr.analysis.rows import EXP1, EXP2, LAYOUT, InputError, result_dir, robustness_dirs
from fcr.analysis.study import (
    ablation_table,
    few_steps_tables,
    length_table,
    regime_table,
    stress_did_table,
    study_tables,
)
from fcr.analysis.verdict import evaluate_criteria
from fcr.files import write_json_atomic
from fcr.manifest import MANIFEST, Backbone, backbones_of
from fcr.paths import REPO_ROOT, portable_text

__all__ = ["SD_GPU_COST", "analyze", "supplementary_robustness", "write_study_tables"]

SD_GPU_COST = REPO_ROOT / "benchmarks" / "results" / "bench_sd_gpu.csv"


def supplementary_robustness(root: Path, backbones: Sequence[Backbone]) -> pd.DataFrame:
    """Criterion-c rows of the notebook-04 runs beside the verdict's (``<exp-2>/robustness/<run>/``,
    e.g. the 3-seed run of params/robustness_seeds3.yaml), with their ``run`` folder; not part of
    the verdict."""
    base = Path(root) / EXP2 / LAYOUT.get("robustness", "robustness")
    main_runs = set(robustness_dirs(root, backbones))
    runs = sorted(p for p in base.glob(f"*/{contract.CRITERION}") if p.parent not in main_runs) if base.is_dir() else []
    frames = []
    for path in runs:
        rows = pd.DataFrame(robustness_rows([path.parent], backbones))
        rows = rows[rows["kind"] == "part"] if (rows["kind"] == "part").any() else rows
        frames.append(rows.assign(run=str(path.parent)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _experiment_tables(root: Path, backbones: Sequence[Backbone], dpm_config: str) -> dict[str, pd.DataFrame | str]:
    """{"exp1" / "exp2": the table, or why it is missing} for the experiments the backbones configure."""
    out: dict[str, pd.DataFrame | str] = {}
    exp1 = next((b for b in backbones if b.experiment == EXP1), None)
    makers = {"exp1": (lambda: exp1_table(result_dir(root, EXP1, "sweep", exp1.sweep_run), backbone=exp1))
              if exp1 else None,
              "exp2": (lambda: exp2_table_by_sweep_run(root, backbones, dpm_config))
              if any(b.experiment == EXP2 for b in backbones) else None}
    for key, make in makers.items():
        if make is None:
            continue
        try:
            out[key] = make()
        except InputError as exc:
            out[key] = str(exc)
    return out


def write_study_tables(root: Path, backbones: Sequence[Backbone], out_dir: Path
                       ) -> tuple[tuple[pd.DataFrame, pd.DataFrame, list[str], pd.DataFrame], list[Path]]:
    """The study's tables (:mod:`fcr.analysis.study`) into ``out_dir``: a family's file only where
    a backbone declares it (an empty contrast or stride table is not written). Returns
    ``(contrasts, safe strides, notes, stress DiD)`` and the files written."""
    files: list[Path] = []

    def write(table: pd.DataFrame | None, name: str, *, when_empty: bool = True) -> None:
        if table is not None and (when_empty or not table.empty):
            table.to_csv(out_dir / name, index=False)
            files.append(out_dir / name)

    contrasts, safe, notes, fd_inf = study_tables(root, backbones)
    grid = grid_tables(root, backbones)
    if grid is not None:  # the grid's families are rows of the study's contrasts table
        notes = [*notes, *grid.notes]
        if not grid.contrasts.empty:
            contrasts = pd.concat([contrasts, grid.contrasts], ignore_index=True) if not contrasts.empty else grid.contrasts
        write(grid.secondary, contract.GRID_SECONDARY)
        write(grid.selections, contract.GRID_SELECTIONS)
        write(grid.sensitivity, contract.GRID_SENSITIVITY)
    cache_aware = study_rows_under(root)  # issue #33's arms: rows of the same table, families "cache-aware: ..."
    if not cache_aware.empty:
        contrasts = pd.concat([contrasts, cache_aware], ignore_index=True) if not contrasts.empty else cache_aware
    write(contrasts, contract.CONTRASTS, when_empty=False)
    write(safe, contract.SAFE_STRIDES, when_empty=False)
    write(fd_inf, contract.FD_INFINITY, when_empty=False)
    write(length_table(root, backbones), contract.LENGTH_CONTRASTS)
    write(ablation_table(root, backbones), contract.ABLATION_CONTRASTS)
    write(regime_table(root, backbones), contract.REGIME_SAFE_STRIDES)
    few_steps, few_steps_safe = few_steps_tables(root, backbones)
    write(few_steps, contract.FEW_STEPS_CONTRASTS)
    write(few_steps_safe, contract.FEW_STEPS_SAFE_STRIDES)
    stress_did = stress_did_table(root, backbones)
    write(stress_did, contract.STRESS_DID, when_empty=False)
    return (contrasts, safe, notes, stress_did), files


def analyze(
    root: str | Path,
    out_dir: str | Path | None = None,
    *,
    setting: str = "embedded",
    manifest: str | Path = MANIFEST,
    backbones: Sequence[Backbone] | None = None,
    dpm_config: str = "DPM++-FD-10",
    verdict_kwargs: Mapping[str, Any] | None = None,
    sd_gpu_cost: str | Path | None = SD_GPU_COST,
) -> list[Path]:
    """Write every derived table of the run under ``root`` into ``out_dir`` (default
    ``root/report``) and return the files written. ``backbones``: default those of ``setting`` in
    ``manifest``. ``sd_gpu_cost``: ``benchmarks/bench_sd_gpu.py``'s CSV (criterion-b context at SD
    scale; skipped when absent). A missing input becomes a 'not available' verdict row or note
    naming the file, never an error."""
    root = Path(root)
    backbones = backbones_of(setting, manifest) if backbones is None else backbones
    out_dir = Path(out_dir) if out_dir is not None else root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    def write(table: pd.DataFrame | None, name: str, *, when_empty: bool = True) -> None:
        if table is not None and (when_empty or not table.empty):
            table.to_csv(out_dir / name, index=False)
            files.append(out_dir / name)

    study, study_files = write_study_tables(root, backbones, out_dir)
    files += study_files
    contrasts, safe, notes, stress_did = study
    kwargs = dict(verdict_kwargs or {})
    if sd_gpu_cost is not None and Path(sd_gpu_cost).is_file():
        kwargs.setdefault("sd_gpu_cost", sd_gpu_cost)
    verdict = evaluate_criteria(root, setting=setting, backbones=backbones, contrasts=contrasts, safe_strides=safe,
                                stress_did=stress_did, **kwargs)
    # Paths in the notes as a reader of this checkout opens them (relative to the repository).
    for col in ("scope", "measured", "note"):
        verdict[col] = verdict[col].astype(str).map(portable_text)
    write(verdict, contract.VERDICT)

    missing: dict[str, str] = {}
    for key, table in _experiment_tables(root, backbones, dpm_config).items():
        if isinstance(table, str):
            missing[key] = table
        else:
            write(table, contract.EXP1_TABLE if key == "exp1" else contract.EXP2_TABLE)
    write(supplementary_robustness(root, backbones), contract.SUPPLEMENTARY_ROBUSTNESS, when_empty=False)
    write_json_atomic(out_dir / contract.ANALYSIS_NOTES, {"study_notes": notes, "missing_tables": missing})
    files.append(out_dir / contract.ANALYSIS_NOTES)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m fcr.analysis.run --root outputs/embedded [--setting sd] [--manifest FILE]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write the derived tables and the verdict of a run.")
    parser.add_argument("--root", default="outputs/embedded", help="the run's output folder")
    parser.add_argument("--setting", default="embedded", choices=("embedded", "sd"))
    parser.add_argument("--out-dir", default=None, help="where the tables go (default ROOT/report)")
    parser.add_argument("--dpm-config", default="DPM++-FD-10", help="name of the cached DPM-Solver++ configuration")
    parser.add_argument("--manifest", default=str(MANIFEST), help="experiments manifest whose backbones are read")
    args = parser.parse_args(argv)
    from fcr.paths import chdir_repo_root

    chdir_repo_root()
    for path in analyze(args.root, args.out_dir, setting=args.setting, manifest=args.manifest,
                        dpm_config=args.dpm_config):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
