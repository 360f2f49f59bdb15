"""The main job's reproduction table: each metric of this run's report tables beside the committed
reference run's (``outputs/reference/demo``), with the tolerance expected and whether it holds.

Tolerances, fixed before any comparison (docs: README "Reproducing"):

- ``exact``: FLOPs per image, counted by torch's flop counter on the architecture: the same on
  every machine, so any difference is a change of code or parameters.
- ``ci``: quality metrics and contrasts with a 95 % interval: |this run − reference| ≤ the
  reference interval's half-width. The demo is deterministic on CPU for a seed: on the same CPU
  model with the same torch threads it reproduces bit for bit (difference 0). Another CPU (other
  SIMD kernels, other thread counts, other BLAS) rounds differently; fine-tuning amplifies that
  over hundreds of steps, so the run is a fresh draw of the training noise, and agreement within
  the reference's sampling uncertainty is what a reproduction can promise.
- ``shown``: wall times and speed-ups measured in seconds (they depend on the machine and its
  load) and values without an interval: listed, not judged.

Reads tables only (pandas); no torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from fcr import contract
from fcr.markers import stage_times

__all__ = ["COMPARED", "comparable", "reproduction_table", "reproduction_section"]

# table -> (key columns, {metric: rule}); a metric's interval is <metric>_lo / <metric>_hi.
_EXP_METRICS = {"fd": "ci", "class_accuracy": "ci", "fid": "ci", "clip_score": "ci", "kid": "ci", "is": "ci",
                "flops_per_image": "exact", "flops_speedup": "exact", "bound_flops_speedup": "exact",
                "time_per_image_s_bs1": "shown", "time_speedup_bs1": "shown", "paired_mean_diff": "shown"}
COMPARED: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "exp1_table.csv": (("variation", "model", "config"), _EXP_METRICS),
    "exp2_table.csv": (("variation", "model", "config"), _EXP_METRICS),
    contract.CONTRASTS: (("family", "contrast", "endpoint", "config"), {"estimate": "ci"}),
    contract.SAFE_STRIDES: (("model", "stride"), {"fd_increase_pct": "ci", "alignment_change_pct": "ci",
                                                  "safe_stride": "exact"}),
}
COLUMNS = ["table", "row", "metric", "this_run", "reference", "difference", "relative_difference", "tolerance",
           "rule", "within"]


def comparable(root: Path, reference: Path) -> list[str]:
    """Stages whose parameters differ between this run and the reference (empty: comparable)."""
    ours = {r["stage"]: r["fingerprint"] for r in stage_times(root) if r["stage"] != "report"}
    theirs = {r["stage"]: r["fingerprint"] for r in stage_times(reference) if r["stage"] != "report"}
    return sorted(s for s in set(ours) | set(theirs) if ours.get(s) != theirs.get(s))


def _number(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def reproduction_table(report_dir: Path, reference_report: Path) -> pd.DataFrame:
    """One row per table x row x metric present in both reports (see the module's rules)."""
    rows = []
    for name, (keys, metrics) in COMPARED.items():
        ours_path, theirs_path = report_dir / name, reference_report / name
        if not (ours_path.is_file() and theirs_path.is_file()):
            continue
        ours, theirs = pd.read_csv(ours_path), pd.read_csv(theirs_path)
        keys = [k for k in keys if k in ours.columns and k in theirs.columns]
        merged = ours.merge(theirs, on=keys, how="inner", suffixes=("", "__ref"))
        for _, row in merged.iterrows():
            label = " / ".join(str(row[k]) for k in keys)
            for metric, rule in metrics.items():
                if metric not in ours.columns or f"{metric}__ref" not in merged.columns:
                    continue
                mine, ref = _number(row[metric]), _number(row[f"{metric}__ref"])
                if math.isnan(mine) and math.isnan(ref):
                    continue
                diff = mine - ref
                tolerance = math.nan
                if rule == "exact":
                    tolerance = 0.0
                elif rule == "ci":
                    lo, hi = _number(row.get(f"{metric}_lo__ref")), _number(row.get(f"{metric}_hi__ref"))
                    tolerance = (hi - lo) / 2 if not (math.isnan(lo) or math.isnan(hi)) else math.nan
                judged = rule != "shown" and not math.isnan(tolerance)
                # float32 arithmetic behind an "exact" count: a relative 1e-9 is the same number.
                slack = 1e-9 * max(abs(ref), 1.0) if rule == "exact" else 0.0
                rows.append({"table": name, "row": label, "metric": metric, "this_run": mine, "reference": ref,
                             "difference": diff, "relative_difference": diff / abs(ref) if ref else math.nan,
                             "tolerance": tolerance, "rule": rule if judged else "shown",
                             "within": (abs(diff) <= tolerance + slack) if judged else None})
    return pd.DataFrame(rows, columns=COLUMNS)


def reproduction_section(root: Path, report_dir: Path, reference: Path) -> tuple[list[str], pd.DataFrame | None]:
    """Markdown lines for report.md and the table (None when the runs are not comparable)."""
    from fcr.analysis.rows import format_number, markdown_table
    from fcr.paths import display_path

    title = "### Reproduction: this run beside the committed reference"
    ref_report = reference / "report"
    if not ref_report.is_dir():
        return [title, "", f"_No reference at `{display_path(reference)}`._", ""], None
    differing = comparable(root, reference)
    if differing:
        return [title, "", f"_Not compared: this run's parameters differ from the reference's "
                f"(`{display_path(reference)}`) in {len(differing)} stage(s), e.g. `{differing[0]}`; a "
                "reproduction needs the same parameters (run `make main` without overlays)._", ""], None
    table = reproduction_table(report_dir, ref_report)
    judged = table[table["rule"] != "shown"]
    outside = judged[judged["within"] == False]  # noqa: E712 - object column of True/False/None
    lines = [title, "",
             f"Reference: `{display_path(reference)}` (same parameters, stage by stage). "
             f"**{len(judged) - len(outside)} of {len(judged)} judged values are within tolerance**; "
             f"{len(table) - len(judged)} more are shown only (wall times, values without an interval). "
             "Rules: `exact` (FLOP counts: machine-independent), `ci` (|difference| ≤ the reference's 95 % "
             "interval half-width: another CPU rounds differently and fine-tuning amplifies it, so the run is a "
             "fresh draw of the training noise; on the same CPU model and torch threads the demo is bit-identical). "
             f"Every row: `{display_path(report_dir / contract.REPRODUCTION)}`.", ""]
    shown = (outside if not outside.empty else judged).head(40)
    if not shown.empty:
        lines += ["Values outside tolerance:" if not outside.empty else "Judged values (first 40):", "",
                  markdown_table(shown.map(lambda x: format_number(x) if isinstance(x, float) else x)), ""]
    return lines, table
