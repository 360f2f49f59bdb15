"""The ablation grid (issue #31; :class:`fcr.grid_design.Grid` of a backbone): every arm against the
λ = 0 control on the study's primary endpoint with training replicates, one Holm family per grid
family; descriptive secondary endpoints; the checkpoint each fine-tune's early stopping chose; and
the contrasts repeated with those best-step weights (sensitivity).

Arms and control are averaged per image over their training runs before the paired test
(:func:`fcr.analysis.contrasts._replicated_superiority`, as the study's primary family).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from fcr import contract
from fcr.analysis.contrasts import (
    CONTRAST_COLUMNS,
    _cells,
    _fidelity_values,
    _replicated_superiority,
    adjust_family,
    common_seeds,
    fd_infinity_table,
)
from fcr.analysis.paired import check_same_prompts
from fcr.analysis.rows import result_dir
from fcr.grid_design import Grid, GridArm, best_of
from fcr.manifest import Backbone, Study

__all__ = ["GRID_SECONDARY_COLUMNS", "GRID_SENSITIVITY_COLUMNS", "SELECTION_COLUMNS", "GridTables",
           "early_stopping_selections", "grid_contrasts", "grid_secondary", "grid_sensitivity", "grid_tables"]

GRID_SECONDARY_COLUMNS = ["family", "arm", "config", "endpoint", "n", "arm_mean", "control_mean", "estimate", "lo",
                          "hi", "n_runs"]
GRID_SENSITIVITY_COLUMNS = ["family", "arm", "config", "endpoint", "n", "estimate", "lo", "hi", "p_holm", "m_tests",
                            "mde", "decision", "final_estimate", "final_lo", "final_hi", "change", "best_steps"]
SELECTION_COLUMNS = ["family", "arm", "replicate", "model", "best_step", "best_average", "last_step",
                     "last_average", "checks", "stopped_early"]


def _family_name(family: str) -> str:
    return f"grid: {family}"


def _row(arm: GridArm, control: Sequence[str], config: str, study: Study) -> dict[str, Any]:
    return {"family": _family_name(arm.family), "contrast": f"{arm.label} vs λ=0 control", "kind": "superiority",
            "endpoint": study.primary_endpoint, "model": arm.models[0], "config": config, "vs_model": control[0],
            "vs_config": config, "margin": math.nan, "n_runs": len(arm.models)}


def _arm_test(arm_sweep: tuple[Path, pd.DataFrame], arm: Sequence[str], control_sweep: tuple[Path, pd.DataFrame],
              control: Sequence[str], config: str, study: Study, seeds: Sequence[int] | None = None
              ) -> dict[str, Any]:
    """The replicated paired test of ``arm`` (its cells in the sweep ``arm_sweep``: folder and
    quality table) against ``control`` (in ``control_sweep``, the same or another folder) at
    ``config`` on the seeds every model ran (and in ``seeds``); n = 0 and nan when they share
    none. Across two folders every shared seed must have sampled the same prompts."""
    (arm_dir, arm_quality), (control_dir, control_quality) = arm_sweep, control_sweep
    shared = sorted(set(common_seeds(arm_quality, [(m, config) for m in arm]))
                    & set(common_seeds(control_quality, [(m, config) for m in control])))
    if seeds is not None:
        shared = [s for s in shared if s in set(seeds)]
    if not shared:
        return {"n": 0, "estimate": math.nan, "lo": math.nan, "hi": math.nan, "p": math.nan, "sd_diff": math.nan}
    if arm_dir != control_dir:
        check_same_prompts(arm_dir, arm[0], control_dir, control[0], config, shared)

    def values(folder: Path, models: Sequence[str]) -> list[np.ndarray]:
        return [_fidelity_values(folder, m, config, study.primary_endpoint, study.primary_reference, shared)
                for m in models]

    return _replicated_superiority(values(arm_dir, arm), values(control_dir, control), study)


def grid_contrasts(sweep_dir: str | Path, quality: pd.DataFrame, grid: Grid, study: Study,
                   reference_dir: str | Path | None = None) -> pd.DataFrame:
    """:data:`fcr.analysis.contrasts.CONTRAST_COLUMNS` rows: every arm of ``grid`` against its
    control at each study stride, Holm within each family (``family`` = ``grid: <family>``), and
    the grid's reference arm (from ``reference_dir``, default ``sweep_dir``) on the pairs it shares
    with the control (family ``grid: reference``, reported, not tested: ``p_holm`` empty)."""
    sweep = (Path(sweep_dir), quality)
    reference_dir = Path(reference_dir) if reference_dir is not None else sweep[0]
    rows: list[dict[str, Any]] = []
    for arms in grid.families.values():
        family = [{**_row(arm, grid.control, config, study),
                   **_arm_test(sweep, arm.models, sweep, grid.control, config, study)}
                  for arm in arms for config in study.strides]
        rows += adjust_family(family, study)
    if grid.reference is not None:
        reference = sweep if reference_dir == sweep[0] else (reference_dir, pd.read_csv(reference_dir / contract.QUALITY))
        for config in study.strides:
            row = {**_row(grid.reference, grid.control, config, study),
                   **_arm_test(reference, grid.reference.models, sweep, grid.control, config, study)}
            row.update(p_holm=math.nan, m_tests=0, mde=math.nan,
                       decision="reference (tested in the study's primary family)")
            rows.append(row)
    return pd.DataFrame(rows, columns=CONTRAST_COLUMNS)


def _paired_interval(diff: np.ndarray, alpha: float) -> tuple[float, float, float]:
    est = float(diff.mean())
    if len(diff) < 2:
        return est, math.nan, math.nan
    half = float(scipy.stats.t.ppf(1 - alpha / 2, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff)))
    return est, est - half, est + half


def grid_secondary(sweep_dir: str | Path, quality: pd.DataFrame, grid: Grid, study: Study,
                   fd_inf: pd.DataFrame | None = None) -> pd.DataFrame:
    """Descriptive secondary endpoints (no test) of every arm (and the reference) against the
    control at each study stride, per-image means over training runs, paired over shared images:
    ``psnr_original_full`` (PSNR to the original model's full sampling, dB), ``accuracy`` (prompted
    class correct, points) with 95 % t intervals; ``fd_inf`` (mean over training runs of FD∞, from
    ``fd_inf`` as :func:`fcr.analysis.contrasts.fd_infinity_table` wrote it; no interval)."""
    sweep_dir = Path(sweep_dir)
    rows: list[dict[str, Any]] = []
    arms = [*grid.arms, *([grid.reference] if grid.reference else [])]
    for arm in arms:
        for config in study.strides:
            base = {"family": arm.family, "arm": arm.label, "config": config, "n_runs": len(arm.models)}
            seeds = common_seeds(quality, [(m, config) for m in (*arm.models, *grid.control)])
            if not seeds:
                continue
            try:
                a = np.mean([_fidelity_values(sweep_dir, m, config, "psnr", "original_full", seeds)
                             for m in arm.models], axis=0)
                c = np.mean([_fidelity_values(sweep_dir, m, config, "psnr", "original_full", seeds)
                             for m in grid.control], axis=0)
                est, lo, hi = _paired_interval(a - c, study.alpha)
                rows.append({**base, "endpoint": "psnr_original_full", "n": len(a), "arm_mean": float(a.mean()),
                             "control_mean": float(c.mean()), "estimate": est, "lo": lo, "hi": hi})
            except (FileNotFoundError, KeyError):
                pass  # the run did not sample the original (no original_full reference)
            acc_a = np.mean([_cells(sweep_dir, m, config, seeds)["alignment"] for m in arm.models], axis=0)
            acc_c = np.mean([_cells(sweep_dir, m, config, seeds)["alignment"] for m in grid.control], axis=0)
            est, lo, hi = _paired_interval(100 * (acc_a - acc_c), study.alpha)
            rows.append({**base, "endpoint": "accuracy", "n": len(acc_a), "arm_mean": 100 * float(acc_a.mean()),
                         "control_mean": 100 * float(acc_c.mean()), "estimate": est, "lo": lo, "hi": hi})
            if fd_inf is not None and not fd_inf.empty:
                at = fd_inf[fd_inf["config"].astype(str) == config].set_index("model")["fd_inf"]
                if set(arm.models) | set(grid.control) <= set(at.index):
                    am, cm = float(at[list(arm.models)].mean()), float(at[list(grid.control)].mean())
                    rows.append({**base, "endpoint": "fd_inf", "n": len(seeds), "arm_mean": am, "control_mean": cm,
                                 "estimate": am - cm, "lo": math.nan, "hi": math.nan})
    return pd.DataFrame(rows, columns=GRID_SECONDARY_COLUMNS)


def early_stopping_selections(root: str | Path, experiment: str, grid: Grid) -> pd.DataFrame:
    """Per grid fine-tune (control first): the step its early stopping chose (``early_stopping.json``)
    and the moving average there and at the last check (``validation.csv``); fine-tunes without
    a selection record are left out."""
    root = Path(root)
    rows = []
    arms = [GridArm("control", "λ=0 control", grid.control), *grid.arms]
    for arm in arms:
        for k, model in enumerate(arm.models):
            run = root / experiment / model
            if not (run / contract.EARLY_STOPPING).is_file():
                continue
            record = json.loads((run / contract.EARLY_STOPPING).read_text())
            log = pd.read_csv(run / contract.VALIDATION_LOG) if (run / contract.VALIDATION_LOG).is_file() else None
            last = float(log["moving_average"].iloc[-1]) if log is not None and not log.empty else math.nan
            rows.append({"family": arm.family, "arm": arm.label, "replicate": k, "model": model,
                         "best_step": record.get("best_step"), "best_average": record.get("best_average"),
                         "last_step": record.get("last_step"), "last_average": last, "checks": record.get("checks"),
                         "stopped_early": record.get("stopped_early")})
    return pd.DataFrame(rows, columns=SELECTION_COLUMNS)


def grid_sensitivity(best_dir: str | Path, final_dir: str | Path, grid: Grid, study: Study,
                     selections: pd.DataFrame) -> pd.DataFrame:
    """The grid's contrasts with every fine-tune's best-step weights (``<fine-tune>@best`` in the
    ``best_run`` sweep ``best_dir``), Holm within each family, beside the final weights' estimate
    on the same pairs (from the grid sweep ``final_dir``); ``change`` = best − final, ``best_steps``
    the steps chosen per training run (arm's)."""
    best_dir, final_dir = Path(best_dir), Path(final_dir)
    q_best, q_final = pd.read_csv(best_dir / contract.QUALITY), pd.read_csv(final_dir / contract.QUALITY)
    steps = dict(zip(selections["model"], selections["best_step"])) if not selections.empty else {}
    rows: list[dict[str, Any]] = []
    control_best = [best_of(m) for m in grid.control]
    for family, arms in grid.families.items():
        tests = []
        for arm in arms:
            for config in study.strides:
                best = _arm_test((best_dir, q_best), [best_of(m) for m in arm.models], (best_dir, q_best),
                                 control_best, config, study)
                seeds = common_seeds(q_best, [(best_of(m), config) for m in (*arm.models, *grid.control)])
                final = _arm_test((final_dir, q_final), arm.models, (final_dir, q_final), grid.control, config,
                                  study, seeds=seeds)
                tests.append({"family": _family_name(family), "arm": arm.label, "config": config, "kind": "superiority",
                              "endpoint": study.primary_endpoint, **best, "final_estimate": final["estimate"],
                              "final_lo": final["lo"], "final_hi": final["hi"],
                              "change": best["estimate"] - final["estimate"],
                              "best_steps": "; ".join(str(steps.get(m, "?")) for m in arm.models)})
        rows += adjust_family(tests, study)
    return pd.DataFrame(rows, columns=GRID_SENSITIVITY_COLUMNS)


@dataclass
class GridTables:
    """The grid's derived tables over every backbone that declares one (empty frames where nothing ran)."""

    contrasts: pd.DataFrame
    secondary: pd.DataFrame
    selections: pd.DataFrame
    sensitivity: pd.DataFrame
    notes: list[str]


def grid_tables(root: str | Path, backbones: Sequence[Backbone]) -> GridTables | None:
    """:class:`GridTables` of the backbones with a study and a grid (``backbone`` column added);
    None when none declares a grid. A grid whose sweep has not run yields its notes and the
    selections of the fine-tunes that finished."""
    root = Path(root)
    declared = [b for b in backbones if b.study is not None and b.grid is not None]
    if not declared:
        return None
    parts: dict[str, list[pd.DataFrame]] = {"contrasts": [], "secondary": [], "selections": [], "sensitivity": []}
    notes: list[str] = []
    for b in declared:
        grid, study = b.grid, b.study
        assert grid is not None and study is not None
        selections = early_stopping_selections(root, b.experiment, grid)
        parts["selections"].append(selections.assign(backbone=b.name))
        sweep_dir = result_dir(root, b.experiment, "sweep", grid.run)
        if not (sweep_dir / contract.QUALITY).is_file() or not (sweep_dir / contract.FIDELITY).is_file():
            notes.append(f"{b.name}: the grid's sweep {sweep_dir} has not run ({len(selections)} of "
                         f"{len(grid.fine_tunes)} grid fine-tunes finished)")
            continue
        quality = pd.read_csv(sweep_dir / contract.QUALITY)
        reference_dir = result_dir(root, b.experiment, "sweep", grid.reference_run or grid.run)
        parts["contrasts"].append(grid_contrasts(sweep_dir, quality, grid, study, reference_dir)
                                  .assign(backbone=b.name, experiment=b.experiment))
        fd_inf = None
        if (sweep_dir / "reference").is_dir():
            arms = [*grid.control, *(m for a in grid.arms for m in a.models),
                    *(grid.reference.models if grid.reference else ())]
            fd_inf = fd_infinity_table(sweep_dir, quality, [m for m in arms if m in set(quality["model"].astype(str))])
        parts["secondary"].append(grid_secondary(sweep_dir, quality, grid, study, fd_inf).assign(backbone=b.name))
        if grid.best_run is not None:
            best_dir = result_dir(root, b.experiment, "sweep", grid.best_run)
            if (best_dir / contract.QUALITY).is_file() and (best_dir / contract.FIDELITY).is_file():
                parts["sensitivity"].append(grid_sensitivity(best_dir, sweep_dir, grid, study, selections)
                                            .assign(backbone=b.name))
            else:
                notes.append(f"{b.name}: the best-step sweep {best_dir} has not run (no sensitivity analysis yet)")
    columns = {"contrasts": [*CONTRAST_COLUMNS, "backbone", "experiment"],
               "secondary": [*GRID_SECONDARY_COLUMNS, "backbone"], "selections": [*SELECTION_COLUMNS, "backbone"],
               "sensitivity": [*GRID_SENSITIVITY_COLUMNS, "backbone"]}
    joined = {k: pd.concat(v, ignore_index=True) if v else pd.DataFrame(columns=columns[k]) for k, v in parts.items()}
    return GridTables(notes=notes, **joined)
