"""Reading a sweep's results back: the per-image side file of a cell (and its PNGs at SD scale),
and the per-image fidelity table, as the analysis and the notebooks use them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fcr.contract import FIDELITY_DIRECTIONS, FIDELITY_PER_IMAGE

__all__ = ["cell_tensors", "check_same_prompts", "load_fidelity", "load_side_file", "per_image_fidelity", "per_image_table", "quality_stem", "side_file_with_images"]


def quality_stem(model: str, config: str, seed: int) -> str:
    """File stem of one sweep cell (model x configuration x seed)."""
    return f"{model.replace('/', '_')}__{config}__seed{seed}"



def load_side_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The per-image tensors :func:`fcr.experiments.sweep.evaluate_quality` wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it is written by run_sweep / fcr.experiments.sweep.evaluate_quality")
    return load_file(str(path))


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


def check_same_prompts(dir_a: Path, model_a: str, dir_b: Path, model_b: str, config: str,
                       seeds: Sequence[int]) -> None:
    """ValueError unless ``model_a``'s cells in ``dir_a`` and ``model_b``'s in ``dir_b`` sampled the
    same prompts at every seed of ``seeds`` (the initial noise is a function of seed and image
    index): cells of two sweep folders pair only then."""
    for seed in seeds:
        if cell_tensors(dir_a, model_a, config, seed)[1] != cell_tensors(dir_b, model_b, config, seed)[1]:
            raise ValueError(f"{model_a} ({dir_a}) and {model_b} ({dir_b}) sampled other prompts at seed {seed}: "
                             "their images do not pair")


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


def per_image_fidelity(out_dir: str | Path, model: str, config: str, reference: str, seeds: Sequence[int],
                       endpoint: str = "psnr") -> np.ndarray:
    """The per-image ``endpoint`` of one cell against ``reference``, images of ``seeds`` in order
    (image ``i`` of seed ``k`` pairs with the same image of every other cell of the sweep)."""
    return np.concatenate([load_fidelity(out_dir, model, config, int(s), reference)[endpoint].double().numpy()
                           for s in seeds])


def forget_tables() -> None:
    """Drop the cached per-image tables (after a writer replaced one)."""
    _TABLES.clear()
