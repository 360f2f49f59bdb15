"""Criterion c: the quality drop under stress with FCR is no larger than the original model's."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fcr import contract
from fcr.manifest import Backbone
from fcr.report.rows import (
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

__all__ = [
    "C_NAME",
    "C_THRESHOLD",
    "robustness_rows",
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
        scope = backbone_scope(known[original]) if original in known else str(original)
        rows.append(verdict_row(C_NAME, scope, measured, C_THRESHOLD, ok, note, kind="part", value=n_pass / len(flags)))
    absent = [b.name for b in backbones if b.name not in set(df[ocol].astype(str))]
    note = "AND over the backbones in criterion.csv (notebook 04)."
    if absent:
        note += f" Not stress-tested (no rows): {', '.join(absent)}."
    rows.insert(0, verdict_row(C_NAME, "all stress-tested backbones", count_verdicts(verdicts, "backbones"),
                        C_THRESHOLD, all_of(verdicts), note))
    return rows
