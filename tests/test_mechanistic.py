"""Feature variance across timestep gaps, its reduction, quality drops and the regression.

UNets here are tiny random models and the images random tensors: code paths only, never results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import make_unet

from fcr.config import to_options
from fcr.core.loss import feature_distance
from fcr.core.unet import FEATURE_GROUPS, EncoderFeatures
from fcr.eval.results import StaleResultError
from fcr.experiments import feature_variance as fv
from fcr.experiments.feature_variance import (
    ModelVariance,
    VarianceInputs,
    gap_timesteps,
    measure_feature_variance,
    per_sample_feature_distance,
    run_variance,
    sampling_grid,
    variance_draws,
)
from fcr.experiments.mechanistic import (
    fit_regressions,
    load_quality_tables,
    mechanistic_criterion,
    quality_drops,
    regression_points,
    regression_report,
    variance_reduction,
    variance_table,
)
from fcr.backends.generate import sampling_scheduler
from fcr.backends.models import build_noise_scheduler

SIZE = 16


def _inputs(n: int = 3, seed: int = 0) -> VarianceInputs:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1
    states = torch.randn(n, 4, 384, generator=g)
    return VarianceInputs(x0, states, np.arange(n), np.zeros(n, dtype=np.int64))


@pytest.fixture(scope="module")
def tiny():
    unet, _, _ = make_unet("embedded", seed=0, sample_size=SIZE)
    return unet


def test_zero_at_delta_zero_positive_otherwise_and_same_as_fcr_term(tiny) -> None:
    ns = build_noise_scheduler()
    inputs = _inputs()
    draws = variance_draws(3, (1, SIZE, SIZE), seed=0)
    grid = sampling_grid(ns, "ddim", 10)
    values = measure_feature_variance(tiny, ns, inputs, draws, deltas={"train": [0, 1, 20], "sampling": [0, 2]},
                                      grid=grid, batch_size=2)
    for units, deltas in (("train", [0, 1, 20]), ("sampling", [0, 2])):
        for d in deltas:
            for g in FEATURE_GROUPS:
                for v in ("abs", "norm"):
                    vals = values[(units, d, g, v)]
                    assert vals.shape == (3,)
                    if d == 0:
                        assert np.all(vals == 0.0), (units, g, v)
                    else:
                        assert np.all(vals > 0.0), (units, d, g, v)
    # Larger gaps move the features more (training-timestep units, same images and noise).
    assert values[("train", 20, "all", "norm")].mean() > values[("train", 1, "all", "norm")].mean()

    # The per-image distance averages to fcr.core.loss.feature_distance of the batch: the FCR term itself.
    g = torch.Generator().manual_seed(1)
    a = EncoderFeatures((torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 5, 4, 4, generator=g)),
                        torch.randn(4, 6, 2, 2, generator=g), False)
    b = a.map(lambda x: x + 0.3 * torch.randn(x.shape, generator=g))
    for idx in ([0, 1, 2], [2], [0]):
        for normalize in (False, True):
            per = per_sample_feature_distance(a, b, idx, normalize)
            assert per.shape == (4,)
            assert torch.allclose(per.mean(), feature_distance(a, b, idx, normalize), rtol=1e-5)
            alone = torch.stack([feature_distance(a.map(lambda x, i=i: x[i : i + 1]), b.map(lambda x, i=i: x[i : i + 1]),
                                                  idx, normalize) for i in range(4)])
            assert torch.allclose(per, alone, rtol=1e-5)  # batched vs one sample: float32 summation order


def _features(seed: int, scale: float = 1.0) -> tuple[EncoderFeatures, EncoderFeatures]:
    g = torch.Generator().manual_seed(seed)
    a = EncoderFeatures((torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 5, 4, 4, generator=g)),
                        torch.randn(6, 6, 2, 2, generator=g), False)
    b = a.map(lambda x: x + 0.2 * (seed + 1) * torch.randn(x.shape, generator=g))
    return a.map(lambda x: x * scale), b.map(lambda x: x * scale)


def _model_from_features(label: str, scale: float, original: str = "") -> ModelVariance:
    values = {}
    for units in ("train", "sampling"):
        for delta in (1, 2):
            a, b = _features(delta, scale)
            for group, idx in (("all", [0, 1, 2]), ("mid", [2])):
                values[(units, delta, group, "abs")] = per_sample_feature_distance(a, b, idx, False).double().numpy()
                values[(units, delta, group, "norm")] = per_sample_feature_distance(a, b, idx, True).double().numpy()
    return ModelVariance(label=label, source=label, values=values, original_model=original, original_label=original)


def test_normalised_variance_is_scale_invariant_and_reduction_sees_through_shrinking() -> None:
    a, b = _features(0)
    a3, b3 = _features(0, scale=3.0)
    idx = [0, 1, 2]
    assert torch.allclose(per_sample_feature_distance(a3, b3, idx, True), per_sample_feature_distance(a, b, idx, True),
                          rtol=1e-4)
    assert torch.allclose(per_sample_feature_distance(a3, b3, idx, False),
                          9 * per_sample_feature_distance(a, b, idx, False), rtol=1e-4)

    # A "fine-tuned" model whose features are the original's times 0.5: raw σ² falls by 75 %,
    # the normalised one does not move, so the primary test (normalised) does not pass.
    orig = _model_from_features("orig", 1.0)
    shrunk = _model_from_features("shrunk", 0.5, original="orig")
    red = variance_reduction([orig, shrunk], n_boot=50, seed=0)
    assert set(red["feature_group"]) == {"all", "mid"} and set(red["units"]) == {"train", "sampling"}
    assert len(red) == 4 and (red["model"] == "shrunk").all() and (red["original_model"] == "orig").all()
    assert np.allclose(red["reduction_pct_abs"], 75.0, atol=1e-3)
    assert np.allclose(red["reduction_pct"], 0.0, atol=1e-3)  # the normalised one: primary
    assert (red["reduction_pct_abs_lo"] <= red["reduction_pct_abs"] + 1e-6).all()
    assert (red["reduction_pct_abs"] <= red["reduction_pct_abs_hi"] + 1e-6).all()
    assert not red["passed_30pct"].any() and red["passed_30pct_abs"].all()

    table = variance_table([orig, shrunk], n_boot=50, seed=0)
    assert len(table) == 2 * 2 * 2 * 2 and table["n_images"].eq(6).all()
    row = table[(table["model"] == "orig") & (table["units"] == "train") & (table["delta"] == 1)
                & (table["feature_group"] == "all")].iloc[0]
    assert row["sigma2_lo"] <= row["sigma2"] <= row["sigma2_hi"]
    assert math.isclose(row["sigma2"], orig.values[("train", 1, "all", "abs")].mean(), rel_tol=1e-9)


def test_draws_are_seeded_per_image() -> None:
    a = variance_draws(5, (1, 4, 4), seed=3)
    b = variance_draws(5, (1, 4, 4), seed=3)
    assert torch.equal(a.noise, b.noise) and np.array_equal(a.u, b.u)
    first = variance_draws(2, (1, 4, 4), seed=3)  # image i's draws do not depend on how many images
    assert torch.equal(first.noise, a.noise[:2]) and np.array_equal(first.u, a.u[:2])
    other = variance_draws(5, (1, 4, 4), seed=4)
    assert not torch.equal(other.noise, a.noise)
    assert ((a.u >= 0) & (a.u < 1)).all()


def test_gaps_map_to_the_right_timesteps() -> None:
    ns = build_noise_scheduler()
    sched = sampling_scheduler("ddim", ns)
    sched.set_timesteps(10)
    grid = sampling_grid(ns, "ddim", 10)
    assert grid.tolist() == sched.timesteps.tolist()
    assert grid.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]  # DDIM 'leading', steps_offset 1
    u = np.linspace(0, 0.999999, 200)
    for delta in (1, 3, 9):
        t, t_prev = gap_timesteps("sampling", delta, u, 1000, grid)
        pos = [grid.tolist().index(x) for x in t.tolist()]
        pos_prev = [grid.tolist().index(x) for x in t_prev.tolist()]
        assert all(p2 - p1 == delta for p1, p2 in zip(pos, pos_prev))  # Δ steps apart on the grid
        assert set(pos) == set(range(10 - delta))  # every valid anchor is reachable
        assert (t - t_prev == 100 * delta).all()
    t, t_prev = gap_timesteps("sampling", 2, np.array([0.0]), 1000, grid)
    assert (t.item(), t_prev.item()) == (201, 1)  # u = 0: the least noisy valid anchor
    with pytest.raises(ValueError):
        gap_timesteps("sampling", 10, u, 1000, grid)

    t, t_prev = gap_timesteps("train", 7, u, 1000)
    assert (t - t_prev == 7).all() and t_prev.min() == 0 and t.max() == 999 and t.min() == 7
    # Other schedulers step through their own grids.
    dpm = sampling_grid(ns, "dpmsolver++", 10)
    assert len(dpm) == 10 and (dpm[:-1] > dpm[1:]).all()


def test_regression_on_a_known_line_and_the_criterion() -> None:
    x = np.array([0.1, 0.2, 0.4, 0.8])
    points = pd.DataFrame({
        "model": "m", "stress": "none", "stride": [2, 3, 4, 5], "n_seeds": 1,
        "fd_increase_pct": 3 + 50 * x, "class_accuracy_drop_pp": 1 - 2 * x,
        "sigma2_gap": 10 * x, "sigma2_norm_gap": x, "sigma2_stress": "none",
    })
    fits = fit_regressions(points)
    prim = fits[fits["primary"]].iloc[0]
    assert prim["status"] == "fitted" and prim["n"] == 4
    assert math.isclose(prim["slope"], 50, rel_tol=1e-9) and math.isclose(prim["r2"], 1.0, rel_tol=1e-9)
    assert math.isclose(prim["intercept"], 3, rel_tol=1e-9) and math.isclose(prim["pearson_r"], 1.0, rel_tol=1e-9)
    absolute = fits[(fits["y"] == "fd_increase_pct") & (fits["x"] == "sigma2_gap")].iloc[0]
    assert math.isclose(absolute["slope"], 5, rel_tol=1e-9)
    acc = fits[(fits["y"] == "class_accuracy_drop_pp") & (fits["x"] == "sigma2_norm_gap")].iloc[0]
    assert math.isclose(acc["slope"], -2, rel_tol=1e-9)

    reduction = pd.DataFrame({"model": ["ft"], "original_model": ["base"], "units": ["sampling"],
                              "feature_group": ["all"], "reduction_pct": [40.0]})
    crit = mechanistic_criterion(reduction, fits)
    assert crit["variance_reduced"] is True and crit["r2_passed"] is True and crit["passed"] is True
    crit = mechanistic_criterion(reduction.assign(reduction_pct=20.0), fits)
    assert crit["variance_reduced"] is False and crit["passed"] is False

    few = fit_regressions(points.iloc[:2])
    assert (few["status"] == "not enough points").all() and few["r2"].isna().all()
    crit = mechanistic_criterion(reduction, few)
    assert crit["r2"] is None and crit["passed"] is None
    report = regression_report(points.iloc[:2], few, crit, ["a note"])
    json.dumps(report, allow_nan=False)  # NaN becomes null: valid JSON
    assert report["status"] == "not enough points" and report["n_points"] == 2 and report["left_out"] == ["a note"]
    assert "r2" not in report  # no fit, no numbers
    report = regression_report(points, fits, mechanistic_criterion(reduction, fits), [])
    assert math.isclose(report["r2"], 1.0) and math.isclose(report["slope"], 50) and report["n"] == 4
    assert report["criterion"]["passed"] is True


def test_quality_drops_from_hand_made_tables(tmp_path: Path) -> None:
    sweep = pd.DataFrame({
        "model": ["m"] * 6, "config": ["full", "FD-5", "FD-50ls"] * 2, "seed": [0, 0, 0, 1, 1, 1],
        "stride": [1.0, 5.0, np.nan] * 2, "fd_fashioncnn": [10.0, 12.0, 99.0, 20.0, 30.0, 99.0],
        "class_accuracy": [0.9, 0.8, 0.1, 0.9, 0.7, 0.1], "num_inference_steps": 50, "scheduler": "ddim",
    })
    robust = pd.DataFrame({
        "model": ["m"] * 4, "config": ["full", "FD-5"] * 2, "seed": [0, 0, 0, 0],
        "stride": [1, 5, 1, 5], "stress": ["none", "none", "heldout_prompts", "heldout_prompts"],
        "fd_fashioncnn": [1.0, 5.0, 10.0, 11.0], "class_accuracy": [1.0, 1.0, 0.5, 0.4],
        "num_inference_steps": 50, "scheduler": "ddim",
    })
    sweep.to_csv(tmp_path / "quality.csv", index=False)
    robust.to_csv(tmp_path / "robustness.csv", index=False)
    q = load_quality_tables([tmp_path / "quality.csv", tmp_path / "robustness.csv"])
    assert set(q["stress"]) == {"none", "heldout_prompts"}
    drops = quality_drops(q).set_index(["stress", "stride"])
    assert len(drops) == 2
    none = drops.loc[("none", 5)]
    # Seed 0: +20 %, seed 1: +50 % -> 35 %; accuracy 10 and 20 points -> 15. The robustness
    # table's 'none' seed 0 duplicates the sweep's and is not used (the first table wins).
    assert math.isclose(none["fd_increase_pct"], 35.0) and math.isclose(none["class_accuracy_drop_pp"], 15.0)
    assert none["n_seeds"] == 2
    held = drops.loc[("heldout_prompts", 5)]
    assert math.isclose(held["fd_increase_pct"], 10.0) and math.isclose(held["class_accuracy_drop_pp"], 10.0)

    variance = pd.DataFrame({
        "model": "m", "feature_group": "all", "units": "sampling", "delta": [1, 2, 3, 4],
        "sigma2": [1.0, 2.0, 3.0, 4.0], "sigma2_norm": [0.1, 0.2, 0.3, 0.6],
    })
    points, notes = regression_points(drops.reset_index(), variance, 50, "ddim")
    assert len(points) == 2 and not notes
    assert np.allclose(points["sigma2_gap"], 2.5) and np.allclose(points["sigma2_norm_gap"], 0.3)
    assert (points["sigma2_stress"] == "none").all()  # stress rows use the unstressed σ²
    points, notes = regression_points(drops.reset_index(), variance[variance["delta"] < 4], 50, "ddim")
    assert points.empty and len(notes) == 2  # stride 5 needs Δ up to 4
    points, notes = regression_points(drops.reset_index(), variance, 20, "ddim")
    assert points.empty and "steps" in notes[0]

    dup = pd.concat([sweep, sweep.iloc[:1]])
    with pytest.raises(ValueError, match="ambiguous"):
        quality_drops(dup.assign(stress="none", table=0))


def _run_folder(root: Path, name: str, unet: torch.nn.Module, trained: dict) -> Path:
    folder = root / name
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(trained))
    return folder


def test_run_variance_pairs_models_and_skips_finished_results(tmp_path: Path, monkeypatch) -> None:
    orig_unet, _, _ = make_unet("embedded", seed=0, sample_size=SIZE)
    ft_unet, _, _ = make_unet("embedded", seed=1, sample_size=SIZE)
    orig = _run_folder(tmp_path, "orig", orig_unet, {"model": "scratch", "lambda_fcr": 0.0})
    ft = _run_folder(tmp_path, "ft", ft_unet, {"model": str(orig), "lambda_fcr": 0.5})
    params = to_options({
        "setting": "embedded", "device": "cpu", "seed": 0, "variance_models": [str(orig), str(ft)],
        "variance_delta_max": 2, "variance_max_stride": 2, "num_variance_images": 3,
        "num_inference_steps": 5, "scheduler": "ddim",
    })
    models = {"orig": str(orig), "ft": str(ft)}
    seen = []
    real = fv.measure_feature_variance

    def recording(unet, noise_scheduler, inputs, draws, **kw):
        seen.append((draws.noise.clone(), draws.u.copy(), inputs.x0.clone()))
        return real(unet, noise_scheduler, inputs, draws, **kw)

    monkeypatch.setattr(fv, "measure_feature_variance", recording)
    out = tmp_path / "out"
    first = run_variance(params, models, out, inputs=_inputs(), progress=False)
    assert len(seen) == 2
    assert all(torch.equal(seen[0][0], s[0]) and np.array_equal(seen[0][1], s[1]) and torch.equal(seen[0][2], s[2])
               for s in seen)
    by = {m.label: m for m in first}
    for key in [("train", 2, "t", ""), ("sampling", 1, "t", ""), ("sampling", 1, "t_prev", "")]:
        assert np.array_equal(by["orig"].values[key], by["ft"].values[key])  # paired timesteps
    assert not np.allclose(by["orig"].values[("train", 1, "all", "norm")], by["ft"].values[("train", 1, "all", "norm")])
    assert by["ft"].original_model == str(orig) and by["ft"].original_label == "orig" and by["ft"].lambda_fcr == 0.5
    assert by["orig"].original_model == ""  # trained from scratch: nothing to compare with
    red = variance_reduction(first, n_boot=20, seed=0)
    assert len(red) == len(FEATURE_GROUPS) * 2 and set(red["model"]) == {"ft"}

    def fail(*args, **kwargs):
        raise AssertionError("a finished result was recomputed")

    monkeypatch.setattr(fv, "measure_feature_variance", fail)
    again = run_variance(params, models, out, inputs=_inputs(), progress=False)
    for m in again:
        for key, v in by[m.label].values.items():
            assert np.array_equal(m.values[key], v)
    with pytest.raises(StaleResultError):
        run_variance(params.with_flat(num_inference_steps=6), models, out, inputs=_inputs(), progress=False)

