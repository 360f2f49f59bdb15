"""The seed's experimental angle B (human A/B preference, significance @ 95 % CI) as a verdict
context row: read from notebook 07's ``verdict.csv`` when it exists, n/a otherwise. It never feeds
the overall verdict (it is not one of the success criteria a–f)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fcr.analysis.rows import bool_or_none, verdict_row
from fcr.paths import REPO_ROOT, display_path

__all__ = ["DEFAULT_HUMAN_ANALYSIS", "human_preference_rows"]

DEFAULT_HUMAN_ANALYSIS = REPO_ROOT / "outputs" / "human" / "analysis"
CRITERION = "B. human preference (A/B, significance @ 95 % CI)"


def human_preference_rows(analysis_dir: str | Path | None = DEFAULT_HUMAN_ANALYSIS) -> list[dict]:
    path = Path(analysis_dir) / "verdict.csv" if analysis_dir is not None else None
    if path is None or not path.is_file():
        return [verdict_row(CRITERION, "A/B pair set", "n/a", "95 % Wilson interval of the win rate excludes 0.5",
                            None, "n/a: no ratings yet (collect them with `make rate` or the MTurk export, then run "
                            "notebook 07)", kind="context")]
    row = pd.read_csv(path, keep_default_na=False).iloc[0]
    value = float(row["value"]) if str(row["value"]).strip() else None
    return [verdict_row(CRITERION, str(row["scope"]), str(row["measured"]), str(row["threshold"]),
                        bool_or_none(row["passed"] if str(row["passed"]).strip() else None),
                        f"{row['note']} ({display_path(path)})", kind="context", value=value)]
