"""What every criterion of the verdict shares: thresholds, the results layout, readers of result
files that name what is missing, and the formatting of verdict rows."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fcr.contract import COLUMNS, PRODUCERS
from fcr.manifest import Backbone

__all__ = [
    "EXP1",
    "EXP2",
    "LAYOUT",
    "robustness_dirs",
    "SD_PRETRAINING",
    "THRESHOLDS",
    "VERDICT_COLUMNS",
    "InputError",
    "all_of",
    "backbone_scope",
    "bool_or_none",
    "count_verdicts",
    "fmt3",
    "fmt_pct",
    "format_number",
    "lookup_column",
    "markdown_table",
    "producer",
    "read_derived",
    "read_json",
    "read_optional",
    "read_table",
    "read_tables",
    "result_dir",
    "summary_value",
    "sweep_dir",
    "verdict_row",
]

# ----------------------------------------------------------------------------- configuration

THRESHOLDS: dict[str, float] = {
    "fd_increase_pct": 5.0,  # a: ΔFD ≤ +5 % vs FD-5 of the original model
    "accuracy_change_pct": -2.0,  # a: Δ class accuracy ≥ −2 % (relative)
    "speedup": 1.4,  # b: ≥ 1.4× vs FD-5
    "memory_increase_pct": 2.0,  # b: ≤ 2 % extra peak memory
    "variance_reduction_pct": 30.0,  # e: encoder-feature variance reduced by ≥ 30 %
    "r2": 0.6,  # e: R² ≥ 0.6
    "overhead_pct": 3.0,  # f: fine-tune compute ≤ 3 % of pre-training compute
}

EXP1 = "exp-1-main-ablation"
EXP2 = "exp-2-generalisation-robustness"

# Sub-folders of an experiment folder and which stage writes them (for the missing-file notes).
LAYOUT: dict[str, str] = {"sweep": "sweep", "robustness": "robustness", "mechanistic": "mechanistic",
                          "frontier": "frontier", "run": "main"}
VERDICT_COLUMNS = ["criterion", "scope", "kind", "measured", "value", "threshold", "passed", "note"]

# Published pre-training compute of Stable Diffusion v1, as stated by its model card (section
# "Environmental Impact", "Stable Diffusion v1 Estimated Emissions"; the same text is in the cards of
# CompVis/stable-diffusion-v1-4 and runwayml/stable-diffusion-v1-5 on Hugging Face).
SD_PRETRAINING: dict[str, Any] = {
    "hardware": "A100 PCIe 40GB",
    "gpu_hours": 150_000.0,
    "source": "Stable Diffusion v1 model card (CompVis/stable-diffusion-v1-4, runwayml/stable-diffusion-v1-5), "
    "'Environmental Impact': Hardware Type A100 PCIe 40GB, Hours used 150000",
}


class InputError(RuntimeError):
    """A result file, column or row the verdict needs is missing (the message names it)."""


# ----------------------------------------------------------------------------- readers


def producer(path: Path) -> str:
    return PRODUCERS.get(path.name, "the pipeline stage that writes it")


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV result table; a missing file raises :class:`InputError` naming the stage that writes it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"missing {path}: it is written by {producer(path)}")
    return pd.read_csv(path)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"missing {path}: it is written by {producer(path)}")
    return json.loads(path.read_text())


def lookup_column(df: pd.DataFrame | Mapping[str, Any], table: str, logical: str, path: str | Path,
                  required: bool = True) -> str | None:
    """The actual column of ``df`` for ``logical`` (see :data:`COLUMNS`); raises :class:`InputError`
    naming the file and the missing column when ``required``, else returns None."""
    names = COLUMNS[table][logical]
    present = list(df.columns) if isinstance(df, pd.DataFrame) else list(df)
    for name in names:
        if name in present:
            return name
    if required:
        raise InputError(f"{path}: no column for {logical!r} (expected one of {list(names)}; present: {present})")
    return None


def summary_value(summary: pd.DataFrame, path: Path, model: str, config: str, logical: str) -> float:
    col = lookup_column(summary, "summary", logical, path)
    mcol, ccol = lookup_column(summary, "summary", "model", path), lookup_column(summary, "summary", "config", path)
    rows = summary[(summary[mcol].astype(str) == model) & (summary[ccol].astype(str) == config)]
    if rows.empty:
        raise InputError(f"{path}: no row for model {model!r} at config {config!r} (notebook 03 did not sweep it)")
    value = float(rows[col].iloc[0])
    if not math.isfinite(value):
        raise InputError(f"{path}: {col} of {model!r} at {config!r} is not a number")
    return value


# ----------------------------------------------------------------------------- small helpers


def all_of(values: Iterable[bool | None]) -> bool | None:
    """Three-valued AND: False if any is False, else None if any is None (or there are none), else True."""
    vals = list(values)
    if any(v is False for v in vals):
        return False
    if not vals or any(v is None for v in vals):
        return None
    return True


def count_verdicts(verdicts: Sequence[bool | None], what: str = "") -> str:
    """``'2 pass, 1 FAIL, 1 n/a of 4 <what>'`` (zero counts left out)."""
    n_pass = sum(v is True for v in verdicts)
    n_fail = sum(v is False for v in verdicts)
    n_na = len(verdicts) - n_pass - n_fail
    parts = [f"{n_pass} pass"] + ([f"{n_fail} FAIL"] if n_fail else []) + ([f"{n_na} n/a"] if n_na else [])
    return f"{', '.join(parts)} of {len(verdicts)}" + (f" {what}" if what else "")


def fmt3(x: float | None) -> str:
    """3 significant digits (``n/a`` for None / nan)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.3g}"


def fmt_pct(x: float) -> str:
    return f"{x:+.3g} %"


def verdict_row(criterion: str, scope: str, measured: str, threshold: str, passed: bool | None, note: str = "",
         kind: str = "criterion", value: float | None = None) -> dict[str, Any]:
    return {"criterion": criterion, "scope": scope, "kind": kind, "measured": measured,
            "value": float("nan") if value is None else float(value), "threshold": threshold,
            "passed": passed, "note": note}


def bool_or_none(x: Any) -> bool | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if isinstance(x, str):
        low = x.strip().lower()
        return True if low == "true" else False if low == "false" else None
    return bool(x)


def result_dir(root: str | Path, experiment: str, kind: str, run: str | None = None) -> Path:
    """Results folder of a notebook kind (``sweep``, ``robustness``, ``mechanistic``) in an experiment:
    ``<root>/<experiment>/<kind>/<run>/`` (run ``main`` by default) when it exists, else
    ``<root>/<experiment>/<kind>/`` when that holds result files itself, else the expected
    ``<kind>/<run>/`` (so a missing-file message names where the pipeline writes)."""
    base = Path(root) / experiment / LAYOUT.get(kind, kind)
    with_run = base / (run or LAYOUT["run"])
    if with_run.is_dir():
        return with_run
    if base.is_dir() and any(p.suffix in (".csv", ".json") for p in base.iterdir()):
        return base
    return with_run


def sweep_dir(root: Path, backbone: Backbone) -> Path:
    return result_dir(root, backbone.experiment, "sweep", backbone.sweep_run)


def backbone_scope(b: Backbone) -> str:
    return f"{b.name} ({b.role})"


def read_tables(folders: Sequence[Path], name: str) -> tuple[pd.DataFrame, str]:
    """``name`` from every folder that has it, concatenated, and a description of where it came from;
    :class:`InputError` naming every expected path when none has it."""
    paths = [Path(f) / name for f in folders]
    present = [p for p in paths if p.is_file()]
    if not present:
        where = " and ".join(map(str, paths)) or name
        raise InputError(f"missing {where}: written by {PRODUCERS.get(name, 'the pipeline')}")
    frames = [pd.read_csv(p) for p in present]
    return pd.concat(frames, ignore_index=True), " + ".join(map(str, present))


# ----------------------------------------------------------------------------- markdown


def format_number(x: Any) -> str:
    """3 significant digits; ``n/a`` for missing values."""
    if x is None:
        return "n/a"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "n/a" if not math.isfinite(v) else f"{v:.3g}"


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of ``df`` as it is (cells already formatted)."""
    if df.empty:
        return "_(no rows)_\n"
    cols = [str(c) for c in df.columns]

    def cell(x: Any) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return ""
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def robustness_dirs(root: Path, backbones: Sequence[Backbone]) -> list[Path]:
    """The notebook-04 result folders of the backbones' robustness runs (the verdict's)."""
    return list(dict.fromkeys(result_dir(root, b.experiment, "robustness", b.robustness_run)
                              for b in backbones if b.robustness_run is not None))


def read_derived(path: Path) -> pd.DataFrame:
    """A table the analysis wrote, as it wrote it: only empty cells are missing (words such as
    ``n/a`` in a verdict's ``measured`` stay words); an empty file is an empty table."""
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def read_optional(path: Path) -> pd.DataFrame | None:
    """:func:`read_derived`, None when the analysis did not write the table."""
    return read_derived(path) if path.is_file() else None
