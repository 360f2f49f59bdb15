"""The study layer (issue #12): paired fidelity endpoints, Holm, the power of paired designs, the
manifest's pre-registered study, and the contrasts evaluated from sweep side files.

The side files here are built from seeded tensors to test the statistics' code paths (never results).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from fcr import contract
from fcr.eval.fidelity import PSNR_CAP_DB, embedding_drift, feature_distance, fidelity, pixel_fidelity
from fcr.eval.results import save_safetensors_atomic
from fcr.stats import holm, paired_mde, paired_n
from fcr.analysis.contrasts import evaluate_contrasts, safe_strides, select_lambda
from fcr.analysis.paired import load_fidelity
from fcr.experiments.paired_fidelity import fidelity_table
from fcr.experiments.sweep import quality_stem
from fcr.manifest import ManifestError, Study, load_manifest

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- fidelity endpoints


def test_pixel_fidelity_matches_its_definitions() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 1, 16, 16, generator=gen) * 2 - 1
    noisy = ref + 0.1 * torch.randn(ref.shape, generator=gen)
    out = pixel_fidelity(noisy, ref)
    rmse = (noisy - ref).double().pow(2).flatten(1).mean(1).sqrt()
    assert torch.allclose(out["rmse"], rmse)
    assert torch.allclose(out["psnr"], 20 * torch.log10(2.0 / rmse))
    assert bool(((out["ssim"] > 0) & (out["ssim"] < 1)).all())
    same = pixel_fidelity(ref, ref)
    assert bool((same["rmse"] == 0).all() and (same["psnr"] == PSNR_CAP_DB).all())
    assert torch.allclose(same["ssim"], torch.ones(3, dtype=torch.float64))
    worse = pixel_fidelity(ref + 0.3 * torch.randn(ref.shape, generator=gen), ref)
    assert bool((worse["psnr"] < out["psnr"]).all() and (worse["ssim"] < out["ssim"]).all())
    with pytest.raises(ValueError, match="shape"):
        pixel_fidelity(ref, ref[:2])


def test_feature_and_embedding_distances() -> None:
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert torch.allclose(feature_distance(a, torch.zeros(2, 2)), torch.tensor([5.0, 1.0], dtype=torch.float64))
    # Embeddings are compared after normalisation: a rescaled embedding has no drift.
    assert torch.allclose(embedding_drift(a, 10 * a), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    drift = embedding_drift(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert math.isclose(float(drift), 1.0)  # sqrt(((1-0)^2 + (0-1)^2) / 2)
    with pytest.raises(ValueError, match="share no per-image tensor"):
        fidelity({"clip_score": torch.ones(2)}, {"clip_score": torch.ones(2)})


# ----------------------------------------------------------------------------- multiplicity and power


def test_holm_equals_statsmodels_and_skips_nan() -> None:
    p = [0.01, 0.04, 0.03, 0.5, 0.002, 0.2]
    assert np.allclose(holm(p), multipletests(p, method="holm")[1])
    with_nan = holm([0.01, math.nan, 0.04])
    assert math.isnan(with_nan[1])
    assert np.allclose(with_nan[[0, 2]], multipletests([0.01, 0.04], method="holm")[1])


@pytest.mark.parametrize("n", [5, 30, 200])
def test_paired_mde_is_the_noncentral_t_solution(n: int) -> None:
    for alpha, power in ((0.05, 0.8), (0.01, 0.9)):
        d = TTestPower().solve_power(nobs=n, alpha=alpha, power=power)
        assert paired_mde(2.0, n, alpha, power) == pytest.approx(2.0 * d, rel=1e-5)
    n_needed = paired_n(1.0, 0.3)
    assert paired_mde(1.0, n_needed) <= 0.3 < paired_mde(1.0, n_needed - 1)


# ----------------------------------------------------------------------------- manifest


def _manifest_with_study(tmp_path: Path, study: dict) -> Path:
    raw = yaml.safe_load((REPO / "params" / "experiments.yaml").read_text())
    raw["experiments"][0]["settings"]["embedded"]["study"] = study
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def test_manifest_study_is_validated(tmp_path: Path) -> None:
    plan = load_manifest(_manifest_with_study(tmp_path, {"alpha": 0.05, "strides": ["FD-10"]}), REPO)
    backbone = plan["exp-1-main-ablation"].settings["embedded"].backbones[0]
    assert backbone.study == Study(alpha=0.05, strides=("FD-10",))
    for bad, match in (({"alpah": 0.05}, "unknown keys"), ({"primary_endpoint": "fid"}, "primary_endpoint"),
                       ({"alpha": "5e-2"}, "expected a number"), ({"power": 1.5}, "alpha and power"),
                       ({"selection_run": "nope"}, "no 03_stride_sweep run named 'nope'")):
        with pytest.raises(ManifestError, match=match):
            load_manifest(_manifest_with_study(tmp_path, bad), REPO)


# ----------------------------------------------------------------------------- contrasts on a built sweep


N, D = 40, 8


def _write_cell(out: Path, model: str, config: str, seed: int, images: torch.Tensor, features: torch.Tensor,
                correct: torch.Tensor, prompts: list[str]) -> None:
    save_safetensors_atomic(
        {"images": ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), "features": features,
         "correct": correct},
        out / "quality" / f"{quality_stem(model, config, seed)}.safetensors",
        {"model": model, "config": config, "seed": str(seed), "prompts": json.dumps(prompts)},
    )


@pytest.fixture()
def sweep(tmp_path: Path) -> dict:
    """A sweep folder: base, control and fcr at full / FD-5 / FD-10 / FD-20, one seed. The fcr model's
    cached images stay much closer to its full images than the control's do (a large paired effect)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [f"prompt {i}" for i in range(N)]
    ref_feats = torch.randn(500, D, generator=gen, dtype=torch.float64)
    save_safetensors_atomic({"features": ref_feats}, tmp_path / "reference" / "ref.safetensors", {})
    rows = []
    noise = {"full": 0.0, "FD-5": 0.02, "FD-10": 0.05, "FD-20": 0.2}
    for model, scale in (("base", 1.0), ("control", 1.0), ("fcr", 0.3)):
        full = torch.rand(N, 1, 8, 8, generator=gen) * 1.6 - 0.8
        feats = torch.randn(N, D, generator=gen, dtype=torch.float64)
        for config, level in noise.items():
            eps = torch.randn(full.shape, generator=gen) * level * scale
            drift = torch.randn(N, D, generator=gen, dtype=torch.float64) * level * 20 * scale
            _write_cell(tmp_path, model, config, 0, full + eps, feats + drift, torch.ones(N, dtype=torch.float64),
                        prompts)
            stride = {"full": 1, "FD-5": 5, "FD-10": 10, "FD-20": 20}[config]
            rows.append({"model": model, "config": config, "seed": 0, "stride": stride})
    quality = pd.DataFrame(rows)
    origins = {"control": "base", "fcr": "base"}
    fid = fidelity_table(tmp_path, quality, origins, n_boot=50)
    return {"out": tmp_path, "quality": quality, "fidelity": fid}


def test_fidelity_table_pairs_cells_with_their_references(sweep: dict) -> None:
    fid = sweep["fidelity"].set_index(["model", "config", "reference"])
    assert ("base", "FD-10", "original_full") not in fid.index  # an original is its own reference
    assert fid.loc[("fcr", "FD-10", "original_full"), "reference_model"] == "base"
    assert fid.loc[("fcr", "FD-10", "own_full"), "psnr"] > fid.loc[("control", "FD-10", "own_full"), "psnr"]
    assert (fid["n_images"] == N).all()
    # Full sampling is compared with the original's full only: a fine-tune's uncached point.
    assert {(m, r) for m, c, r in fid.index if c == "full"} == {("control", "original_full"), ("fcr", "original_full")}
    per_image = load_fidelity(sweep["out"], "fcr", "FD-10", 0, "own_full")
    assert per_image["psnr"].shape == (N,)
    assert float(per_image["psnr"].mean()) == pytest.approx(fid.loc[("fcr", "FD-10", "own_full"), "psnr"])


def test_fidelity_refuses_cells_of_other_prompts(sweep: dict) -> None:
    out, quality = sweep["out"], sweep["quality"]
    cell = torch.zeros(N, 1, 8, 8)
    _write_cell(out, "control", "full", 0, cell, torch.zeros(N, D, dtype=torch.float64), torch.ones(N), ["x"] * N)
    with pytest.raises(ValueError, match="same prompts"):
        fidelity_table(out, quality, {}, n_boot=10)


def test_contrasts_detect_a_large_effect_and_say_when_not(sweep: dict) -> None:
    study = Study(strides=("FD-10", "FD-20"), n_boot=200)
    out, quality = sweep["out"], sweep["quality"]
    table = evaluate_contrasts(out, quality, original="base", fcr_models={0.1: "fcr"}, control="control",
                               study=study)
    primary = table[table["family"] == "primary"].set_index("config")
    assert (primary["m_tests"] == 2).all()
    assert (primary["decision"] == "FCR better").all(), primary["decision"].tolist()
    assert (primary["p_holm"] >= primary["p"]).all()
    # The same model on both sides: zero differences, nothing to detect.
    same = evaluate_contrasts(out, quality, original="base", fcr_models={0.1: "control"}, control="control",
                              study=study)
    assert same[same["family"] == "primary"]["decision"].str.startswith("not detectable at n = 40").all()
    secondary = table[table["family"] == "secondary"]
    assert set(secondary["endpoint"]) == {"fd_increase_pct", "alignment_change_pct"}
    assert (secondary["m_tests"] == 4).all()
    fd10 = secondary[(secondary["config"] == "FD-10") & (secondary["endpoint"] == "fd_increase_pct")].iloc[0]
    assert fd10["lo"] <= fd10["estimate"] <= fd10["hi"]


def test_selection_and_safe_strides(sweep: dict) -> None:
    study = Study(strides=("FD-10",), n_boot=200)
    out, quality = sweep["out"], sweep["quality"]
    assert select_lambda(out, quality, {0.05: "control", 0.1: "fcr"}, "control", study) == (0.1, "fcr")
    safe = safe_strides(out, quality, ["base", "fcr"], study)
    assert set(safe["stride"]) == {10, 20}
    from fcr.analysis.contrasts import fd_infinity_table

    fd = fd_infinity_table(out, quality, ["base", "fcr"]).set_index(["model", "config"])
    assert len(fd) == 8 and (fd["n"] == N).all()
    # The fixture's fcr features drift less from its full-sampling features at every stride.
    assert fd.loc[("fcr", "FD-20"), "fd_at_n"] < fd.loc[("base", "FD-20"), "fd_at_n"]
    by_model = safe.groupby("model")[["safe_stride", "first_unsafe"]].first()
    assert by_model.loc["base", "safe_stride"] >= 5
    # fcr's drift is smaller at every stride, so it is at least as safe as base.
    assert by_model.loc["fcr", "safe_stride"] >= by_model.loc["base", "safe_stride"]


def test_power_table_sizes_from_the_pilot_spread(sweep: dict) -> None:
    from fcr.analysis.contrasts import power_table

    study = Study(strides=("FD-10",), n_boot=100)
    table = evaluate_contrasts(sweep["out"], sweep["quality"], original="base", fcr_models={0.1: "fcr"},
                               control="control", study=study)
    assert table["sd_diff"].notna().any()
    sizes = power_table(table, [40, 160])
    primary = sizes[sizes["family"] == "primary"].set_index("n")
    # Four times the pairs halves the minimal detectable effect (to the t distribution's small-n slack).
    assert primary.loc[160, "mde"] < primary.loc[40, "mde"] / 1.9
    assert primary.loc[40, "mde"] == pytest.approx(table[table["family"] == "primary"]["mde"].iloc[0])


def test_primary_contrast_averages_training_replicates(sweep: dict) -> None:
    """Replicate k of FCR pairs with replicate k of the control; the estimate is the mean of the
    replicate pairs' estimates (a mean of per-image means), and a second replicate pair with no
    effect halves it."""
    out, quality = sweep["out"], sweep["quality"]
    gen = torch.Generator().manual_seed(1)
    prompts = [f"prompt {i}" for i in range(N)]
    rows = []
    for model in ("control_r1", "fcr_r1"):  # both like the control: this replicate pair has no effect
        full = torch.rand(N, 1, 8, 8, generator=gen) * 1.6 - 0.8
        for config, level in (("full", 0.0), ("FD-10", 0.05)):
            eps = torch.randn(full.shape, generator=gen) * level
            _write_cell(out, model, config, 0, full + eps, torch.zeros(N, D, dtype=torch.float64),
                        torch.ones(N, dtype=torch.float64), prompts)
            rows.append({"model": model, "config": config, "seed": 0, "stride": 1 if config == "full" else 10})
    quality = pd.concat([quality, pd.DataFrame(rows)], ignore_index=True)
    fidelity_table(out, quality, {"control_r1": "base", "fcr_r1": "base"}, n_boot=10)
    study = Study(strides=("FD-10",), n_boot=100)
    one = evaluate_contrasts(out, quality, original="base", fcr_models={0.1: "fcr"}, control="control", study=study)
    two = evaluate_contrasts(out, quality, original="base", fcr_models={0.1: "fcr"}, control="control", study=study,
                             replicates={"fcr": ["fcr_r1"], "control": ["control_r1"]})
    p1 = one[one["family"] == "primary"].iloc[0]
    p2 = two[two["family"] == "primary"].iloc[0]
    assert p1["n_runs"] == 1 and p2["n_runs"] == 2 and p2["n"] == N
    runs = [float(x) for x in p2["run_estimates"].split("; ")]
    assert runs[0] == pytest.approx(p1["estimate"], rel=1e-3)  # printed to 4 significant digits
    assert p2["estimate"] == pytest.approx(np.mean(runs), rel=1e-3)
    assert abs(runs[1]) < abs(runs[0]) / 3 and p2["run_sd"] > 0


def test_manifest_replicates_are_validated(tmp_path: Path) -> None:
    study_manifest = REPO / "params" / "study" / "experiments.yaml"
    backbone = load_manifest(study_manifest, REPO)["exp-1-main-ablation"].settings["embedded"].backbones[0]
    assert backbone.replicates["fcr_lambda0.10_fd10"] == ("fcr_lambda0.10_fd10_seed1", "fcr_lambda0.10_fd10_seed2")
    raw = yaml.safe_load(study_manifest.read_text())
    spec = raw["experiments"][0]["settings"]["embedded"]["backbones"][0]
    for bad, match in (({"base": ["x"]}, "not one of the backbone's fine-tunes"),
                       ({"control_lambda0_fd10": []}, "non-empty list"),
                       ({"control_lambda0_fd10": ["control_lambda0_fd10_seed1"],
                         "fcr_lambda0.10_fd10": ["fcr_lambda0.10_fd10_seed1", "fcr_lambda0.10_fd10_seed2"]},
                        "same number of replicates"),
                       ({"control_lambda0_fd10": ["not_swept"]}, "must all be evaluated")):
        spec["replicates"] = bad
        path = tmp_path / "experiments.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
        with pytest.raises(ManifestError, match=match):
            load_manifest(path, REPO)


def test_summary_power_and_criterion_a_read_the_contrasts(sweep: dict, tmp_path: Path) -> None:
    from fcr.manifest import Backbone
    from fcr.analysis.quality_cost import criterion_a
    from fcr.report.study import StudyTables, power_section, study_summary

    study = Study(strides=("FD-10", "FD-20"), n_boot=200)
    out, quality = sweep["out"], sweep["quality"]
    table = evaluate_contrasts(out, quality, original="base", fcr_models={0.1: "fcr"}, control="control",
                               study=study).assign(backbone="base", experiment="exp")
    safe = safe_strides(out, quality, ["base", "control", "fcr"], study).assign(backbone="base", experiment="exp")
    lines = "\n".join(study_summary(StudyTables(table, safe, [], pd.DataFrame())))
    assert "Primary (superiority, FCR vs the λ = 0 control)**: 2 of 2 tests decided" in lines
    primary = table[table["family"] == "primary"].iloc[0]
    assert f"(n = {N})" in lines and "**FCR better**" in lines and "Not supported" not in lines
    assert "Safe stride" in lines
    nothing = "\n".join(study_summary(StudyTables(table.assign(p_holm=math.nan), safe, [], pd.DataFrame())))
    assert "No pre-registered contrast could be evaluated" in nothing
    by_model = safe.groupby("model")["safe_stride"].first()
    assert f"Safe-stride gain** of fcr over base: {int(by_model['fcr']) - int(by_model['base']):+d}" in lines
    power = "\n".join(power_section(table))
    # A detected effect needs no more pairs than the run had.
    last_row = [line for line in power.splitlines() if line.startswith("|")][-1]
    needed = int(last_row.strip("|").split("|")[-1])
    assert 2 <= needed <= N
    from fcr.analysis.rows import format_number

    assert f"| {N} | {format_number(primary['sd_diff'])} |" in power
    b = Backbone("base", "role", "exp", {0.1: "fcr"}, "control", study=study)
    rows, model, passed = criterion_a(tmp_path, b, "FD-10", "FD-5", table, safe)
    assert model == "fcr" and rows[0]["kind"] == "criterion"
    context = [r for r in rows if r["kind"] == "context"]
    assert [r["scope"].split(": ")[1] for r in context] == ["original model, plain FD caching (base) at FD-10",
                                                              "λ = 0 control (control) at FD-10"]
    base10 = safe[(safe["model"] == "base") & (safe["stride"] == 10)].iloc[0]
    assert f"{base10['fd_increase_pct']:+.3g}" in context[0]["measured"]


def test_length_contrasts_run_the_primary_test_at_each_length(sweep: dict) -> None:
    from fcr.analysis.contrasts import length_contrasts

    out, quality = sweep["out"], sweep["quality"]
    quality.to_csv(out / "quality.csv", index=False)
    study = Study(strides=("FD-10", "FD-20"), n_boot=200)
    table = length_contrasts([(150, out, "fcr", "control"), (600, out / "not_run", "fcr", "control")], study)
    assert list(table["train_steps"]) == [150, 150] and list(table["config"]) == ["FD-10", "FD-20"]
    assert (table["m_tests"] == 2).all() and (table["decision"] == "FCR better").all()
    a = load_fidelity(out, "fcr", "FD-10", 0, "own_full")["psnr"].double().numpy()
    c = load_fidelity(out, "control", "FD-10", 0, "own_full")["psnr"].double().numpy()
    row = table.iloc[0]
    assert row["estimate"] == pytest.approx(a.mean() - c.mean()) and row["fcr_mean"] == pytest.approx(a.mean())
    assert length_contrasts([], study).empty


def test_manifest_length_models_are_validated(tmp_path: Path) -> None:
    study_manifest = REPO / "params" / "study" / "experiments.yaml"
    raw = yaml.safe_load(study_manifest.read_text())
    spec = raw["experiments"][0]["settings"]["embedded"]["backbones"][0]
    for key, bad, match in (("length_models", {600: ["base", "not_swept"]}, "expected \\[FCR model, control model\\]"),
                            ("length_models", {"600": ["a", "b"]}, "numbers of training steps"),
                            ("length_run", "nope", "no 03_stride_sweep run named 'nope'")):
        spec_copy = dict(spec, **{key: bad})
        raw["experiments"][0]["settings"]["embedded"]["backbones"][0] = spec_copy
        path = tmp_path / "experiments.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
        with pytest.raises(ManifestError, match=match):
            load_manifest(path, REPO)


def test_variant_contrasts_pair_arms_across_sweep_folders_only_on_the_same_prompts(sweep: dict, tmp_path: Path) -> None:
    import shutil

    from fcr.analysis.contrasts import variant_contrasts

    out, quality = sweep["out"], sweep["quality"]
    quality.to_csv(out / "quality.csv", index=False)
    other = tmp_path / "ablation_sweep"  # the FCR arm in its own run folder, the control in the main one
    other.mkdir()
    shutil.copytree(out / "quality", other / "quality")
    shutil.copy(out / contract.FIDELITY_PER_IMAGE, other / contract.FIDELITY_PER_IMAGE)
    quality.to_csv(other / "quality.csv", index=False)
    study = Study(strides=("FD-10", "FD-20"), n_boot=200)
    same = variant_contrasts([("one folder", out, "fcr", out, "control")], study)
    cross = variant_contrasts([("two folders", other, "fcr", out, "control")], study)
    cols = ["config", "n", "estimate", "lo", "hi", "p"]
    assert cross[cols].equals(same[cols]) and list(cross["variant"]) == ["two folders"] * 2
    # A folder whose cells sampled other prompts does not pair.
    gen = torch.Generator().manual_seed(1)
    _write_cell(other, "fcr", "FD-10", 0, torch.rand(N, 1, 8, 8, generator=gen), torch.randn(N, D, generator=gen,
                dtype=torch.float64), torch.ones(N, dtype=torch.float64), [f"other {i}" for i in range(N)])
    with pytest.raises(ValueError, match="other prompts"):
        variant_contrasts([("two folders", other, "fcr", out, "control")], study)


def test_manifest_ablation_models_are_validated(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "params" / "study" / "experiments.yaml").read_text())
    spec = raw["experiments"][0]["settings"]["embedded"]["backbones"][0]
    backbone = load_manifest(REPO / "params" / "study" / "experiments.yaml", REPO)["exp-1-main-ablation"] \
        .settings["embedded"].backbones[0]
    assert backbone.ablation_run == "ablation"
    assert dict(backbone.ablation_models) == {"delta_max 20": "fcr_lambda0.10_dmax20"}
    for key, bad, match in (("ablation_models", {"delta_max 20": "not_swept"}, "expected an FCR model"),
                            ("ablation_run", "nope", "no 03_stride_sweep run named 'nope'")):
        raw["experiments"][0]["settings"]["embedded"]["backbones"][0] = dict(spec, **{key: bad})
        path = tmp_path / "experiments.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
        with pytest.raises(ManifestError, match=match):
            load_manifest(path, REPO)


def test_criterion_c_difference_in_differences_from_the_manifest_backbone(tmp_path: Path) -> None:
    from fcr.manifest import Backbone
    from fcr.analysis.robustness_criterion import C_NAME, DID_NAME, criterion_c_rows
    from fcr.analysis.rows import result_dir
    from fcr.analysis.study import stress_did_table
    from fcr.report.study import stress_section

    # Per image by hand (code path only): FCR's two replicates lose 0.2 dB under OOD prompts, the
    # original and the control 1.0 dB; under high resolution FCR loses 3 dB more than both.
    rng = np.random.default_rng(0)
    n, rows = 30, []
    drops = {"ood_prompts": {"fcr": 0.2, "fcr_s1": 0.2, "base": 1.0, "control": 1.0, "control_s1": 1.0},
             "high_resolution": {"fcr": 4.0, "fcr_s1": 4.0, "base": 1.0, "control": 1.0, "control_s1": 1.0}}
    for model in ("base", "fcr", "fcr_s1", "control", "control_s1"):
        for stress in ("none", *drops):
            drop = 0.0 if stress == "none" else drops[stress][model]
            psnr = 25.0 - drop + rng.normal(0, 0.3, n)
            rows += [{"model": model, "config": "FD-10", "stress": stress, "seed": 0, "image": i,
                      "prompt": f"{stress} prompt {i}", "psnr": v} for i, v in enumerate(psnr)]
    folder = result_dir(tmp_path, "exp", "robustness", "stress")
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / contract.STRESS_FIDELITY, index=False)
    study = Study(strides=("FD-10",), stress_margin=0.5)
    b = Backbone("base", "role", "exp", {0.1: "fcr"}, "control", robustness_run="stress", study=study,
                 replicates={"fcr": ("fcr_s1",), "control": ("control_s1",)})
    table = stress_did_table(tmp_path, [b])
    assert len(table) == 4 and set(table["m_tests"]) == {4}  # 2 comparisons x 2 stresses, one Holm family
    assert set(table["model"]) == {"fcr+fcr_s1"} and set(table["vs_model"]) == {"base", "control+control_s1"}
    by = table.set_index(["comparison", "stress"])
    assert by.loc[("FCR vs original", "ood_prompts"), "decision"] == "no larger drop (margin 0.5)"
    assert by.loc[("FCR vs original", "high_resolution"), "decision"] == "larger drop"
    rows_c = criterion_c_rows([], [b], table)
    # The seed's definition is the criterion (n/a here: no notebook-04 criterion.csv); the difference
    # in differences is an additional analysis beside it that decides nothing.
    criterion = [r for r in rows_c if r["kind"] == "criterion"]
    assert len(criterion) == 1 and criterion[0]["criterion"] == C_NAME and criterion[0]["passed"] is None
    did = [r for r in rows_c if r["criterion"] == DID_NAME]
    assert len(did) == 1 and did[0]["kind"] == "context" and did[0]["passed"] is False
    assert did[0]["measured"].startswith("1 of 2 stresses non-inferior; worst: high_resolution")
    assert [r["kind"] for r in rows_c if "control" in r["criterion"]] == ["context"]
    table.to_csv(tmp_path / contract.STRESS_DID, index=False)
    lines = stress_section(tmp_path)
    assert "margin 0.5" in "\n".join(lines)
    # A run declaring more seeds than it holds is an interim look: shown, never decided.
    interim = stress_did_table(tmp_path, [replace(b, robustness_seeds=(0, 1, 2, 3))])
    assert set(table["look"]) == {"final"} and set(interim["look"]) == {"interim (1 of 4 declared seeds)"}
    assert interim[["estimate", "p_holm", "decision"]].equals(table[["estimate", "p_holm", "decision"]])
    interim.to_csv(tmp_path / contract.STRESS_DID, index=False)
    assert "interim (1 of 4 declared seeds)" in "\n".join(stress_section(tmp_path))
    looked = [r for r in criterion_c_rows([], [b], interim) if r["criterion"] == DID_NAME][0]
    assert looked["passed"] is None and "interim (1 of 4 declared seeds), not decided" in looked["measured"]
    assert looked["measured"].startswith("1 of 2 stresses non-inferior")
    assert set(stress_did_table(tmp_path, [replace(b, robustness_seeds=(0,))])["look"]) == {"final"}
    # Without the margin the study does not test criterion c: nothing is computed.
    assert stress_did_table(tmp_path, [Backbone("base", "role", "exp", {0.1: "fcr"}, "control",
                                                robustness_run="stress", study=Study())]).empty


def test_manifest_reads_the_robustness_runs_declared_seeds() -> None:
    backbone = load_manifest(REPO / "params" / "study" / "experiments.yaml", REPO)["exp-1-main-ablation"] \
        .settings["embedded"].backbones[0]
    declared = yaml.safe_load((REPO / "params" / "study" / "stress.yaml").read_text())["seeds"]
    assert backbone.robustness_run == "stress" and list(backbone.robustness_seeds) == declared


def test_manifest_stress_margin_is_validated(tmp_path: Path) -> None:
    plan = load_manifest(_manifest_with_study(tmp_path, {"stress_margin": 0.5}), REPO)
    assert plan["exp-1-main-ablation"].settings["embedded"].backbones[0].study.stress_margin == 0.5
    for bad, match in (({"stress_margin": "5e-1"}, "expected a number"), ({"stress_margin": -0.5}, "positive margin")):
        with pytest.raises(ManifestError, match=match):
            load_manifest(_manifest_with_study(tmp_path, bad), REPO)


def _root_with_sweep_run(root: Path, sweep_dir: Path, run: str) -> Path:
    """A run root whose experiment ``exp`` has ``sweep_dir`` as its 03 run ``run``."""
    from fcr.analysis.rows import result_dir

    folder = result_dir(root, "exp", "sweep", run)
    folder.parent.mkdir(parents=True)
    folder.symlink_to(sweep_dir, target_is_directory=True)
    return root


def _sections(section, root: Path, backbones: list, out: Path) -> tuple[list[str], list[Path]]:
    """The analysis stage's study tables of ``root`` in ``out``, then ``section`` formatted from them:
    (its lines, the family files written besides the always-present ones)."""
    from fcr.analysis.run import write_study_tables

    _, files = write_study_tables(root, backbones, out)
    lines = section(backbones, out) if section.__name__ == "few_steps_section" else section(out)
    return lines, [f for f in files if f.name not in (contract.CONTRASTS, contract.SAFE_STRIDES, contract.FD_INFINITY,
                                                      contract.STRESS_DID)]


def test_regime_section_reads_the_frontier_sweep_of_a_backbone(sweep: dict, tmp_path_factory) -> None:
    from fcr.experiments.sweep import load_side_file
    from fcr.manifest import Backbone
    from fcr.report.study import regime_section

    out, quality = sweep["out"], sweep["quality"]
    # base's FD-50ls: its FD-5 images again (code path only), so it is trivially non-inferior to FD-5.
    cell = load_side_file(out / "quality" / f"{quality_stem('base', 'FD-5', 0)}.safetensors")
    _write_cell(out, "base", "FD-50ls", 0, cell["images"].float() / 127.5 - 1, cell["features"], cell["correct"],
                [f"prompt {i}" for i in range(N)])
    quality = pd.concat([quality, pd.DataFrame([{"model": "base", "config": "FD-50ls", "seed": 0, "stride": None}])],
                        ignore_index=True)
    quality.to_csv(out / contract.QUALITY, index=False)
    root = _root_with_sweep_run(tmp_path_factory.mktemp("root"), out, "frontier")
    study = Study(strides=("FD-10", "FD-20"), n_boot=200)
    b = Backbone("base", "role", "exp", {0.1: "fcr"}, "control", frontier_run="frontier", study=study)
    lines, files = _sections(regime_section, root, [b], tmp_path_factory.mktemp("report"))
    table = pd.read_csv(files[0])
    expected = safe_strides(out, quality, ["base", "control", "fcr"], study)
    got = table[table["stride"] > 0]
    assert list(got["safe_stride"]) == list(expected["safe_stride"])
    ls = table[table["config"] == "FD-50ls"]
    assert list(ls["model"]) == ["base"] and bool(ls["non_inferior"].iloc[0])
    assert ls["fd_increase_pct"].iloc[0] == pytest.approx(0.0, abs=1e-9)
    assert "FD-50ls" in "\n".join(lines)
    assert _sections(regime_section, root, [Backbone("base", "role", "exp", {0.1: "fcr"}, "control", study=study)],
                     tmp_path_factory.mktemp("none")) == ([], [])


def test_few_steps_section_tests_fcr_vs_control_at_every_stride_it_sampled(sweep: dict, tmp_path_factory) -> None:
    from fcr.analysis.contrasts import variant_contrasts
    from fcr.manifest import Backbone
    from fcr.report.study import few_steps_section

    out, quality = sweep["out"], sweep["quality"]
    quality.assign(num_inference_steps=25).to_csv(out / contract.QUALITY, index=False)
    root = _root_with_sweep_run(tmp_path_factory.mktemp("root"), out, "steps25")
    study = Study(strides=("FD-10", "FD-20"), n_boot=200)
    b = Backbone("base", "role", "exp", {0.1: "fcr"}, "control", few_steps_run="steps25", study=study)
    report = tmp_path_factory.mktemp("report")
    lines, files = _sections(few_steps_section, root, [b], report)
    table = pd.read_csv(report / contract.FEW_STEPS_CONTRASTS)
    # Every uniform stride above 1 the run sampled, one Holm family; the same numbers as the direct test.
    assert list(table["config"]) == ["FD-5", "FD-10", "FD-20"] and (table["m_tests"] == 3).all()
    assert (table["variant"] == "25-step sampling").all() and (table["decision"] == "FCR better").all()
    all_strides = Study(strides=("FD-5", "FD-10", "FD-20"), n_boot=200)
    direct = variant_contrasts([("x", out, "fcr", out, "control")], all_strides)
    assert table["estimate"].tolist() == pytest.approx(direct["estimate"].tolist())
    safe = pd.read_csv(report / contract.FEW_STEPS_SAFE_STRIDES)
    expected = safe_strides(out, quality, ["base", "control", "fcr"], study)
    assert list(safe["safe_stride"]) == list(expected["safe_stride"]) and set(safe["sampler"]) == {"25-step sampling"}
    assert "Few-step sampler regime" in lines[0] and len(files) == 2
    # Declared but not run: the section says so; not declared: nothing.
    b_missing = Backbone("base", "role", "exp", {0.1: "fcr"}, "control", few_steps_run="not_run", study=study)
    lines, files = _sections(few_steps_section, root, [b_missing], tmp_path_factory.mktemp("empty"))
    assert "Not run yet" in "\n".join(lines) and files == []
    assert _sections(few_steps_section, root, [Backbone("base", "role", "exp", {0.1: "fcr"}, "control", study=study)],
                     tmp_path_factory.mktemp("none")) == ([], [])


def test_manifest_few_steps_run_is_validated(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "params" / "study" / "experiments.yaml").read_text())
    setting = raw["experiments"][0]["settings"]["embedded"]
    spec = setting["backbones"][0]
    for run_models, run_name, match in (([spec["original"]], "steps25", "must evaluate"),
                                        (None, "nope", "no 03_stride_sweep run named 'nope'")):
        notebooks = [n for n in setting["notebooks"] if n.get("run") != "steps25"]
        if run_models is not None:
            notebooks.append({"notebook": "03_stride_sweep", "run": "steps25", "params": [], "models": run_models})
        raw["experiments"][0]["settings"]["embedded"] = dict(setting, notebooks=notebooks,
                                                             backbones=[dict(spec, few_steps_run=run_name)])
        path = tmp_path / "experiments.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
        with pytest.raises(ManifestError, match=match):
            load_manifest(path, REPO)
