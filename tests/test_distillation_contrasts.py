"""fcr.analysis.distillation: FCR + distillation against plain distillation, student by student."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from fcr.analysis.distillation import student_contrasts
from fcr.analysis.paired import FIDELITY_PER_IMAGE, forget_tables


@pytest.fixture(autouse=True)
def _no_cached_tables():
    yield
    forget_tables()  # the reader's cache must not outlive the test


def _sweep(tmp_path: Path, shift: float = 0.5) -> Path:
    """A per-image fidelity table of two distillation runs (2 rounds, 2 seeds x 6 images); arbitrary
    values, the treated run ``shift`` dB above the control at PD-N-FD-2 only (this checks arithmetic)."""
    gen = np.random.default_rng(0)
    rows = []
    for r, steps in ((1, 24), (2, 12)):
        for config in (f"PD-{steps}", f"PD-{steps}-FD-2", f"PD-{steps}-DeepCache-2-b0"):
            base = gen.normal(20, 2, size=12)
            for run in ("pd_base", "pd_fcr_base"):
                noise = gen.normal(0, 0.1, size=12)
                value = base + noise + (shift if run == "pd_fcr_base" and "FD" in config else 0.0)
                for reference in ("own_full", "original_full"):
                    rows += [{"model": f"{run}@round{r}", "config": config, "seed": i // 6, "image": i % 6,
                              "reference": reference, "psnr": float(v)} for i, v in enumerate(value)]
    rows += [{"model": "base", "config": "PD-24", "seed": 0, "image": 0, "reference": "original_full", "psnr": 1.0}]
    folder = tmp_path / "sweep"
    folder.mkdir()
    pd.DataFrame(rows).to_parquet(folder / FIDELITY_PER_IMAGE)
    forget_tables()
    return folder


def test_each_round_pairs_the_students_by_seed_and_image(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path)
    frame = student_contrasts(sweep, "pd_fcr_base", "pd_base")
    assert len(frame) == 6 and set(frame["m"]) == {6} and list(frame["round"]) == [1, 1, 1, 2, 2, 2]
    table = pd.read_parquet(sweep / FIDELITY_PER_IMAGE).query("reference == 'original_full'")
    cell = lambda model: table.query("model == @model and config == 'PD-12-FD-2'").sort_values(["seed", "image"])["psnr"].to_numpy()  # noqa: E731
    diff = cell("pd_fcr_base@round2") - cell("pd_base@round2")
    row = frame.set_index(["round", "config"]).loc[(2, "PD-12-FD-2")]
    assert row["n"] == 12 and row["estimate"] == pytest.approx(diff.mean())
    assert row["p"] == pytest.approx(scipy.stats.ttest_rel(cell("pd_fcr_base@round2"), cell("pd_base@round2")).pvalue)
    assert row["verdict"] == "better" and bool((frame["p_holm"] >= frame["p"]).all())
    family = student_contrasts(sweep, "pd_fcr_base", "pd_base", configs=r"PD-\d+(-FD-\d+)?")
    assert sorted(family["config"]) == ["PD-12", "PD-12-FD-2", "PD-24", "PD-24-FD-2"] and set(family["m"]) == {4}


def test_students_sampled_on_other_images_are_refused(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path)
    table = pd.read_parquet(sweep / FIDELITY_PER_IMAGE)
    table = table[~((table["model"] == "pd_base@round1") & (table["image"] == 5))]
    table.to_parquet(sweep / FIDELITY_PER_IMAGE)
    forget_tables()
    with pytest.raises(ValueError, match="not sampled on the same images"):
        student_contrasts(sweep, "pd_fcr_base", "pd_base")
