"""FCR + distillation (issue #32, pre-registered in params/study/frontier_peers.yaml): a student distilled
with the FCR term against the student distilled without it, round by round, at every sampling
configuration both students ran (PD-N and PD-N with FD / DeepCache), scored by fidelity to the original's
full sampling of the same prompt and noise. Paired t over images (every seed), Holm over every row,
minimal detectable effect at the measured spread and ``alpha / m``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd

from fcr.analysis.cache_aware import ORIGINAL_FULL
from fcr.analysis.paired import per_image_table
from fcr.stats import decide_family, paired_difference

__all__ = ["student_contrasts"]


def _student(model: str, run: str) -> int | None:
    """The round of ``model`` when it is a student ``<run>@round<r>`` of ``run``."""
    head, sep, tail = model.rpartition("@round")
    return int(tail) if sep and head == run and tail.isdigit() else None


def student_contrasts(sweep_dir: str | Path, treated: str, control: str, *, configs: str | None = None,
                      endpoint: str = "psnr", alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """One row per (round, configuration) both ``treated`` and ``control`` students ran (only configurations
    that fully match the regular expression ``configs``, when given: the family): ``estimate``
    (treated minus control, mean over images of every seed), 95 % t interval, ``p``, ``p_holm`` over the
    ``m`` rows, ``sd_diff``, ``mde`` and ``verdict`` (better / worse / not detectable at n = ...)."""
    table = per_image_table(sweep_dir)
    table = table[table["reference"] == ORIGINAL_FULL]
    rows = []
    for (model, config), cell in table.groupby(["model", "config"], sort=True):
        r = _student(str(model), treated)
        if r is None or (configs is not None and not re.fullmatch(configs, str(config))):
            continue
        theirs = table[(table["model"] == f"{control}@round{r}") & (table["config"] == config)]
        if theirs.empty:
            continue
        paired = cell.merge(theirs, on=["seed", "image"], suffixes=("_t", "_c"), validate="one_to_one")
        if len(paired) != len(cell) or len(paired) != len(theirs):
            raise ValueError(f"{model} and {control}@round{r} at {config} were not sampled on the same images and seeds")
        a, b = paired[f"{endpoint}_t"].to_numpy(np.float64), paired[f"{endpoint}_c"].to_numpy(np.float64)
        rows.append({"round": r, "config": config, "treated": f"{treated}@round{r}", "control": f"{control}@round{r}",
                     "treated_mean": float(a.mean()), "control_mean": float(b.mean()), **paired_difference(a, b)})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out = decide_family(out, alpha, power)
    return out.sort_values(["round", "config"], ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcr.analysis.distillation", description=__doc__)
    parser.add_argument("sweep_dir", help="the sweep folder that sampled both students (its fidelity_per_image.parquet)")
    parser.add_argument("treated", help="the distillation run with the FCR term")
    parser.add_argument("control", help="the distillation run without it")
    parser.add_argument("--configs", default=None, help="regular expression of the family's configurations")
    parser.add_argument("--out", required=True, help="CSV to write")
    args = parser.parse_args(argv)
    frame = student_contrasts(args.sweep_dir, args.treated, args.control, configs=args.configs)
    frame.to_csv(args.out, index=False)
    print(frame.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
