"""Issue #33's same-configuration contrasts on a per-image fidelity table written by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fcr.analysis.cache_aware import same_configuration_contrasts
from fcr.analysis.paired import forget_tables
from fcr.contract import FIDELITY_PER_IMAGE


def _table(tmp_path, cells: dict[tuple[str, str, str], np.ndarray]) -> None:
    rows = []
    for (model, config, reference), values in cells.items():
        for seed in (0, 1):
            for image, v in enumerate(values[seed * 4:(seed + 1) * 4]):
                rows.append({"model": model, "config": config, "seed": seed, "reference": reference, "image": image,
                             "psnr": float(v)})
    pd.DataFrame(rows).to_parquet(tmp_path / FIDELITY_PER_IMAGE)
    forget_tables()


def test_an_arm_is_its_replicates_mean_against_the_original_at_the_same_configuration(tmp_path) -> None:
    base = np.array([30.0, 31.0, 29.0, 30.5, 28.0, 32.0, 30.0, 29.5])
    bump = np.array([1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 1.3, 0.7])
    _table(tmp_path, {
        ("base", "DeepCache-10-b0", "own_full"): base,
        ("ca", "DeepCache-10-b0", "original_full"): base + bump,
        ("ca_seed1", "DeepCache-10-b0", "original_full"): base + bump + 0.2,
        ("base", "FD-10", "own_full"): base,
        ("fd", "FD-10", "original_full"): base + np.array([0.1, -0.1] * 4),
    })
    out = same_configuration_contrasts(tmp_path, {"dc10": ("DeepCache-10-b0", ["ca", "ca_seed1"]),
                                                  "fd10": ("FD-10", ["fd"])}, "base", [0, 1]).set_index("arm")
    assert out.loc["dc10", "estimate"] == pytest.approx((bump + 0.1).mean())
    assert out.loc["dc10", "n"] == 8 and out.loc["dc10", "replicates"] == 2 and (out["m"] == 2).all()
    assert out.loc["dc10", "ci_lo"] < out.loc["dc10", "estimate"] < out.loc["dc10", "ci_hi"]
    assert out.loc["dc10", "verdict"] == "better" and out.loc["dc10", "p_holm"] >= out.loc["dc10", "p"]
    assert out.loc["fd10", "estimate"] == pytest.approx(0.0, abs=1e-12)
    assert out.loc["fd10", "verdict"].startswith("not detectable at n = 8 (MDE ")
    again = same_configuration_contrasts(tmp_path, {"dc10": ("DeepCache-10-b0", ["ca", "ca_seed1"])}, "base")
    assert again.loc[0, "n"] == 8  # seeds read from the table
    with pytest.raises(ValueError, match="no replicate"):
        same_configuration_contrasts(tmp_path, {"x": ("FD-10", [])}, "base", [0, 1])
    # A scale-shift arm added later is its own Holm family: the pre-registered one keeps its m.
    split = same_configuration_contrasts(tmp_path, {"dc10": ("DeepCache-10-b0", ["ca", "ca_seed1"]),
                                                    "fd10": ("FD-10", ["fd"])}, "base", [0, 1],
                                         families={"dc10": "scale_shift", "fd10": "all"}).set_index("arm")
    assert split.loc["dc10", "m"] == 1 and split.loc["fd10", "m"] == 1 and split.loc["dc10", "family"] == "scale_shift"
    assert split.loc["dc10", "p_holm"] == pytest.approx(split.loc["dc10", "p"])


def test_arms_group_replicates_by_their_seed_suffix() -> None:
    from fcr.analysis.cache_aware import cache_aware_arms

    dc = {"configuration": "DeepCache-10-b0"}
    arms = cache_aware_arms({"base": None, "ca_dc10": dc, "ca_dc10_seed1": dc, "ca_fd10": {"configuration": "FD-10"}})
    assert arms == {"ca_dc10": ("DeepCache-10-b0", ["ca_dc10", "ca_dc10_seed1"]), "ca_fd10": ("FD-10", ["ca_fd10"])}
    with pytest.raises(ValueError, match="trained for FD-10"):
        cache_aware_arms({"a": dc, "a_seed1": {"configuration": "FD-10"}})
    from fcr.analysis.cache_aware import arm_families

    shift = {"configuration": "DeepCache-10-b0", "trainable": "scale_shift"}
    assert arm_families({"base": None, "ca_dc10": dc, "ca_ss": shift, "ca_ss_seed1": shift}) == {
        "ca_dc10": "all", "ca_ss": "scale_shift"}
