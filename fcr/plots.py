"""Seaborn/matplotlib figures shared by the notebooks (no computation here)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "ipympl")) else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

if TYPE_CHECKING:  # tensors are accepted, but plotting a table (the report) loads no torch
    import torch

MAX_REFERENCE_LABELS = 12  # reference configurations named in a stride plot's legend

__all__ = [
    "config_sample_grid",
    "cost_bars",
    "frontier",
    "image_grid",
    "interval_bars",
    "power_curves",
    "win_rate_bars",
    "quality_vs_stride",
    "quality_vs_time",
    "save_figure",
    "training_curves",
]

sns.set_theme(context="notebook", style="whitegrid")


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Save as PNG (and keep the figure open for display in the notebook)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def _is_tensor(x: object) -> bool:
    return hasattr(x, "detach") and hasattr(x, "cpu")  # a torch tensor, without importing torch


def image_grid(
    images: torch.Tensor | np.ndarray,
    nrows: int,
    ncols: int,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    scale: float = 1.2,
) -> plt.Figure:
    """Grid of 1-channel (or RGB) images in [-1, 1] (tensor) or uint8 (array), row-major."""
    imgs = images.detach().cpu().float().numpy() if _is_tensor(images) else np.asarray(images)
    if imgs.dtype != np.uint8:
        imgs = np.clip((imgs + 1) * 127.5, 0, 255).astype(np.uint8)
    if imgs.ndim == 4 and imgs.shape[1] in (1, 3):
        imgs = imgs.transpose(0, 2, 3, 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * scale, nrows * scale), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(imgs):
            ax.axis("off")
            continue
        img = imgs[i]
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        if titles is not None and i < len(titles):
            ax.set_title(titles[i], fontsize=7)
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


def training_curves(log: pd.DataFrame, title: str = "") -> plt.Figure:
    """Denoising loss, FCR term and throughput against the optimizer step."""
    long = log.melt(id_vars="step", value_vars=["denoise", "fcr"], var_name="term", value_name="loss")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    sns.lineplot(data=long, x="step", y="loss", hue="term", ax=axes[0])
    axes[0].set_yscale("log")
    axes[0].set_title(title or "training loss")
    sns.lineplot(data=log, x="step", y="images_per_s", ax=axes[1])
    axes[1].set_title("throughput (images/s)")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- stride sweep


def interval_bars(ax: plt.Axes, x, lo, hi, color) -> None:
    """Interval bars from ``lo`` to ``hi`` at ``x`` (non-finite ends skipped); drawn as segments
    because a bootstrap interval of a biased set metric (FD) need not contain its estimate, which
    ``ax.errorbar`` cannot show."""
    x, lo, hi = np.asarray(x, float), np.asarray(lo, float), np.asarray(hi, float)
    ok = np.isfinite(lo) & np.isfinite(hi)  # one seed: no interval to draw
    if ok.any():
        ax.vlines(x[ok], lo[ok], hi[ok], color=color, linewidth=1.2)
        ax.scatter(np.r_[x[ok], x[ok]], np.r_[lo[ok], hi[ok]], marker="_", color=color, s=60)


def _metric_bars(ax: plt.Axes, group: pd.DataFrame, x: str, metric: str, color) -> None:
    # Only where the table has intervals: an SD FID of one seed is a single number per image set.
    if f"{metric}_lo" in group and f"{metric}_hi" in group:
        interval_bars(ax, group[x], group[f"{metric}_lo"], group[f"{metric}_hi"], color)


def quality_vs_stride(summary: pd.DataFrame, metric: str, ylabel: str | None = None) -> plt.Figure:
    """``metric`` (mean over seeds, t-interval bars) against the key-step stride, one line per
    model over the main scheduler's uniform strides (``full``, ``FD-s``); every other configuration
    (FD-50ls, DPM++, DPM++-FD-s) is a dashed horizontal line, so a line never mixes two samplers."""
    fig, ax = plt.subplots(figsize=(6, 4))
    palette = dict(zip(summary["model"].unique(), sns.color_palette(n_colors=summary["model"].nunique())))
    on_line = summary["stride"].notna() & summary["config"].astype(str).str.fullmatch(r"full|FD-\d+")
    strided = summary[on_line].sort_values("stride")
    sns.lineplot(data=strided, x="stride", y=metric, hue="model", palette=palette, marker="o", ax=ax, errorbar=None)
    for model, group in strided.groupby("model"):
        _metric_bars(ax, group, "stride", metric, palette[model])
    styles = itertools.cycle(["--", ":", "-."])
    references = summary[~on_line].groupby("config", sort=False)
    named = references.ngroups <= MAX_REFERENCE_LABELS  # past that, three line styles identify nothing
    for config, group in references:
        style = next(styles)
        for _, row in group.iterrows():
            ax.axhline(row[metric], color=palette[row["model"]], linestyle=style, linewidth=1)
        if named:
            ax.plot([], [], color="gray", linestyle=style, label=config)
    if references.ngroups and not named:
        ax.set_title(f"{references.ngroups} other configurations as horizontal lines (the frontier names them)", fontsize=8)
    ax.set_xticks(sorted(strided["stride"].unique()))
    ax.set_xlabel("key-step stride (1 = full UNet every step)")
    ax.set_ylabel(ylabel or metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def quality_vs_time(
    summary: pd.DataFrame,
    costs: pd.DataFrame,
    metric: str,
    time_col: str = "time_per_image_s",
    ylabel: str | None = None,
) -> plt.Figure:
    """Quality against measured time per image, one point per model x configuration, with each
    model's Pareto front (points no other configuration beats on both axes; lower is better)."""
    merged = summary.merge(costs[["architecture", "config", time_col]], on=["architecture", "config"])
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.scatterplot(data=merged, x=time_col, y=metric, hue="model", style="config", s=70, ax=ax)
    palette = dict(zip(merged["model"].unique(), sns.color_palette(n_colors=merged["model"].nunique())))
    for model, group in merged.groupby("model"):
        _metric_bars(ax, group, time_col, metric, palette[model])
        front, best = [], np.inf
        for _, row in group.sort_values([time_col, metric]).iterrows():
            if row[metric] < best:
                front.append(row)
                best = row[metric]
        front_df = pd.DataFrame(front)
        ax.step(front_df[time_col], front_df[metric], where="post", color=palette[model], alpha=0.5)
    ax.set_xlabel("measured time per image (s)")
    ax.set_ylabel(ylabel or metric)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def cost_bars(costs: pd.DataFrame, passes: pd.DataFrame) -> plt.Figure:
    """Left: network calls per sampling run (encoder / decoder / full UNet) per configuration. Right:
    measured FLOP ratio to plain sampling next to the analytic bound (from the encoder share)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    cols = [c for c in ("unet_passes_per_run", "encoder_passes_per_run", "decoder_passes_per_run") if c in passes]
    long = passes.melt(id_vars=["architecture", "config"], value_vars=cols, var_name="pass", value_name="per run")
    long["pass"] = long["pass"].str.replace("_passes_per_run", "", regex=False)
    sns.barplot(data=long, x="config", y="per run", hue="pass", ax=axes[0], errorbar=None)
    axes[0].set_title("network calls per sampling run (batched decoders count once)")
    ratio = costs.melt(
        id_vars=["architecture", "config"], value_vars=["flops_ratio_vs_full", "bound_flops_ratio_vs_full"],
        var_name="kind", value_name="FLOPs / full",
    )
    kinds = {"flops_ratio_vs_full": "measured (flop_counter)", "bound_flops_ratio_vs_full": "analytic bound"}
    ratio["kind"] = ratio["kind"].map(kinds)
    sns.barplot(data=ratio, x="config", y="FLOPs / full", hue="kind", ax=axes[1], errorbar=None)
    axes[1].set_title("UNet FLOPs per image relative to full sampling")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def config_sample_grid(
    samples: dict[str, torch.Tensor | np.ndarray], titles: Sequence[str] | None = None
) -> plt.Figure:
    """Rows = configurations, columns = the same prompts and initial noise (uint8 or [-1, 1] images)."""
    names = list(samples)
    ncols = min(len(v) for v in samples.values())
    parts = [v[:ncols].cpu().numpy() if _is_tensor(v) else np.asarray(v[:ncols]) for v in samples.values()]
    images = np.concatenate(parts)
    full_titles = list(titles[:ncols]) + [""] * (len(images) - ncols) if titles is not None else None
    return image_grid(images, len(names), ncols, titles=full_titles, row_labels=names)


def frontier(points: pd.DataFrame, cost_column: str, quality: str, ylabel: str | None = None,
             higher_is_better: bool = True, facet: str | None = None,
             facet_order: Sequence[str] = ()) -> plt.Figure:
    """``quality`` (interval bars) against ``cost_column`` (log scale), one line per series in
    order of cost; the points on the Pareto front (``pareto``) ringed in black, the reference
    configuration (``is_reference``: the original's full sampling) a dotted vertical line.
    ``facet``: a column (e.g. ``approach``) whose values get one panel each (``facet_order`` first),
    with a shared y axis and the whole front as a grey line in every panel; a frontier of dozens of
    series is unreadable in one panel. A series is ``<model> · <method family>``: in a panel with
    several models the colour is the model and the marker the method family."""
    shown = points[~points["is_reference"] & points[quality].notna()].sort_values(cost_column)
    panels: list[str | None] = [None]
    if facet is not None and facet in shown:
        present = list(dict.fromkeys(shown[facet]))
        panels = [v for v in facet_order if v in present] + [v for v in present if v not in facet_order]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5, 4.5) if panels == [None] else (5.0 * len(panels), 5.5),
                             sharey=True, squeeze=False)
    front = shown[shown["pareto"]] if "pareto" in shown else shown.iloc[:0]
    for ax, panel in zip(axes.flat, panels):
        own = shown if panel is None else shown[shown[facet] == panel]
        _frontier_panel(ax, own, front if panel is not None else None, cost_column, quality)
        _ring_front_and_reference(ax, front[front.index.isin(own.index)], points[points["is_reference"]], cost_column,
                                  quality)
        ax.set_xscale("log")
        ax.set_xlabel(cost_column.replace("_", " "))
        if panel is None:
            ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
        else:
            ax.set_title(str(panel))
            ax.legend(fontsize=6.5, bbox_to_anchor=(0.5, -0.2), loc="upper center", ncol=2)
    axes.flat[0].set_ylabel((ylabel or quality) + ("" if higher_is_better else " (lower is better)"))
    fig.tight_layout()
    return fig


_FAMILY_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")


def _frontier_panel(ax: plt.Axes, shown: pd.DataFrame, context: pd.DataFrame | None, cost_column: str,
                    quality: str) -> None:
    if context is not None and not context.empty:  # the whole front: every panel reads against the best of all
        ax.plot(context[cost_column], context[quality], color="grey", linewidth=3, alpha=0.35, label="Pareto front (all)")
    series = list(dict.fromkeys(shown["series"]))
    parts = [(name.split(" · ", 1) + [""])[:2] for name in series]
    models = list(dict.fromkeys(m for m, _ in parts))
    families = list(dict.fromkeys(f for _, f in parts))
    by_model = context is not None and len(models) > 1 and len(series) > 6  # else one colour per series
    keys = models if by_model else series
    palette = dict(zip(keys, sns.color_palette("tab10" if len(keys) <= 10 else "tab20", n_colors=max(len(keys), 1))))
    markers = dict(zip(families, itertools.cycle(_FAMILY_MARKERS)))
    for name, (model, family) in zip(series, parts):
        group = shown[shown["series"] == name]
        color = palette[model if by_model else name]
        # Colour by model: a series' points span step counts and strides, so its line is faint.
        ax.plot(group[cost_column], group[quality], marker=markers[family] if by_model else "o", color=color,
                label=None if by_model else name, linewidth=0.6 if by_model else 1.2, markersize=5)
        _metric_bars(ax, group, cost_column, quality, color)
    if by_model:  # a legend of models (colour) and method families (marker), not of every pair
        for model in models:
            ax.plot([], [], color=palette[model], linewidth=2, label=model)
        for family in families:
            ax.plot([], [], color="black", marker=markers[family], linestyle="none", label=family)


def _ring_front_and_reference(ax: plt.Axes, front: pd.DataFrame, references: pd.DataFrame, cost_column: str,
                              quality: str) -> None:
    ax.scatter(front[cost_column], front[quality], s=120, facecolors="none", edgecolors="black", linewidths=1.5,
               label="on the Pareto front", zorder=5)
    for _, row in references.iterrows():
        ax.axvline(row[cost_column], color="gray", linestyle=":", linewidth=1)
        ax.plot([], [], color="gray", linestyle=":", label=f"{row['model']} {row['config']} (the reference)")


def power_curves(curve: pd.DataFrame, needed: pd.DataFrame | None = None) -> plt.Figure:
    """Power of the sign test against decisive pairs, one line per win rate of A."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    sns.lineplot(data=curve, x="pairs", y="power", hue="win_rate_a", palette="viridis", ax=ax)
    ax.axhline(0.8, color="grey", ls="--", lw=1)
    if needed is not None:
        for _, row in needed.iterrows():
            ax.axvline(row["pairs_needed"], color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("decisive pairs (log scale)")
    ax.set_ylabel("power (exact sign test, α = 0.05)")
    ax.legend(title="win rate of A")
    fig.tight_layout()
    return fig


def win_rate_bars(breakdown: pd.DataFrame, by: str) -> plt.Figure:
    """Win rate of A per ``by`` with its Wilson 95 % interval; 0.5 marked."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    order = breakdown.sort_values(by)
    sns.barplot(data=order, x=by, y="win_rate_a", color="#4c72b0", ax=ax)
    interval_bars(ax, np.arange(len(order)), order["win_rate_lo"], order["win_rate_hi"], "black")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate of A")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig
