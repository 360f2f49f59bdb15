"""Seaborn/matplotlib figures shared by the notebooks (no computation here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "ipympl")) else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

__all__ = ["image_grid", "save_figure", "training_curves"]

sns.set_theme(context="notebook", style="whitegrid")


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Save as PNG (and keep the figure open for display in the notebook)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def image_grid(
    images: torch.Tensor | np.ndarray,
    nrows: int,
    ncols: int,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    scale: float = 1.2,
) -> plt.Figure:
    """Grid of 1-channel (or RGB) images in [-1, 1] (tensor) or uint8 (array), row-major."""
    imgs = images.detach().cpu().float().numpy() if torch.is_tensor(images) else np.asarray(images)
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
