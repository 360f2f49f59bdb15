"""The seed's stopping rule as a gate: "if any candidate fails Quality Preservation, it is excluded
from later phases". A candidate is an FCR fine-tune of a backbone whose study sets
``stopping_rule``; it passes when the study's secondary family (the seed's margins against the
original's FD-5, Holm; :mod:`fcr.analysis.contrasts`) shows it non-inferior on both endpoints at
the stride of criterion a. A training replicate stands or falls with the fine-tune tested for it.
A candidate the study did not test is kept and logged as not evaluated: the rule excludes a
candidate that fails, and there is no evidence either way.

The pipeline writes the gate's log after the phase-1 sweep and drops excluded candidates from the
later phases' model lists (robustness, the frontier); the log names each one and why.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from fcr import contract
from fcr.analysis.rows import format_number
from fcr.manifest import Backbone

__all__ = ["GATE_COLUMNS", "candidates", "excluded_models", "gated_backbones", "quality_gate", "write_gate"]

GATE_COLUMNS = ["backbone", "candidate", "tested_as", "config", "passed", "action", "reason"]
CRITERION_A_CONFIG = "FD-10"  # the seed: "for stride 10"


def gated_backbones(backbones: Iterable[Backbone]) -> list[Backbone]:
    """The backbones whose study applies the stopping rule."""
    return [b for b in backbones if b.study is not None and b.study.stopping_rule]


def candidates(b: Backbone) -> dict[str, str]:
    """{candidate: the fine-tune whose criterion-a test stands for it}: the backbone's FCR models,
    their training replicates (standing for the model they replicate) and its FCR-deep models."""
    out: dict[str, str] = {}
    for model in (*b.fcr_models.values(), *b.fcr_deep_models.values()):
        out[model] = model
        out.update({replicate: model for replicate in b.replicates.get(model, ())})
    return out


def _describe(r: pd.Series) -> str:
    return (f"{r['endpoint']} {format_number(r['estimate'])} [{format_number(r['lo'])}, {format_number(r['hi'])}] "
            f"margin {format_number(r['margin'])}: {r['decision']}")


def quality_gate(contrasts: pd.DataFrame, backbones: Sequence[Backbone], config: str = CRITERION_A_CONFIG
                 ) -> pd.DataFrame:
    """One :data:`GATE_COLUMNS` row per candidate of every gated backbone: ``passed`` (None: not
    evaluated), ``action`` (kept / excluded) and the decisions of its secondary tests at ``config``."""
    rows = []
    secondary = contrasts[contrasts["family"] == "secondary"] if not contrasts.empty else contrasts
    for b in gated_backbones(backbones):
        for candidate, tested_as in candidates(b).items():
            tests = (secondary[(secondary["backbone"] == b.name) & (secondary["model"] == tested_as)
                               & (secondary["config"] == config)] if not secondary.empty else secondary)
            if tests.empty:
                rows.append({"backbone": b.name, "candidate": candidate, "tested_as": tested_as, "config": config,
                             "passed": None, "action": "kept",
                             "reason": f"criterion a not evaluated for {tested_as} at {config} (no secondary test)"})
                continue
            passed = bool((tests["decision"] == "non-inferior").all())
            rows.append({"backbone": b.name, "candidate": candidate, "tested_as": tested_as, "config": config,
                         "passed": passed, "action": "kept" if passed else "excluded",
                         "reason": "; ".join(_describe(r) for _, r in tests.iterrows())})
    return pd.DataFrame(rows, columns=GATE_COLUMNS)


def write_gate(root: str | Path, backbones: Sequence[Backbone], out_dir: str | Path,
               config: str = CRITERION_A_CONFIG) -> pd.DataFrame:
    """Evaluate the study's contrasts of the gated backbones (as the report does) and write the
    gate's log (``stopping_rule.csv``) into ``out_dir``; returns the log."""
    from fcr.analysis.study import study_tables

    gated = gated_backbones(backbones)
    contrasts = study_tables(root, gated, fd_inf=False)[0]
    table = quality_gate(contrasts, gated, config)
    out = Path(out_dir) / contract.STOPPING_RULE
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    return table


def excluded_models(gate_log: str | Path) -> set[str]:
    """The candidates the gate's log excludes (empty when it has not been written)."""
    path = Path(gate_log)
    if not path.is_file():
        return set()
    table = pd.read_csv(path)
    return set(table.loc[table["action"] == "excluded", "candidate"].astype(str))
