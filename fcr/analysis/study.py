"""The study's derived tables: the pre-registered contrasts of every backbone whose experiment has a
``study`` in its manifest (:mod:`fcr.analysis.contrasts`), each model's safe stride, FD∞, and the
exploratory families (fine-tune length, ablations, the few-step sampler, the sensitive regime) and
criterion c's difference in differences. :func:`fcr.analysis.run.analyze` writes them; the report
(:mod:`fcr.report.study`) formats them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from fcr import contract
from fcr.analysis.contrasts import (
    common_seeds,
    evaluate_contrasts,
    fd_infinity_table,
    length_contrasts,
    noninferiority,
    safe_strides,
    select_lambda,
    variant_contrasts,
)
from fcr.analysis.rows import result_dir
from fcr.stats import holm
from fcr.analysis.stress import STRESS_DID_COLUMNS, stress_did
from fcr.manifest import Backbone

__all__ = ["ablation_table", "few_steps_tables", "length_table", "regime_table", "stress_did_table", "stress_look",
           "study_tables"]


def _joined(frames: list[pd.DataFrame]) -> pd.DataFrame | None:
    """The frames as one table; None when there are none (the family was not declared)."""
    return pd.concat(frames, ignore_index=True) if frames else None


def _quality(folder: Path) -> pd.DataFrame | None:
    path = folder / contract.QUALITY
    return pd.read_csv(path) if path.is_file() else None


def study_tables(root: str | Path, backbones: Sequence[Backbone], *, fd_inf: bool = True
                 ) -> tuple[pd.DataFrame, pd.DataFrame, list[str], pd.DataFrame]:
    """(contrasts, safe strides, notes, FD∞ per model x configuration) over the backbones with a
    study; a backbone whose sweep (or selection run) has not been run is named in the notes instead.
    ``fd_inf`` False: FD∞ is not computed (the contrasts do not read it; the stopping rule's gate)."""
    root = Path(root)
    contrasts, safe, notes, fd_infs = [], [], [], []
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
            if fd_inf:
                fd_infs.append(fd_infinity_table(sweep_dir, quality, models).assign(backbone=b.name))
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
    return join(contrasts), join(safe), notes, join(fd_infs)


def _train_steps(root: Path, experiment: str, model: str) -> int | None:
    import yaml

    path = root / experiment / model / contract.RUN_PARAMS
    return int(yaml.safe_load(path.read_text())["max_train_steps"]) if path.is_file() else None


def length_table(root: str | Path, backbones: Sequence[Backbone]) -> pd.DataFrame | None:
    """Fidelity vs fine-tune length (``length_run`` of a backbone with a study): the study's primary
    test at every length, the study's own first FCR / control pair as the shortest point; None when
    no backbone declares a length run."""
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
    return _joined(frames)


def ablation_table(root: str | Path, backbones: Sequence[Backbone]) -> pd.DataFrame | None:
    """FCR ablations (``ablation_run`` of a backbone with a study, e.g. Δ_max 20): each ablated FCR
    model against the backbone's control as sampled in its sweep run, and the backbone's first FCR
    model beside it, all one exploratory Holm family; None when no backbone declares ablations."""
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
    return _joined(frames)


def few_steps_tables(root: str | Path, backbones: Sequence[Backbone]) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The few-step sampler regime (``few_steps_run`` of a backbone with a study, e.g. 25-step DDIM):
    FCR (the first FCR model) vs the λ = 0 control on the primary endpoint at every uniform stride
    above 1 that run sampled (one exploratory Holm family) and each model's safe stride against its
    own FD-5 there; (None, None) where nothing was declared or sampled."""
    root = Path(root)
    contrasts, strides = [], []
    for b in backbones:
        if b.study is None or b.few_steps_run is None or not b.fcr_models or not b.control:
            continue
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
    strides = [t for t in strides if not t.empty]
    return _joined(contrasts), (pd.concat(strides, ignore_index=True) if strides else None)


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


def regime_table(root: str | Path, backbones: Sequence[Backbone]) -> pd.DataFrame | None:
    """The sensitive regime on the frontier sweep (``frontier_run`` of a backbone with a study; strides
    to 25 and Faster Diffusion's non-uniform ``FD-50ls``): every model's safe stride against its own
    FD-5 (:func:`fcr.analysis.contrasts.safe_strides`) and, for each model that ran ``FD-50ls``, its
    non-inferiority to its FD-5 (both margins; Holm over those models); ``stride`` 0 marks the
    FD-50ls row. None without a frontier sweep."""
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
        return None
    return pd.concat(frames, ignore_index=True)
