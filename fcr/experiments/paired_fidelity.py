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
from safetensors import safe_open

from fcr.contract import FIDELITY_DIRECTIONS, FIDELITY_PER_IMAGE
from fcr.eval.fidelity import fidelity
from fcr.eval.stats import bootstrap_ci
from fcr.experiments.sweep import load_side_file, quality_stem

__all__ = ["REFERENCES", "cell_tensors", "fidelity_table", "load_fidelity", "per_image_table",
           "side_file_with_images", "write_per_image_table"]

# Columns of the per-image table before the endpoints.
PER_IMAGE_KEYS = ("model", "config", "seed", "image", "reference", "reference_model", "reference_config")

REFERENCES: tuple[str, ...] = ("own_full", "original_full")


def _png_folder(folder: Path) -> torch.Tensor:
    """uint8 (N, C, H, W) of the PNGs a scorer wrote (SD), in file-name order."""
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def side_file_with_images(path: Path, image_folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The per-image tensors of a side file (SD: plus the PNGs of ``image_folder`` as uint8
    ``images``) and the raw ``prompts`` entry of its metadata."""
    tensors = load_side_file(path)  # raises, naming run_sweep, when the cell was not run
    with safe_open(str(path), framework="pt") as f:
        prompts = (f.metadata() or {}).get("prompts", "")
    if "images" not in tensors and image_folder.is_dir():
        tensors["images"] = _png_folder(image_folder)
    return tensors, prompts


def cell_tensors(out_dir: str | Path, model: str, config: str, seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """The per-image tensors of one sweep cell (its side file; SD: plus the PNGs as uint8 ``images``)
    and the prompts it was made from (the side file's metadata)."""
    out_dir = Path(out_dir)
    stem = quality_stem(model, config, seed)
    return side_file_with_images(out_dir / "quality" / f"{stem}.safetensors", out_dir / "images" / stem)


def per_image_table(out_dir: str | Path) -> pd.DataFrame:
    """The sweep's per-image fidelity table (:func:`fidelity_table` writes it), read once per version
    of the file."""
    path = Path(out_dir) / FIDELITY_PER_IMAGE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it is written by fcr.experiments.paired_fidelity.fidelity_table")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _TABLES:
        _TABLES.clear()  # one sweep at a time is read; never keep stale versions
        _TABLES[key] = pd.read_parquet(path)
    return _TABLES[key]


_TABLES: dict[tuple[str, int, int], pd.DataFrame] = {}


def load_fidelity(out_dir: str | Path, model: str, config: str, seed: int, reference: str) -> dict[str, torch.Tensor]:
    """The per-image fidelity of one cell against ``reference``: endpoint -> values in image order."""
    table = per_image_table(out_dir)
    rows = table[(table["model"] == model) & (table["config"] == config) & (table["seed"] == int(seed))
                 & (table["reference"] == reference)].sort_values("image")
    if rows.empty:
        raise FileNotFoundError(f"{Path(out_dir) / FIDELITY_PER_IMAGE} has no rows for {model}@{config} seed {seed} "
                                f"vs {reference}: it is written by fcr.experiments.paired_fidelity.fidelity_table")
    return {name: torch.from_numpy(rows[name].to_numpy(dtype=np.float64).copy())
            for name in FIDELITY_DIRECTIONS if name in rows and rows[name].notna().all()}


def write_per_image_table(out_dir: Path, parts: list[pd.DataFrame]) -> Path:
    """Write the per-image rows atomically (a kill never leaves half a table)."""
    path = out_dir / FIDELITY_PER_IMAGE
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(PER_IMAGE_KEYS))
    table = table.sort_values(list(PER_IMAGE_KEYS[:5])).reset_index(drop=True)
    tmp = path.with_name(f".{path.name}.tmp")
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
    _TABLES.clear()
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
