"""Issue #33's same-configuration contrasts on a per-image fidelity table written by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fcr.analysis.cache_aware import same_configuration_contrasts
from fcr.analysis.paired import forget_tables
from fcr.contract import FIDELITY_PER_IMAGE

REPO = Path(__file__).resolve().parents[1]


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
    # Each training run's own estimate: run 0 gains bump, run 1 bump + 0.2.
    runs = [float(v) for v in out.loc["dc10", "run_estimates"].split("; ")]
    assert runs == pytest.approx([bump.mean(), bump.mean() + 0.2], abs=1e-3)
    assert out.loc["dc10", "run_sd"] == pytest.approx(np.std(runs, ddof=1))
    assert out.loc["dc10", "original_model"] == "base" and out.loc["dc10", "endpoint"] == "psnr"
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
    from fcr.analysis.cache_aware import differs_only_at

    # Only a frozen UNet's scale-shift is the original everywhere but at its own configuration.
    assert differs_only_at({"base": None, "ca_dc10": dc, "ca_ss": shift, "ca_ss_seed1": shift}) == {
        "ca_ss": "DeepCache-10-b0", "ca_ss_seed1": "DeepCache-10-b0"}


def test_arm_rows_join_the_study_contrasts_table_in_its_schema(tmp_path) -> None:
    from fcr.analysis.cache_aware import study_rows
    from fcr.manifest import backbones_of
    from fcr.report.study import StudyTables, study_section

    base = np.array([30.0, 31.0, 29.0, 30.5, 28.0, 32.0, 30.0, 29.5])
    _table(tmp_path, {
        ("base", "DeepCache-10-b0", "own_full"): base,
        ("ca", "DeepCache-10-b0", "original_full"): base - np.array([1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 1.3, 0.7]),
        ("base", "FD-10", "own_full"): base,
        ("fd", "FD-10", "original_full"): base + np.array([0.1, -0.1] * 4),
    })
    table = same_configuration_contrasts(tmp_path, {"dc10": ("DeepCache-10-b0", ["ca"]), "fd10": ("FD-10", ["fd"])},
                                         "base", [0, 1], families={"dc10": "all", "fd10": "scale_shift"})
    rows = study_rows(table, "exp-3-cache-aware").set_index("model")
    study = pd.read_csv(REPO / "outputs" / "study" / "report" / "contrasts.csv", nrows=1)
    assert list(rows.reset_index()[study.columns].columns) == list(study.columns)  # the study's own columns
    assert rows.loc["dc10", "family"] == "cache-aware: all" and rows.loc["fd10", "family"] == "cache-aware: scale_shift"
    assert rows.loc["dc10", "decision"] == "trained worse" and rows.loc["dc10", "endpoint"] == "psnr_vs_original_full"
    assert rows.loc["fd10", "decision"].startswith("not detectable at n = 8")
    assert (rows["vs_model"] == "base").all() and (rows["backbone"] == "base").all()
    assert rows.loc["dc10", "lo"] == table.set_index("arm").loc["dc10", "ci_lo"]
    assert study_rows(pd.DataFrame(), "x").empty
    # The study section lists them beside the FCR contrasts.
    backbones = backbones_of("embedded", REPO / "params" / "study" / "experiments.yaml")
    text = "\n".join(study_section(backbones, StudyTables(rows.reset_index(), pd.DataFrame(), [], pd.DataFrame())))
    assert "cache-aware dc10 vs original" in text
    # The README's results block shows them in a table of their own, and nothing where there are none.
    from fcr.report.front_page import _cache_aware
    front = _cache_aware(pd.concat([study, rows.reset_index()[study.columns]], ignore_index=True))
    assert front.count("\n| dc10 | all | DeepCache-10-b0 | 8 |") == 1 and "| fd10 | scale_shift | FD-10 |" in front
    assert "| trained worse |" in front and _cache_aware(study) == ""


def test_every_frontier_runs_arms_are_found_under_a_run_root(tmp_path) -> None:
    from fcr.analysis.cache_aware import study_rows_under
    from fcr.contract import CACHE_AWARE_CONTRASTS

    assert study_rows_under(tmp_path).empty
    row = {"family": "all", "arm": "ca_dc10", "config": "DeepCache-10-b0", "endpoint": "psnr", "replicates": 3,
           "original_model": "base", "original": 27.0, "trained": 27.5, "n": 384, "estimate": 0.5, "ci_lo": 0.2,
           "ci_hi": 0.8, "p": 0.001, "sd_diff": 1.0, "run_estimates": "0.4; 0.5; 0.6", "run_sd": 0.1, "m": 3,
           "p_holm": 0.003, "mde": 0.17, "verdict": "better"}
    folder = tmp_path / "exp-3-cache-aware" / "frontier" / "cache_aware"
    folder.mkdir(parents=True)
    pd.DataFrame([row]).to_csv(folder / CACHE_AWARE_CONTRASTS, index=False)
    found = study_rows_under(tmp_path)
    assert len(found) == 1 and found.loc[0, "experiment"] == "exp-3-cache-aware"
    assert found.loc[0, "decision"] == "trained better" and found.loc[0, "n_runs"] == 3


def test_fd_infinity_of_an_arm_against_the_originals_full_sampling(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from fcr.analysis.cache_aware import fd_infinity_noninferiority
    from fcr.analysis.paired import quality_stem
    from fcr.contract import QUALITY

    gen = torch.Generator().manual_seed(0)
    (tmp_path / "reference").mkdir()
    (tmp_path / "quality").mkdir()
    save_file({"features": torch.randn(2000, 4, generator=gen, dtype=torch.float64)},
              str(tmp_path / "reference" / "fashioncnn.safetensors"))
    # Mean shift from the reference per cell: FD grows with its square (4 dims).
    shifts = {("base", "full"): 1.0, ("base", "DeepCache-10-b0"): 1.5, ("near", "DeepCache-10-b0"): 0.5,
              ("near_seed1", "DeepCache-10-b0"): 0.5, ("far", "FD-10"): 2.0, ("base", "FD-10"): 1.2}
    rows = []
    for (model, config), shift in shifts.items():
        for seed in range(4):
            feats = torch.randn(100, 4, generator=gen, dtype=torch.float64) + shift
            save_file({"features": feats, "correct": torch.ones(100, dtype=torch.float64)},
                      str(tmp_path / "quality" / f"{quality_stem(model, config, seed)}.safetensors"))
            rows.append({"model": model, "config": config, "seed": seed})
    pd.DataFrame(rows).to_csv(tmp_path / QUALITY, index=False)
    out = fd_infinity_noninferiority(tmp_path, {"near": ("DeepCache-10-b0", ["near", "near_seed1"]),
                                                "far": ("FD-10", ["far"])}, "base").set_index("arm")
    assert out.loc["near", "runs"] == 2 and out.loc["far", "runs"] == 1 and np.isnan(out.loc["far", "run_sd"])
    assert out.loc["near", "fd_inf"] < out.loc["near", "fd_inf_hi"]
    assert out.loc["near", "fd_inf"] < out.loc["near", "full_fd_inf"] < out.loc["far", "fd_inf"]
    assert out.loc["near", "original_fd_inf"] > out.loc["near", "full_fd_inf"]  # base's DeepCache cell: shift 1.5
    assert bool(out.loc["near", "non_inferior"]) and not bool(out.loc["far", "non_inferior"])


def test_the_report_shows_each_frontier_runs_fd_infinity_table(tmp_path) -> None:
    from fcr import contract
    from fcr.report.sections import frontier_sections

    run = tmp_path / "exp-3-cache-aware" / "frontier" / "cache_aware"
    run.mkdir(parents=True)
    pd.DataFrame([{"budget": "DeepCache-10-b0", "series": "base · DeepCache b0", "cost_column": "flops_per_image"}]
                 ).to_csv(run / contract.MATCHED_COST, index=False)
    assert not any("FD∞" in part for part in frontier_sections(tmp_path))
    pd.DataFrame([{"arm": "ca_dc10", "config": "DeepCache-10-b0", "fd_inf": 11.0, "fd_inf_hi": 11.5,
                   "full_fd_inf": 10.6, "non_inferior": False}]).to_csv(run / contract.CACHE_AWARE_FD_INF, index=False)
    text = "\n".join(frontier_sections(tmp_path))
    assert "exp-3-cache-aware" in text and "FD∞ (secondary" in text and "| ca_dc10 |" in text


def test_fd_infinity_reads_nan_where_a_cell_has_too_few_images(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from fcr.analysis.cache_aware import fd_infinity_noninferiority
    from fcr.analysis.paired import quality_stem
    from fcr.contract import QUALITY

    (tmp_path / "reference").mkdir()
    (tmp_path / "quality").mkdir()
    save_file({"features": torch.randn(500, 4, dtype=torch.float64)}, str(tmp_path / "reference" / "f.safetensors"))
    rows = []
    for model, config in (("base", "full"), ("base", "FD-10"), ("ca", "FD-10")):
        save_file({"features": torch.randn(5, 4, dtype=torch.float64), "correct": torch.ones(5, dtype=torch.float64)},
                  str(tmp_path / "quality" / f"{quality_stem(model, config, 0)}.safetensors"))
        rows.append({"model": model, "config": config, "seed": 0})
    pd.DataFrame(rows).to_csv(tmp_path / QUALITY, index=False)
    out = fd_infinity_noninferiority(tmp_path, {"ca": ("FD-10", ["ca"])}, "base")
    assert np.isnan(out.loc[0, "fd_inf"]) and out.loc[0, "non_inferior"] is None
