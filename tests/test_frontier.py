"""The quality-vs-cost frontier (issue #13): the fewer-steps peers as sweep configurations, method
families, the Pareto front and the matched-cost table on a sweep folder of side files.

The side files are built from seeded tensors to test the code paths (never results).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fcr.core.configurations import configs_for_model, configurations_of, sweep_configurations
from fcr.config import to_options
from fcr.eval.results import save_safetensors_atomic
from fcr.eval.scoring import FD_COLUMN
from fcr.experiments.frontier import frontier_points, matched_cost, method_family, pareto_mask, per_image_fidelity
from fcr.experiments.paired_fidelity import fidelity_table
from fcr.experiments.sweep import quality_stem


def test_fewer_steps_peers_are_reference_lines_of_the_original() -> None:
    configs = sweep_configurations([1, 5], 50, "ddim", include_50ls=False, dpm_reference_steps=20,
                                   plain_steps=[10, 25], dpm_steps=[8, 20, 12])
    names = [c.name for c in configs]
    assert names == ["full", "FD-5", "DDIM-10", "DDIM-25", "DPM++-20", "DPM++-8", "DPM++-12"]  # 20 once
    by_name = {c.name: c for c in configs}
    assert (by_name["DDIM-10"].scheduler, by_name["DDIM-10"].num_inference_steps, by_name["DDIM-10"].key_steps) == ("ddim", 10, None)
    assert by_name["DPM++-8"].as_dict()["n_key_steps"] == 8
    assert [c.name for c in configs_for_model(configs, 1, False)] == ["full", "FD-5"]
    with pytest.raises(ValueError, match="plain_steps"):
        sweep_configurations([1], 50, "ddim", dpm_reference_steps=0, plain_steps=[50])
    # Without the new keys the configurations (and so every result key) are what they were.
    params = to_options({"strides": [1, 10], "include_50ls": True})
    assert [c.name for c in configurations_of(params.sampling, params.sweep)] == ["full", "FD-10", "FD-50ls", "DPM++-20"]


@pytest.mark.parametrize(("config", "family"), [
    ("full", "DDIM"), ("DDIM-20", "DDIM"), ("FD-10", "FD"), ("FD-50ls", "FD"), ("DPM++-20", "DPM-Solver++"),
    ("DPM++-FD-10", "DPM-Solver++ + FD"), ("DeepCache-5-b0", "DeepCache b0"), ("DeepCache-10-b3", "DeepCache b3"),
])
def test_method_family(config: str, family: str) -> None:
    assert method_family(config, "ddim") == family


def test_method_family_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="no method family"):
        method_family("PNDM-20", "ddim")


def test_pareto_mask_keeps_only_undominated_points() -> None:
    cost = [1.0, 2.0, 2.0, 3.0, 4.0, 1.5]
    quality = [10.0, 20.0, 15.0, 20.0, 30.0, np.nan]
    assert pareto_mask(cost, quality).tolist() == [True, True, False, False, True, False]
    # Lower-is-better quality flips the order.
    assert pareto_mask([1.0, 2.0], [5.0, 1.0], higher_is_better=False).tolist() == [True, True]
    assert pareto_mask([1.0, 2.0], [1.0, 5.0], higher_is_better=False).tolist() == [True, False]


N = 30


def _write_cell(out: Path, model: str, config: str, seed: int, images: torch.Tensor, prompts: list[str]) -> None:
    save_safetensors_atomic(
        {"images": ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8),
         "features": torch.zeros(images.shape[0], 4, dtype=torch.float64),
         "correct": torch.ones(images.shape[0], dtype=torch.float64)},
        out / "quality" / f"{quality_stem(model, config, seed)}.safetensors",
        {"model": model, "config": config, "seed": str(seed), "prompts": json.dumps(prompts)},
    )


@pytest.fixture()
def sweep(tmp_path: Path) -> dict:
    """base at full / FD-5 / FD-10 / DDIM-10 / DeepCache-5-b0 and an FCR fine-tune at full / FD-10, two
    seeds; the error each configuration adds to the original's full image is set by hand, so the
    expected order of the points is known."""
    gen = torch.Generator().manual_seed(0)
    noise = {("base", "FD-5"): 0.02, ("base", "FD-10"): 0.08, ("base", "DDIM-10"): 0.05,
             ("base", "DeepCache-5-b0"): 0.01, ("fcr", "full"): 0.015, ("fcr", "FD-10"): 0.03}
    flops = {"full": 100.0, "FD-5": 75.0, "FD-10": 70.0, "DDIM-10": 20.0, "DeepCache-5-b0": 30.0}
    quality = []
    for seed in (0, 1):
        prompts = [f"prompt {i} seed {seed}" for i in range(N)]
        full = torch.rand(N, 1, 8, 8, generator=gen) * 1.6 - 0.8
        _write_cell(tmp_path, "base", "full", seed, full, prompts)
        quality.append({"model": "base", "config": "full", "seed": seed})
        for (model, config), level in noise.items():
            _write_cell(tmp_path, model, config, seed, full + torch.randn(full.shape, generator=gen) * level, prompts)
            quality.append({"model": model, "config": config, "seed": seed})
    quality = pd.DataFrame(quality).assign(architecture="tiny", scheduler="ddim", **{FD_COLUMN: 1.0})
    summary = (quality.groupby(["model", "config"], sort=False)
               .agg(n_seeds=("seed", "size"), architecture=("architecture", "first"), scheduler=("scheduler", "first"),
                    **{FD_COLUMN: (FD_COLUMN, "mean")}).reset_index())
    cost = pd.DataFrame([{"architecture": "tiny", "config": c, "flops_per_image": f, "time_per_image_s_bs1": f / 10}
                         for c, f in flops.items()])
    origins = {"fcr": "base"}
    fidelity = fidelity_table(tmp_path, quality, origins, n_boot=50)
    points = frontier_points(summary, cost, fidelity, origins)
    return {"out": tmp_path, "points": points, "fidelity": fidelity}


def test_frontier_points_join_cost_and_paired_fidelity(sweep: dict) -> None:
    points = sweep["points"].set_index(["model", "config"])
    assert points.loc[("base", "full"), "is_reference"] and np.isnan(points.loc[("base", "full"), "psnr"])
    # A fine-tune's full sampling is a point: compared with the original's full images.
    assert points.loc[("fcr", "full"), "reference"] == "original_full"
    assert points.loc[("fcr", "full"), "flops_per_image"] == 100.0
    assert points.loc[("fcr", "FD-10"), "series"] == "fcr · FD"
    assert points.loc[("base", "DeepCache-5-b0"), "family"] == "DeepCache b0"
    # Less added error, closer to the reference.
    assert points.loc[("base", "FD-5"), "psnr"] > points.loc[("base", "FD-10"), "psnr"]
    assert (points.drop(index=[("base", "full")])["n_images"] == 2 * N).all()


def test_matched_cost_compares_each_series_within_the_budget(sweep: dict) -> None:
    table = matched_cost(sweep["points"], sweep["out"], [0, 1], original="base", budgets=["FD-5", "FD-10"],
                         n_boot=200)
    at5 = table[table["budget"] == "FD-5"].set_index("series")
    # Within FD-5's 75 FLOPs: base FD-5 itself, DDIM-10, DeepCache; the fine-tune's FD-10 (70).
    assert set(at5.index) == {"base · FD", "base · DDIM", "base · DeepCache b0", "fcr · FD"}
    assert at5.loc["base · FD", "config"] == "FD-5" and at5.loc["base · FD", "diff_vs_budget"] == 0.0
    # DeepCache (least added error) is the best point; the others are dominated by it.
    assert at5.loc["base · DeepCache b0", "diff_vs_best"] == 0.0
    assert at5.loc["base · DeepCache b0", "vs_budget"] == "better"
    assert at5.loc["base · DDIM", "dominated_by"] == "base · DeepCache b0"
    assert at5.loc["fcr · FD", "vs_budget"] == "worse"
    # A trained series against the best of the original's own samplers at that cost (DeepCache here).
    assert (at5["best_training_free"] == "base · DeepCache b0").all()
    assert at5.loc["fcr · FD", "vs_training_free"] == "worse"
    assert at5.loc["fcr · FD", "diff_vs_training_free"] == pytest.approx(at5.loc["fcr · FD", "diff_vs_best"])
    assert np.isnan(at5.loc["base · DDIM", "diff_vs_training_free"])  # the original's own: not compared
    # The per-image differences are paired: the mean difference is the difference of the means.
    a = per_image_fidelity(sweep["out"], "fcr", "FD-10", "original_full", [0, 1])
    b = per_image_fidelity(sweep["out"], "base", "FD-5", "own_full", [0, 1])
    assert at5.loc["fcr · FD", "diff_vs_budget"] == pytest.approx(a.mean() - b.mean())
    at10 = table[table["budget"] == "FD-10"].set_index("series")
    assert at10.loc["base · FD", "config"] == "FD-10"  # FD-5 costs more than the FD-10 budget
    with pytest.raises(ValueError, match="did not run"):
        matched_cost(sweep["points"], sweep["out"], [0, 1], original="base", budgets=["FD-20"])
    with pytest.raises(ValueError, match="cost column"):
        matched_cost(sweep["points"], sweep["out"], [0, 1], original="base", cost_column="joules")


def test_frontier_from_sweep_reads_a_sweep_folder_and_plots(sweep: dict) -> None:
    from fcr import contract, plots
    from fcr.experiments.frontier import frontier_from_sweep

    out = sweep["out"]
    with pytest.raises(FileNotFoundError, match="finished 03_stride_sweep"):
        frontier_from_sweep(out, {"fcr": "base"}, "base")
    points = sweep["points"]
    rows = [{"model": m, "config": c, "seed": s, "architecture": "tiny", "scheduler": "ddim", FD_COLUMN: 1.0}
            for m, c in points[["model", "config"]].itertuples(index=False) for s in (0, 1)]
    pd.DataFrame(rows).to_csv(out / contract.QUALITY, index=False)
    pd.DataFrame([{"architecture": "tiny", "config": c, "flops_per_image": f}
                  for c, f in {"full": 100.0, "FD-5": 75.0, "FD-10": 70.0, "DDIM-10": 20.0, "DeepCache-5-b0": 30.0}.items()]
                 ).to_csv(out / contract.COST, index=False)
    sweep["fidelity"].to_csv(out / contract.FIDELITY, index=False)
    got, table = frontier_from_sweep(out, {"fcr": "base"}, "base", budgets=["FD-5"], n_boot=50)
    on_front = set(got.loc[got["pareto"], "config"] + "@" + got.loc[got["pareto"], "model"])
    # The cheapest point and DeepCache (cheaper and closer than every FD point) are on the front.
    assert {"DDIM-10@base", "DeepCache-5-b0@base"} <= on_front and "FD-10@base" not in on_front
    assert set(table["budget"]) == {"FD-5"}
    with pytest.raises(ValueError, match="not a model"):
        frontier_from_sweep(out, {}, "sd15")
    fig = plots.frontier(got, "flops_per_image", "psnr")
    assert len(fig.axes[0].lines) >= got["series"].nunique()
    plots.plt.close(fig)
    assert set(got.loc[got["model"] == "base", "approach"]) == {"training-free"}
    assert set(got.loc[got["model"] == "fcr", "approach"]) == {"fine-tuned"}
    # A model that is its original except at one configuration keeps only that point (and the
    # matched-cost table never meets its other cells).
    only, only_table = frontier_from_sweep(out, {"fcr": "base"}, "base", budgets=["FD-5"], n_boot=50,
                                           differs_only_at={"fcr": "FD-10"})
    assert set(only.loc[only["model"] == "fcr", "config"]) == {"FD-10"}
    assert only[only["model"] == "base"].reset_index(drop=True).equals(got[got["model"] == "base"].reset_index(drop=True))
    assert set(only_table.loc[only_table["model"] == "fcr", "config"]) <= {"FD-10"}
    faceted = plots.frontier(got, "flops_per_image", "psnr", facet="approach", facet_order=["fine-tuned", "none"])
    assert [ax.get_title() for ax in faceted.axes] == ["fine-tuned", "training-free"]
    fine_tuned = faceted.axes[[ax.get_title() for ax in faceted.axes].index("fine-tuned")]
    labels = fine_tuned.get_legend_handles_labels()[1]
    assert "Pareto front (all)" in labels and all(not lab.startswith("base ·") for lab in labels)
    plots.plt.close(faceted)


def test_an_arms_training_runs_become_one_cache_aware_point_per_configuration(sweep: dict) -> None:
    from safetensors.torch import load_file

    from fcr.experiments.frontier import pooled_arms

    out, gen = sweep["out"], torch.Generator().manual_seed(1)
    for seed in (0, 1):  # a second training run of the fine-tune: its own added error
        full = load_file(str(out / "quality" / f"{quality_stem('base', 'full', seed)}.safetensors"))["images"]
        prompts = [f"prompt {i} seed {seed}" for i in range(N)]
        for config, level in (("full", 0.01), ("FD-10", 0.05)):
            images = full.double() / 127.5 - 1 + torch.randn(full.shape, generator=gen, dtype=torch.float64) * level
            _write_cell(out, "fcr_seed1", config, seed, images.float(), prompts)
    quality = pd.DataFrame([{"model": m, "config": c, "seed": s} for m, c in sweep["points"][["model", "config"]]
                            .itertuples(index=False) for s in (0, 1)]
                           + [{"model": "fcr_seed1", "config": c, "seed": s} for c in ("full", "FD-10") for s in (0, 1)])
    quality = quality.assign(architecture="tiny", scheduler="ddim", **{FD_COLUMN: 1.0})
    summary = (quality.groupby(["model", "config"], sort=False)
               .agg(n_seeds=("seed", "size"), architecture=("architecture", "first"), scheduler=("scheduler", "first"),
                    **{FD_COLUMN: (FD_COLUMN, "mean")}).reset_index())
    origins = {"fcr": "base", "fcr_seed1": "base"}
    cost = pd.DataFrame([{"architecture": "tiny", "config": c, "flops_per_image": f} for c, f in
                         {"full": 100.0, "FD-5": 75.0, "FD-10": 70.0, "DDIM-10": 20.0, "DeepCache-5-b0": 30.0}.items()])
    points = frontier_points(summary, cost, fidelity_table(out, quality, origins, n_boot=20), origins)

    pooled = pooled_arms(points, out, {"fcr": ("FD-10", ["fcr", "fcr_seed1"])}, [0, 1], n_boot=50)
    arm = pooled[pooled["model"] == "fcr"].set_index("config")
    assert "fcr_seed1" not in set(pooled["model"]) and set(arm.index) == {"full", "FD-10"}
    assert (arm["approach"] == "cache-aware").all() and (arm["n_runs"] == 2).all()
    runs = [per_image_fidelity(out, m, "FD-10", "original_full", [0, 1]) for m in ("fcr", "fcr_seed1")]
    assert arm.loc["FD-10", "psnr"] == pytest.approx(np.mean(runs))  # the mean over images of the runs' mean
    assert arm.loc["FD-10", "psnr_lo"] < arm.loc["FD-10", "psnr"] < arm.loc["FD-10", "psnr_hi"]
    assert arm.loc["FD-10", "series"] == "fcr · FD" and arm.loc["FD-10", "flops_per_image"] == 70.0
    assert len(pooled) == len(points) - 2 and pooled["pareto"].dtype == bool
    untouched = pooled_arms(points, out, {}, [0, 1])  # no arms: the same points, with the front marked
    assert untouched.drop(columns="pareto").equals(points) and untouched["pareto"].any()
    with pytest.raises(ValueError, match="1 of its 2 runs"):
        pooled_arms(points[~((points["model"] == "fcr_seed1") & (points["config"] == "full"))], out,
                    {"fcr": ("FD-10", ["fcr", "fcr_seed1"])}, [0, 1])


def test_approach_separates_the_original_fine_tunes_and_students() -> None:
    from fcr.experiments.frontier import approach

    origins = {"fcr": "base", "pd@round2": "base", "cd": "base"}
    assert approach("base", "FD", origins) == "training-free"
    assert approach("fcr", "DeepCache b0", origins) == "fine-tuned"
    assert approach("pd@round2", "PD + FD", origins) == "distilled"
    assert approach("cd", "CD", origins) == "distilled"


FRONTIER_MANIFEST = """
experiments:
  - experiment_id: exp-f
    run_variations: [FD-5-baseline]
    settings:
      embedded:
        params: [params/fashion_mnist.yaml]
        finetune: [params/finetune_embedded.yaml]
        finetunes:
          control: [params/variations/control_lambda0_fd10.yaml]
        notebooks:
          - {notebook: 03_stride_sweep, run: frontier, models: [base, control]}
          - {notebook: 06_baselines_frontier, run: frontier, models: [base, control]}
        variations:
          FD-5-baseline: {model: base, config: FD-5}
"""


def test_manifest_frontier_runs_read_the_sweep_of_their_name(tmp_path: Path) -> None:
    from fcr.manifest import ManifestError, load_manifest
    from fcr.paths import REPO_ROOT
    from fcr.pipeline import plan

    path = tmp_path / "experiments.yaml"
    path.write_text(FRONTIER_MANIFEST)
    tasks = plan("embedded", root=tmp_path / "out", manifest=path, bench=False, report=False)
    frontier = next(t for t in tasks if "06_baselines_frontier" in t.name)
    assert frontier.overrides["frontier_sweep_run"] == "frontier"
    assert frontier.overrides["frontier_models"][0] == "base"
    assert frontier.overrides["frontier_models"][1].endswith("exp-f/control")
    assert frontier.folder == tmp_path / "out" / "exp-f" / "frontier" / "frontier"
    for bad in ("{notebook: 06_baselines_frontier, run: other, models: [base, control]}",
                "{notebook: 06_baselines_frontier, run: frontier, models: [control, base]}"):
        path.write_text(FRONTIER_MANIFEST.replace(
            "{notebook: 06_baselines_frontier, run: frontier, models: [base, control]}", bad))
        with pytest.raises(ManifestError, match="reads the 03_stride_sweep run of the same name"):
            load_manifest(path, REPO_ROOT)


def test_deep_caching_rows_of_criterion_b(tmp_path: Path) -> None:
    from fcr.manifest import Backbone, Study
    from fcr.analysis.deep_caching import DEEP_B_NAME, deep_caching_rows

    sweep_dir = tmp_path / "exp-1-main-ablation" / "sweep" / "frontier"
    gen = torch.Generator().manual_seed(1)
    n, d = 200, 4
    save_safetensors_atomic({"features": torch.randn(1000, d, generator=gen, dtype=torch.float64)},
                            sweep_dir / "reference" / "ref.safetensors", {})
    prompts = [f"p{i}" for i in range(n)]
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64)
    cells = [("base", "FD-5"), ("base", "DeepCache-5-b0"), ("base", "DeepCache-10-b0"), ("deep", "DeepCache-10-b0")]
    for model, config in cells:
        save_safetensors_atomic(
            {"images": torch.zeros(n, 1, 4, 4, dtype=torch.uint8),
             "features": feats + 0.01 * torch.randn(n, d, generator=gen, dtype=torch.float64),
             "correct": torch.ones(n, dtype=torch.float64)},
            sweep_dir / "quality" / f"{quality_stem(model, config, 0)}.safetensors",
            {"model": model, "config": config, "seed": "0", "prompts": json.dumps(prompts)})
    pd.DataFrame([{"model": m, "config": c, "seed": 0, "architecture": "base"} for m, c in cells]).to_csv(
        sweep_dir / "quality.csv", index=False)
    times = {"FD-5": 1.0, "DeepCache-5-b0": 0.5, "DeepCache-10-b0": 0.3}

    def write_cost(device: str) -> None:
        pd.DataFrame([{"architecture": "base", "config": c, "device": device, "time_per_image_s_bs1": t,
                       "time_per_image_s_bs8": t / 4, "peak_memory_bytes": 1e9} for c, t in times.items()]
                     ).to_csv(sweep_dir / "cost.csv", index=False)

    write_cost("cpu")
    b = Backbone("base", "SD1.5 role", "exp-1-main-ablation", frontier_run="frontier", fcr_deep_models={0.1: "deep"},
                 study=Study())
    rows = deep_caching_rows(tmp_path, b)
    assert [r["kind"] for r in rows] == ["context", "context", "criterion", "criterion"]
    assert all(r["criterion"] == DEEP_B_NAME for r in rows)
    vs_fd5 = next(r for r in rows if r["kind"] == "criterion" and r["scope"].endswith("FD-5"))
    assert "batch 1: 3.33×" in vs_fd5["measured"] and vs_fd5["value"] == pytest.approx(1 / 0.3)
    # Non-inferior on both margins, fast enough, but CPU memory is not measurable: n/a.
    assert "p_Holm" in vs_fd5["measured"] and vs_fd5["passed"] is None
    assert "Holm over the 8 quality tests" in vs_fd5["note"]
    write_cost("cuda")
    rows = deep_caching_rows(tmp_path, b)
    assert [r["passed"] for r in rows] == [True, True, True, True]
    # No frontier run: no rows; a frontier run that was not run: one n/a row naming the file.
    assert deep_caching_rows(tmp_path, Backbone("base", "r", "exp-1-main-ablation")) == []
    missing = deep_caching_rows(tmp_path / "nowhere", b)
    assert len(missing) == 1 and missing[0]["passed"] is None and "quality.csv" in missing[0]["note"]
