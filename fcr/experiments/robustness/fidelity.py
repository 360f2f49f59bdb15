"""Caching fidelity under stress, per image: the runner half of criterion c. Within one model,
stress and seed, each cached image is scored against the same model's ``full`` image of the same
prompt and initial noise; the difference in differences over those per-image drops, its definition
and its test are in :mod:`fcr.analysis.stress`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fcr.eval.fidelity import fidelity
from fcr.analysis.paired import side_file_with_images
from fcr.experiments.robustness.stresses import result_stem


__all__ = ["load_stress_cell", "stress_fidelity_table"]

def load_stress_cell(out_dir: str | Path, model: str, config: str, stress: str, seed: int) -> tuple[dict, list[str]]:
    """The per-image tensors of one robustness result (its side file; SD: plus its PNGs as uint8
    ``images``) and the prompts it was sampled from."""
    out_dir = Path(out_dir)
    stem = result_stem(model, config, stress, seed)
    tensors, prompts = side_file_with_images(out_dir / "results" / f"{stem}.safetensors", out_dir / "images" / stem)
    return tensors, [str(p) for p in json.loads(prompts or "[]")]


def _pairs_with_full(rows: pd.DataFrame, config: str, stress: str) -> bool:
    """Whether ``config``'s images under ``stress`` start from the same ``z_T`` as ``full``'s."""
    if "attack_stride" not in rows.columns:
        return True
    strides = rows.loc[(rows["stress"] == stress) & rows["config"].isin([config, "full"]), ["config", "attack_stride"]]
    values = strides.dropna().drop_duplicates()
    return len(values) < 2 or values["attack_stride"].nunique() == 1


def stress_fidelity_table(out_dir: str | Path, results: pd.DataFrame) -> pd.DataFrame:
    """Per image of every cached robustness result in ``results`` (:func:`run_robustness`'s rows):
    its caching fidelity against the same model's ``full`` result under the same stress and seed
    (``model, config, stress, seed, image, prompt`` and every endpoint the side files allow). A
    result whose ``full`` was not run, or (adversarial) that started from another attacked ``z_T``,
    is left out; a ``full`` result from other prompts raises ValueError."""
    out_dir = Path(out_dir)
    frames = []
    cells = results[["model", "config", "stress", "seed"]].drop_duplicates()
    for (model, stress, seed), group in cells.groupby(["model", "stress", "seed"], sort=False):
        configs = set(group["config"].astype(str))
        if "full" not in configs:
            continue
        mine = results[results["model"] == model]
        reference, ref_prompts = load_stress_cell(out_dir, model, "full", stress, int(seed))
        for config in sorted(configs - {"full"}):
            if not _pairs_with_full(mine[mine["seed"] == seed], config, stress):
                continue
            cell, prompts = load_stress_cell(out_dir, model, config, stress, int(seed))
            if prompts != ref_prompts:
                raise ValueError(f"{model}@{config} and {model}@full under {stress!r} (seed {seed}) were not sampled "
                                 "from the same prompts")
            values = {k: v.double().numpy() for k, v in fidelity(cell, reference).items()}
            frames.append(pd.DataFrame({"model": model, "config": config, "stress": stress, "seed": int(seed),
                                        "image": np.arange(len(prompts)), "prompt": prompts, **values}))
    if not frames:
        return pd.DataFrame(columns=["model", "config", "stress", "seed", "image", "prompt"])
    return pd.concat(frames, ignore_index=True)


