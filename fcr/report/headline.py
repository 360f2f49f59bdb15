"""The headline frontier: the points of every frontier run (notebook 06) of one original model on one
figure, so the cache-aware arms (exp-3) stand beside the training-free, fine-tuned and distilled peers
(exp-1). Reads the runs' tables; computes only the Pareto front over their union.

The runs share the endpoint (fidelity to the original's full sampling of the same prompt and noise) and
the cost axis; their image sets may differ in size (each point's ``n_images`` and ``source`` say which
run it came from). A model x configuration that several runs sampled is kept from the first run.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fcr import contract, plots
from fcr.analysis.rows import LAYOUT
from fcr.stats import pareto_mask

__all__ = ["combined_points", "headline_figure"]


def _run_points(folder: Path) -> pd.DataFrame:
    """A frontier run's points: the pooled table (a cache-aware arm's runs as one point) where written."""
    pooled = folder / contract.FRONTIER_ARMS
    return pd.read_csv(pooled if pooled.is_file() else folder / contract.FRONTIER)


def combined_points(root: str | Path, cost_column: str = "flops_per_image", endpoint: str = "psnr") -> pd.DataFrame:
    """Every frontier run under ``root`` (``exp-*/frontier/<run>/``) whose original (its reference
    point's model) is the first run's and which has both axes, as one table with ``source`` (the run
    folder) and ``pareto`` recomputed over all of them; empty when no run qualifies."""
    frames, original = [], None
    for path in sorted(Path(root).glob(f"exp-*/{LAYOUT['frontier']}/*/{contract.FRONTIER}")):
        points = _run_points(path.parent)
        if not {cost_column, endpoint, "model", "config", "is_reference"} <= set(points.columns):
            continue
        reference = points.loc[points["is_reference"].astype(bool), "model"]
        run_original = str(reference.iloc[0]) if len(reference) else None
        original = original or run_original
        if run_original != original:
            continue  # another original (e.g. base-v): its fidelity has another reference
        frames.append(points.assign(source=path.parent.relative_to(root).as_posix()))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True).drop_duplicates(["model", "config"], keep="first")
    table = table.reset_index(drop=True)
    table["pareto"] = pareto_mask(table[cost_column], table[endpoint], contract.FIDELITY_DIRECTIONS[endpoint] > 0)
    return table


def headline_figure(root: str | Path, out_dir: str | Path, cost_column: str = "flops_per_image",
                    endpoint: str = "psnr") -> Path | None:
    """Draw :func:`combined_points` (one panel per approach) into ``out_dir/figures``; None when no
    frontier run exists."""
    points = combined_points(root, cost_column, endpoint)
    if points.empty:
        return None
    original = str(points.loc[points["is_reference"].astype(bool), "model"].iloc[0])
    fig = plots.frontier(points, cost_column, endpoint, ylabel=f"{endpoint} to {original}'s full sampling",
                         higher_is_better=contract.FIDELITY_DIRECTIONS[endpoint] > 0, facet="approach",
                         facet_order=contract.APPROACHES)
    path = plots.save_figure(fig, Path(out_dir) / "figures" / contract.HEADLINE_FRONTIER)
    plots.plt.close(fig)
    return path
