"""Caching fidelity under stress, per image (the runner half; the difference in differences of
criterion c is :mod:`fcr.analysis.stress`).

Criterion c as a difference in differences of the paired caching error under stress.

The seed's criterion c ("the quality drop under stress with FCR is no larger than the original
model's") compared mean FD / accuracy drops, point estimate against point estimate. What caching
changes is each image, so here the endpoint is paired caching fidelity: within one model, stress
and seed, each cached image against the same model's ``full`` image of the same prompt and initial
noise (:func:`fcr.eval.fidelity.fidelity`, e.g. PSNR). Per image ``i`` the *drop* under stress
``s`` is ``direction * (e_none,i - e_s,i)`` (positive: caching got less faithful under stress).
The contrast of FCR against a comparator (the original model, or the λ = 0 control) is

    DiD = mean_i [ mean_r drop_FCR_r,i  -  mean_r drop_comparator_r,i ]

over training replicates ``r`` and the images both sides sampled from the same prompts and noise
(the same seeds), tested for non-inferiority with a pre-registered margin: H0 DiD >= margin
against H1 DiD < margin (one-sided paired t), Holm over every row of the family.

The adversarial stress attacks ``z_T`` against one key interval; ``full`` reuses the attack of the
largest stride (:func:`fcr.experiments.robustness.stresses.attack_stride`), so under that stress a
cached configuration pairs with ``full`` only when it is that stride (others are left out).
"""

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


