"""The report's section on the ablation grid (issue #31): the grid's rows of the study's contrasts
table, a forest plot of every arm on one axis, the descriptive secondary endpoints, the step each
fine-tune's early stopping chose and the sensitivity analysis with those weights. Formats and draws
the tables :mod:`fcr.analysis.grid` wrote; computes nothing."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "ipympl")) else None
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from fcr import contract  # noqa: E402
from fcr.analysis.rows import format_number, markdown_table, read_optional  # noqa: E402

__all__ = ["GRID_PREFIX", "forest_plot", "grid_rows", "grid_section"]

GRID_PREFIX = "grid: "


def grid_rows(contrasts: pd.DataFrame) -> pd.DataFrame:
    """The grid's rows of the study's contrasts table (families ``grid: ...``)."""
    if contrasts.empty or "family" not in contrasts:
        return contrasts
    return contrasts[contrasts["family"].astype(str).str.startswith(GRID_PREFIX)]


def forest_plot(rows: pd.DataFrame, path: Path) -> Path:
    """Every arm's estimate with its 95 % CI on one axis per stride (arms top to bottom in table
    order, grouped by family; filled where Holm's adjusted p < 0.05), a line at no effect; saved
    as PNG at ``path``."""
    rows = rows[rows["n"] > 0].copy()
    rows["arm"] = rows["contrast"].str.replace(" vs λ=0 control", "", regex=False)
    rows["family"] = rows["family"].str.replace(GRID_PREFIX, "", regex=False)
    arms = list(dict.fromkeys(zip(rows["family"], rows["arm"])))
    configs = list(dict.fromkeys(rows["config"].astype(str)))
    palette = dict(zip(dict.fromkeys(f for f, _ in arms), sns.color_palette("colorblind")))
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 0.42 * len(arms) + 1.4), sharey=True,
                             squeeze=False)
    for ax, config in zip(axes[0], configs):
        at = rows[rows["config"].astype(str) == config].set_index(["family", "arm"])
        for y, key in enumerate(arms):
            if key not in at.index:
                continue
            r = at.loc[key]
            significant = pd.notna(r["p_holm"]) and float(r["p_holm"]) < 0.05
            ax.errorbar(r["estimate"], y, xerr=[[r["estimate"] - r["lo"]], [r["hi"] - r["estimate"]]], fmt="o",
                        color=palette[key[0]], mfc=palette[key[0]] if significant else "white", capsize=3)
        ax.axvline(0.0, color="0.3", lw=1, ls="--")
        ax.set_title(config)
        endpoint = str(rows["endpoint"].iloc[0])
        ax.set_xlabel(f"arm − λ=0 control, {endpoint}" + (" (dB)" if endpoint == "psnr" else ""))
    axes[0][0].set_yticks(range(len(arms)), [f"{a} ({f})" for f, a in arms])
    axes[0][0].invert_yaxis()
    runs = "/".join(str(int(n)) for n in sorted(set(rows["n_runs"].dropna())))
    fig.suptitle(f"Ablation grid: mean over {runs} training runs per arm, 95 % CI (filled: Holm p < 0.05 within "
                 "the family)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def _numbers(table: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    show = table.copy()
    for col in cols:
        if col in show:
            show[col] = show[col].map(format_number)
    return show


def grid_section(out_dir: Path, contrasts: pd.DataFrame) -> tuple[list[str], list[Path]]:
    """Report lines of the grid and the figure files drawn (the forest plot into
    ``out_dir/figures``); nothing when the analysis wrote no grid table."""
    selections = read_optional(out_dir / contract.GRID_SELECTIONS)
    rows = grid_rows(contrasts)
    if selections is None and rows.empty:
        return [], []
    lines = ["### Ablation grid at the study's power (params/study/grid.yaml, issue #31)\n",
             "Each arm (3 training runs) against the grid's λ = 0 control (3 runs, the same training seeds), per-image "
             "means over training runs, paired over the same prompts and initial noise, two-sided t; Holm within each "
             "family (`m_tests`). The study's own FCR λ = 0.1 arm is a reference row on the same pairs (tested in the "
             "primary family, not again here). Pre-registered before any grid run.\n"]
    figures: list[Path] = []
    if rows.empty:
        lines.append("_Not run yet: the grid's sweep has no results (see the notes above)._\n")
    else:
        tested = rows[rows["m_tests"] > 0]
        lines.append(f"{len(tested)} tests in {tested['family'].nunique()} families.\n")
        show = rows[["family", "contrast", "config", "n", "estimate", "lo", "hi", "p_holm", "m_tests", "mde", "decision",
                     "run_estimates"]]
        lines.append(markdown_table(_numbers(show, ["estimate", "lo", "hi", "p_holm", "mde"])))
        figures.append(forest_plot(rows, out_dir / "figures" / contract.GRID_FOREST))
        lines.append(f"Forest plot: `figures/{contract.GRID_FOREST}` (under Figures).\n")
    secondary = read_optional(out_dir / contract.GRID_SECONDARY)
    if secondary is not None and not secondary.empty:
        lines.append("Secondary endpoints, descriptive (no test): arm − control, per-image means over training runs with "
                     "95 % t intervals; `psnr_original_full` in dB, `accuracy` in points, `fd_inf` the mean FD∞ of the "
                     "arm's runs minus the control's (no interval).\n")
        lines.append(markdown_table(_numbers(secondary.drop(columns=["backbone"], errors="ignore"),
                                             ["arm_mean", "control_mean", "estimate", "lo", "hi"])))
    if selections is not None and not selections.empty:
        lines.append("Checkpoint selection (params/study/early_stopping.yaml): the step whose moving average of the "
                     "mini-validation PSNR (FD-10 to full sampling, 16 held-out prompt/noise draws) was best, per "
                     "fine-tune; the contrasts above use the final weights.\n")
        lines.append(markdown_table(_numbers(selections.drop(columns=["backbone"], errors="ignore"),
                                             ["best_average", "last_average"])))
    sensitivity = read_optional(out_dir / contract.GRID_SENSITIVITY)
    if sensitivity is not None and not sensitivity.empty:
        lines.append("Sensitivity: the same contrasts with every fine-tune's best-step weights (params/study/"
                     "grid_best.yaml, fewer pairs), beside the final weights' estimate on the same pairs; `change` = "
                     "best − final.\n")
        show = sensitivity.drop(columns=["backbone", "endpoint"], errors="ignore")
        lines.append(markdown_table(_numbers(show, ["estimate", "lo", "hi", "p_holm", "mde", "final_estimate",
                                                    "final_lo", "final_hi", "change"])))
    return lines, figures
