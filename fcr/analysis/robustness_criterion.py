"""Criterion c: the quality drop under stress with FCR is no larger than the original model's."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fcr import contract
from fcr.analysis.rows import (
    InputError,
    all_of,
    backbone_scope,
    bool_or_none,
    count_verdicts,
    fmt3,
    lookup_column,
    read_tables,
    verdict_row,
)
from fcr.manifest import Backbone

__all__ = [
    "C_DID_THRESHOLD",
    "C_NAME",
    "C_THRESHOLD",
    "criterion_c_rows",
    "robustness_rows",
    "stress_did_rows",
]

# ----------------------------------------------------------------------------- c. robustness

C_NAME = "c. robustness"
C_THRESHOLD = "quality drop with FCR ≤ drop of the original model, every stress and metric"


def robustness_rows(robustness_dirs: Sequence[str | Path], backbones: Sequence[Backbone]) -> list[dict]:
    """Criterion c's rows (verdict columns) for the notebook-04 result folders given: the main
    job's for the verdict, or e.g. a supplementary run with more seeds."""
    try:
        df, path = read_tables([Path(d) for d in robustness_dirs], contract.CRITERION)
        ocol = lookup_column(df, "criterion", "original_model", path)
        fcol = lookup_column(df, "criterion", "fcr_model", path)
        scol = lookup_column(df, "criterion", "stress", path)
        mcol = lookup_column(df, "criterion", "metric", path, required=False)
        pcol = lookup_column(df, "criterion", "passed", path, required=False)
        d_f = lookup_column(df, "criterion", "drop_fcr", path, required=pcol is None)
        d_o = lookup_column(df, "criterion", "drop_original", path, required=pcol is None)
    except InputError as exc:
        return [verdict_row(C_NAME, "all backbones", "n/a", C_THRESHOLD, None, str(exc))]
    if df.empty:
        return [verdict_row(C_NAME, "all backbones", "n/a", C_THRESHOLD, None, f"{path} has no rows")]
    df = df[df[scol].astype(str) != "none"]  # the unstressed reference has no drop
    controls = ""
    if "lambda_fcr" in df.columns:  # the λ = 0 control is no FCR model: the seed's test is about FCR
        is_fcr = pd.to_numeric(df["lambda_fcr"], errors="coerce").fillna(1.0) > 0
        if (~is_fcr).any():
            controls = f" λ = 0 control rows left out: {', '.join(sorted(set(map(str, df.loc[~is_fcr, fcol]))))}."
        df = df[is_fcr]
    rows, verdicts = [], []
    known = {b.name: b for b in backbones}
    for original, group in df.groupby(ocol, sort=False):
        if pcol is not None:
            flags = [bool_or_none(v) for v in group[pcol]]
            source = f"'{pcol}' column of criterion.csv"
        else:
            flags = [bool(f <= o) if math.isfinite(f) and math.isfinite(o) else None
                     for f, o in zip(group[d_f].astype(float), group[d_o].astype(float))]
            source = "drop_fcr ≤ drop_original"
        ok = all_of(flags)
        verdicts.append(ok)
        n_pass = sum(v is True for v in flags)
        measured = count_verdicts(flags, "stress × metric pairs")
        margin = (group[d_f].astype(float) - group[d_o].astype(float)) if d_f and d_o else pd.Series(dtype=float)
        if margin.notna().any():
            worst = group.loc[margin.idxmax()]
            measured += (f"; worst: {worst[scol]}" + (f" / {worst[mcol]}" if mcol else "")
                         + f" drop {fmt3(float(worst[d_f]))} (FCR) vs {fmt3(float(worst[d_o]))} (original)")
        ccol = lookup_column(group, "criterion", "config", path, required=False)
        failing = [f"{r[scol]}" + (f"/{r[mcol]}" if mcol else "") + (f" at {r[ccol]}" if ccol else "")
                   for (_, r), v in zip(group.iterrows(), flags) if v is False]
        note = f"Pass/fail from the {source}; FCR model(s): {', '.join(sorted(set(map(str, group[fcol]))))}."
        if failing:
            note += f" Failing: {', '.join(failing)}."
        note += controls
        scope = backbone_scope(known[original]) if original in known else str(original)
        rows.append(verdict_row(C_NAME, scope, measured, C_THRESHOLD, ok, note, kind="part", value=n_pass / len(flags)))
    absent = [b.name for b in backbones if b.name not in set(df[ocol].astype(str))]
    note = "AND over the backbones in criterion.csv (notebook 04)."
    if absent:
        note += f" Not stress-tested (no rows): {', '.join(absent)}."
    rows.insert(0, verdict_row(C_NAME, "all stress-tested backbones", count_verdicts(verdicts, "backbones"),
                        C_THRESHOLD, all_of(verdicts), note))
    return rows


# ----------------------------------------------------------------------------- c as a difference in differences

DID_NAME = f"{C_NAME} (difference in differences, additional analysis)"
C_DID_THRESHOLD = "FCR's drop in caching fidelity under stress ≤ the original's + margin, every stress (after Holm)"


def stress_did_rows(table: pd.DataFrame, backbones: Sequence[Backbone]) -> list[dict]:
    """Criterion c of the backbones in ``table`` (:func:`fcr.report.study.stress_did_table`): a
    criterion row per backbone from its "FCR vs original" rows (pass: every stress non-inferior
    after Holm; FAIL: any interval above the margin; else n/a, not established; n/a too while the
    robustness run holds fewer seeds than it declares, an interim look), and a context row for "FCR
    vs control" (what FCR itself changes)."""
    rows = []
    known = {b.name: b for b in backbones}
    for name, group in table.groupby("backbone", sort=False):
        scope = backbone_scope(known[name]) if name in known else str(name)
        for comparison, part in group.groupby("comparison", sort=False):
            decisions = part["decision"].astype(str)
            flags = [True if d.startswith("no larger drop") else False if d == "larger drop" else None
                     for d in decisions]
            look = str(part["look"].iloc[0]) if "look" in part else "final"
            ok = all_of(flags) if look == "final" else None  # an interim look decides nothing
            worst = part.loc[part["estimate"].astype(float).idxmax()]
            measured = (f"{sum(f is True for f in flags)} of {len(flags)} stresses non-inferior; worst: "
                        f"{worst['stress']} at {worst['config']} DiD {fmt3(float(worst['estimate']))} "
                        f"[{fmt3(float(worst['lo']))}, {fmt3(float(worst['hi']))}] {part['endpoint'].iloc[0]} "
                        f"(margin {fmt3(float(worst['margin']))})")
            if look != "final":
                measured += f"; {look}, not decided"
            undetermined = [f"{r.stress} at {r.config} ({r.decision}; MDE {fmt3(float(r.mde))})"
                            for r in part.itertuples() if r.decision.startswith("not established")]
            note = (f"{comparison}: per image, FCR's drop (mean over {int(part['n_runs'].iloc[0])} training run(s)) minus "
                    f"the comparator's ({worst['vs_model']}), n = {int(part['n'].max())} prompt/noise pairs, Holm over "
                    f"{int(part['m_tests'].iloc[0])} tests.")
            if undetermined:
                note += " Not established: " + "; ".join(undetermined) + "."
            kind = "criterion" if comparison == "FCR vs original" else "context"
            rows.append(verdict_row(C_NAME if kind == "criterion" else f"{C_NAME} (vs λ = 0 control)", scope, measured,
                                    C_DID_THRESHOLD, ok if kind == "criterion" else None, note, kind=kind,
                                    value=float(worst["estimate"])))
    return rows


def criterion_c_rows(robustness_dirs: Sequence[str | Path], backbones: Sequence[Backbone],
                     stress_did: pd.DataFrame | None = None) -> list[dict]:
    """Criterion c by the seed's definition (:func:`robustness_rows`: FCR's drop under each stress ≤
    the original's); where a study tested it, the difference in differences (:func:`stress_did_rows`)
    follows as context rows: an additional analysis that decides nothing."""
    seed_rows = robustness_rows(robustness_dirs, backbones)
    if stress_did is None or stress_did.empty:
        return seed_rows
    # The seed's definition stays the criterion; the difference in differences is an additional
    # analysis shown beside it (context), never a replacement for the seed's test.
    did = [{**r, "kind": "context", "passed": r["passed"] if r["kind"] == "criterion" else None,
            "criterion": DID_NAME if r["criterion"] == C_NAME else r["criterion"].replace(C_NAME, DID_NAME)}
           for r in stress_did_rows(stress_did, backbones)]
    return seed_rows + did
