"""fcr.plots: figures the notebooks share (layout only; no numbers are checked here)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from fcr import plots


def _summary(reference_configs: int) -> pd.DataFrame:
    """A stride table: two models on full / FD-s lines plus ``reference_configs`` horizontal-line configurations."""
    rows = [{"model": m, "config": "full" if s == 1 else f"FD-{s}", "stride": s, "psnr": 30.0 - s + i}
            for i, m in enumerate(["base", "student"]) for s in (1, 5, 10)]
    rows += [{"model": "student", "config": f"PD-{k}", "stride": np.nan, "psnr": 20.0 + k} for k in range(reference_configs)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("references", [3, plots.MAX_REFERENCE_LABELS + 30])
def test_stride_plot_draws_every_reference_configuration(references: int) -> None:
    fig = plots.quality_vs_stride(_summary(references), "psnr")
    try:
        ax = fig.axes[0]
        horizontal = [line for line in ax.get_lines() if len(set(line.get_ydata())) == 1 and len(line.get_xdata()) == 2]
        assert len(horizontal) == references  # one line per reference configuration (one model each here)
        labels = ax.get_legend_handles_labels()[1]
        named = [label for label in labels if label.startswith("PD-")]
        if references <= plots.MAX_REFERENCE_LABELS:
            assert len(named) == references and ax.get_title() == ""
        else:  # too many to tell apart by line style: counted in the title instead of the legend
            assert named == [] and str(references) in ax.get_title()
    finally:
        plt.close(fig)
