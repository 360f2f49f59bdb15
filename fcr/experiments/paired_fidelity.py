"""Paired caching fidelity of a sweep: every cached cell's images against the full-sampling images
of the same prompts and initial noise, image by image (:mod:`fcr.eval.fidelity`).

Two references per cell: the same model's ``full`` sampling (``own_full``: what caching itself
changes) and, for a fine-tuned model, its original model's ``full`` sampling (``original_full``:
how far the whole recipe, fine-tune plus caching, moves the images the user had). Per-image
values go to one table per sweep, ``out_dir/fidelity_per_image.parquet`` (model, config, seed,
image, reference, every endpoint), so any contrast is paired; :func:`fidelity_table` returns their
means over the pooled images of all seeds with percentile bootstrap 95 % intervals.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fcr.contract import FIDELITY_DIRECTIONS, FIDELITY_PER_IMAGE
from fcr.eval.fidelity import fidelity
from fcr.stats import bootstrap_ci
from fcr.analysis.paired import cell_tensors, forget_tables

__all__ = ["REFERENCES", "fidelity_table", "write_per_image_table"]

# Columns of the per-image table before the endpoints.
PER_IMAGE_KEYS = ("model", "config", "seed", "image", "reference", "reference_model", "reference_config")

REFERENCES: tuple[str, ...] = ("own_full", "original_full")


def write_per_image_table(out_dir: Path, parts: list[pd.DataFrame]) -> Path:
    """Write the per-image rows atomically (a kill never leaves half a table)."""
    path = out_dir / FIDELITY_PER_IMAGE
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(PER_IMAGE_KEYS))
    table = table.sort_values(list(PER_IMAGE_KEYS[:5])).reset_index(drop=True)
    tmp = path.with_name(f".{path.name}.tmp")
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
    forget_tables()
    return path


def _per_image_rows(values: Mapping[str, torch.Tensor], **keys: Any) -> pd.DataFrame:
    """One row per image of one cell and reference: ``keys`` (PER_IMAGE_KEYS but image), the image
    index, every endpoint of ``values``."""
    n = next(iter(values.values())).shape[0]
    frame = pd.DataFrame({**{name: [value] * n for name, value in keys.items()}, "image": np.arange(n, dtype=np.int64)})
    for name in FIDELITY_DIRECTIONS:
        if name in values:
            frame[name] = values[name].double().numpy()
    return frame[[*PER_IMAGE_KEYS, *(c for c in frame.columns if c not in PER_IMAGE_KEYS)]]


def fidelity_table(
    out_dir: str | Path,
    quality: pd.DataFrame,
    origins: Mapping[str, str],
    *,
    reference_config: str = "full",
    n_boot: int = 200,
) -> pd.DataFrame:
    """Per-image fidelity of every cell of ``quality`` (run_sweep's table) against its references (:data:`REFERENCES`; ``origins``: {fine-tuned label: original label}),
    written per image to ``out_dir/fidelity_per_image.parquet``; returns one row per model x configuration x reference with, per
    endpoint, the mean over all images of all seeds (pairs: image ``i`` of seed ``k``) and its
    percentile bootstrap interval (``<endpoint>``, ``_lo``, ``_hi``), ``n_images`` and ``n_seeds``. A
    ``reference_config`` cell is compared with its original's only (a fine-tune's full sampling).
    A reference cell that was not run is skipped; cells from different prompts raise ValueError."""
    out_dir = Path(out_dir)
    ran = set(zip(quality["model"].astype(str), quality["config"].astype(str), quality["seed"].astype(int)))
    strides = {(str(m), str(c)): s for m, c, s in zip(quality["model"], quality["config"], quality.get("stride", []))}
    pooled: dict[tuple[str, str, str, str], list[dict[str, torch.Tensor]]] = {}
    references: dict[tuple[str, int], tuple[dict[str, torch.Tensor], str]] = {}  # each full cell read once
    per_image: list[pd.DataFrame] = []
    for model, config, seed in sorted(ran):
        # A fine-tune's own full sampling is compared with its original's (the frontier's point of
        # the fine-tune without caching); against itself it would be the identity.
        refs = {"own_full": model, **({"original_full": origins[model]} if model in origins else {})}
        if config == reference_config:
            refs.pop("own_full")
        refs = {r: m for r, m in refs.items() if (m, reference_config, seed) in ran}
        if not refs:
            continue
        cell, prompts = cell_tensors(out_dir, model, config, seed)
        for reference, ref_model in refs.items():
            if (ref_model, seed) not in references:
                references[(ref_model, seed)] = cell_tensors(out_dir, ref_model, reference_config, seed)
            ref, ref_prompts = references[(ref_model, seed)]
            if prompts != ref_prompts:
                raise ValueError(f"{model}@{config} and {ref_model}@{reference_config} (seed {seed}) were not made "
                                 "from the same prompts: no paired comparison")
            values = fidelity(cell, ref)
            per_image.append(_per_image_rows(values, model=model, config=config, seed=int(seed), reference=reference,
                                             reference_model=ref_model, reference_config=reference_config))
            pooled.setdefault((model, config, reference, ref_model), []).append(values)
    rows: list[dict[str, Any]] = []
    for (model, config, reference, ref_model), parts in pooled.items():
        row: dict[str, Any] = {"model": model, "config": config, "stride": strides.get((model, config)),
                               "reference": reference, "reference_model": ref_model,
                               "reference_config": reference_config}
        for name in FIDELITY_DIRECTIONS:
            if name in parts[0]:
                values = torch.cat([p[name] for p in parts]).numpy()
                est, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=0)
                row.update({name: est, f"{name}_lo": lo, f"{name}_hi": hi})
        row["n_images"] = int(sum(next(iter(p.values())).shape[0] for p in parts))
        row["n_seeds"] = len(parts)
        rows.append(row)
    write_per_image_table(out_dir, per_image)
    return pd.DataFrame(rows)
