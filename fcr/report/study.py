"""The report's study section: the pre-registered contrasts of every backbone whose experiment has a
``study`` in ``params/experiments.yaml`` (:mod:`fcr.experiments.contrasts`), and each model's safe
stride, written as ``contrasts.csv`` / ``safe_strides.csv`` with a markdown section."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fcr import contract
from fcr.experiments.contrasts import evaluate_contrasts, safe_strides, select_lambda
from fcr.manifest import Backbone
from fcr.report.rows import format_number, markdown_table, result_dir

__all__ = ["study_section", "study_tables"]


def _quality(folder: Path) -> pd.DataFrame | None:
    path = folder / contract.QUALITY
    return pd.read_csv(path) if path.is_file() else None


def study_tables(root: str | Path, backbones: Sequence[Backbone]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(contrasts, safe strides, notes) over the backbones with a study; a backbone whose sweep (or
    selection run) has not been run is named in the notes instead."""
    root = Path(root)
    contrasts, safe, notes = [], [], []
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
                                   study=study, selected=selected, first_unsafe=first_unsafe)
        if selected is not None:
            notes.append(f"{b.name}: λ = {selected[0]:g} ({selected[1]}) selected on sweep run "
                         f"{study.selection_run!r}, reported on {b.sweep_run!r}")
        contrasts.append(table.assign(backbone=b.name, experiment=b.experiment))
    join = (lambda frames: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
    return join(contrasts), join(safe), notes


def study_section(
    backbones: Sequence[Backbone], out_dir: Path, tables: tuple[pd.DataFrame, pd.DataFrame, list[str]]
) -> tuple[list[str], list[Path]]:
    """Markdown lines of the study section for :func:`study_tables`' ``tables`` and the files
    written (empty when no backbone has a study)."""
    if not any(b.study is not None for b in backbones):
        return [], []
    contrasts, safe, notes = tables
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
    if not safe.empty:
        path = out_dir / contract.SAFE_STRIDES
        safe.to_csv(path, index=False)
        files.append(path)
        lines.append("Safe stride per model: every uniform stride up to it is shown non-inferior to the model's own "
                     "FD-5 (ΔFD ≤ +5 % and Δ accuracy ≥ −2 %, paired, Holm over the model's strides).\n")
        summary = safe.groupby("model", sort=False)[["safe_stride", "first_unsafe"]].first().reset_index()
        lines.append(markdown_table(summary))
    return lines, files
