"""Report tables, README section replacement and the whole report on a hand-made run tree (test inputs only)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from test_verdict import flops_fn, make_run_tree

from fcr.analysis.experiment_tables import exp1_table, exp2_table, paired_vs_reference
from fcr.analysis.rows import EXP1, EXP2, format_number
from fcr.analysis.run import analyze
from fcr.report.readme import README_END, README_START, update_readme
from fcr.report.tables import build_report, main


def report_of(root, out_dir=None, *, link_base=None, timing_beside=None, **analysis):
    """The report stage as the pipeline runs it: the analysis's tables, then the report formatted from them."""
    analyze(root, out_dir, **analysis)
    return build_report(root, out_dir, link_base=link_base, timing_beside=timing_beside)


def write_side_file(sweep: Path, model: str, config: str, seed: int, prob: list[float]) -> None:
    n = len(prob)
    folder = sweep / "quality"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"labels": torch.arange(n) % 10, "prompted_prob": torch.tensor(prob, dtype=torch.float64),
               "correct": torch.ones(n, dtype=torch.float64)}
    save_file(tensors, str(folder / f"{model}__{config}__seed{seed}.safetensors"))


def test_format_number():
    assert format_number(1234.5678) == "1.23e+03"
    assert format_number(0.012345) == "0.0123"
    assert format_number(float("nan")) == "n/a" and format_number(None) == "n/a"


def test_paired_vs_reference_pools_seeds_across_models(tmp_path):
    sweep = tmp_path / "sweep"
    write_side_file(sweep, "base", "FD-5", 0, [0.5, 0.6, 0.7, 0.8])
    write_side_file(sweep, "fcr", "FD-10", 0, [0.6, 0.7, 0.8, 0.95])
    write_side_file(sweep, "base", "FD-5", 1, [0.5, 0.5, 0.5, 0.5])
    write_side_file(sweep, "fcr", "FD-10", 1, [0.6, 0.6, 0.6, 0.6])
    out = paired_vs_reference(sweep, "fcr", "FD-10", "base", "FD-5")
    assert out["paired_n"] == 8 and out["paired_mean_diff"] == pytest.approx((0.1 * 7 + 0.15) / 8)
    assert "seeds [0, 1]" in out["paired_source"]
    # Different prompts (labels) must not be paired.
    save_file({"labels": torch.arange(4) + 1, "prompted_prob": torch.zeros(4, dtype=torch.float64),
               "correct": torch.zeros(4, dtype=torch.float64)}, str(sweep / "quality" / "x__FD-10__seed0.safetensors"))
    with pytest.raises(ValueError, match="same prompts"):
        paired_vs_reference(sweep, "x", "FD-10", "base", "FD-5")
    assert paired_vs_reference(sweep, "base", "FD-5", "base", "FD-5")["paired_source"] == ""


def test_exp_tables_rows_and_costs(tmp_path):
    root, _ = make_run_tree(tmp_path)
    t1 = exp1_table(root / EXP1 / "sweep" / "main")
    # The rows are the manifest's variations, then its controls, named as there.
    assert list(t1["variation"]) == ["FD-5-baseline", "FD-10-baseline", "FCR(λ=0.05)-FD-10", "FCR(λ=0.10)-FD-10",
                                     "FCR(λ=0.20)-FD-10", "control(λ=0)-FD-10", "full-sampling"]
    fcr = t1.set_index("variation").loc["FCR(λ=0.10)-FD-10"]
    assert fcr["fd"] == pytest.approx(10.4) and fcr["fd_lo"] == pytest.approx(10.3)
    assert fcr["time_speedup_bs1"] == pytest.approx(1.0 / 0.7) and fcr["time_speedup_bs8"] == pytest.approx(1.25)
    assert fcr["flops_speedup"] == pytest.approx(75.0 / 72.0)
    # CPU costs: the resident-set peak is no per-configuration memory result, so no memory column.
    assert "peak_memory_vs_ref" not in t1.columns or t1["peak_memory_vs_ref"].isna().all()
    t2 = exp2_table(root / EXP2 / "sweep")
    assert list(t2["variation"]) == ["SD2.1-FD-5", "SD2.1-FCR(λ=0.10)-FD-10", "SD2.1-FCR(λ=0.10)+DPMSolver-FD-10",
                                     "SD2.1-FD-10", "OpenJourney-FD-5", "OpenJourney-FCR(λ=0.10)-FD-10",
                                     "OpenJourney-FD-10"]
    assert t2.iloc[2]["config"] == "DPM++-FD-10" and t2.iloc[2]["fd"] == pytest.approx(10.3)
    # The DPM row comes from the manifest (base-v's FCR model is read at DPM++-FD-10 there); a
    # configuration the manifest names but the sweep did not run gives an empty row with a note.
    from dataclasses import replace

    from fcr.manifest import backbones_of

    exp2 = [replace(b, rows=(*b.rows[:2], ("SD2.1-cached-DPM", b.fcr_models[0.1], "DPM++-cached-10")))
            if b.name == "base-v" else b for b in backbones_of("embedded") if b.experiment == EXP2]
    t2 = exp2_table(root / EXP2 / "sweep", backbones=exp2)
    assert t2.iloc[2]["variation"] == "SD2.1-cached-DPM"
    assert "not in" in t2.iloc[2]["note"] and pd.isna(t2.iloc[2].get("fd"))
    assert len(exp2_table(root / EXP2 / "sweep")) == 7  # only what the manifest names


def test_update_readme_replaces_only_the_block_and_is_idempotent(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro text\n")
    update_readme(readme, "| a |\n|---|\n| 1 |", header="## Results (generated)\nheader v1")
    first = readme.read_text()
    assert first.startswith("# Title\n\nintro text\n") and first.count(README_START) == 1
    assert first.rstrip().endswith(README_END) and "| 1 |" in first
    update_readme(readme, "| a |\n|---|\n| 1 |", header="## Results (generated)\nheader v1")
    assert readme.read_text() == first  # idempotent
    # Text after the block survives; the block is replaced, not duplicated.
    readme.write_text(first + "\n## Afterwards\nkept\n")
    update_readme(readme, "| a |\n|---|\n| 2 |", header="## Results (generated)\nheader v2")
    text = readme.read_text()
    assert text.count(README_START) == 1 and "| 1 |" not in text and "| 2 |" in text and "header v1" not in text
    assert text.startswith("# Title\n\nintro text\n") and text.endswith("## Afterwards\nkept\n")
    # A lone marker is refused rather than guessed around.
    readme.write_text(f"x\n{README_START}\ny\n")
    with pytest.raises(ValueError, match="markers"):
        update_readme(readme, "z", header="h")


def test_update_readme_default_header_names_the_run(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("x\n")
    update_readme(readme, "body", root="outputs/embedded")
    text = readme.read_text()
    assert "Git commit: `" in text and "generated from the run in `outputs/embedded`" in text and "Date: " in text


def test_build_report_writes_markdown_and_tables(tmp_path):
    root, models = make_run_tree(tmp_path)
    write_side_file(root / EXP1 / "sweep" / "main", "base", "FD-5", 0, [0.5, 0.6, 0.7])
    write_side_file(root / EXP1 / "sweep" / "main", "fcr_lambda0.10_fd10", "FD-10", 0, [0.6, 0.6, 0.9])
    fig_dir = root / EXP1 / "sweep" / "main" / "figures"
    fig_dir.mkdir()
    (fig_dir / "fd_fashioncnn_vs_stride.png").write_bytes(b"\x89PNG fake")
    out = report_of(root, link_base=tmp_path, verdict_kwargs={"models_dir": models, "train_flops_per_image": flops_fn})
    report = root / "report"
    for name in ("report.md", "verdict.csv", "exp1_table.csv", "exp2_table.csv"):
        assert (report / name).is_file(), name
    md = (report / "report.md").read_text()
    assert "Success criteria" in md and "FCR(λ=0.10)-FD-10" in md and "OpenJourney role" in md
    assert "10.4 [10.3, 10.5]" in md  # 3 significant digits, CI as [lo, hi]
    assert "(figures/exp1_sweep_fd_fashioncnn_vs_stride.png)" in md
    assert (report / "figures" / "exp1_sweep_fd_fashioncnn_vs_stride.png").is_file()
    t1 = pd.read_csv(report / "exp1_table.csv").set_index("variation")
    assert t1.loc["FCR(λ=0.10)-FD-10", "paired_mean_diff"] == pytest.approx(0.1)
    assert out["verdict"].iloc[-1]["criterion"] == "overall"
    # The README version: criterion rows only, figure links relative to link_base.
    assert "(run/report/figures/exp1_sweep_fd_fashioncnn_vs_stride.png)" in out["readme_markdown"]
    assert "| part |" in md and "| part |" not in out["readme_markdown"]
    # Criterion a is shown beside the original model's own FD-10 under the same margins.
    beside = out["readme_markdown"].split("Criterion a beside the models without FCR")[1]
    assert "original model, plain FD caching (base) at FD-10" in beside.split("\n\n")[1]


def test_build_report_on_empty_run_says_what_is_missing(tmp_path):
    import json as _json

    demo = tmp_path / "demo" / "data"  # another run's stage times, shown beside (the study shows the demo's)
    demo.mkdir(parents=True)
    (demo / ".pipeline_done.json").write_text(_json.dumps({"seconds": 90.0, "finished": "t"}))
    out = report_of(tmp_path / "empty", tmp_path / "rep", timing_beside=tmp_path / "demo",
                    verdict_kwargs={"models_dir": tmp_path / "nomodels", "train_flops_per_image": flops_fn})
    md = out["markdown"]
    assert "Not available" in md and "summary.csv" in md and "criterion.csv" in md
    assert "### Wall time of the demo (make main)" in md and "**1.5 min**" in out["readme_markdown"]
    (demo / ".pipeline_done.json").unlink()  # only the report stage left: say so, do not show 0.1 min
    (tmp_path / "demo" / "report").mkdir()
    (tmp_path / "demo" / "report" / ".pipeline_done.json").write_text(_json.dumps({"seconds": 5.0, "finished": "t"}))
    again = report_of(tmp_path / "empty", tmp_path / "rep", timing_beside=tmp_path / "demo",
                      verdict_kwargs={"models_dir": tmp_path / "nomodels", "train_flops_per_image": flops_fn})
    assert "No finished demo stage" in again["markdown"]
    assert out["exp1"] is None and (tmp_path / "rep" / "verdict.csv").is_file()


def test_cli_formats_the_report_from_the_analysis_tables(tmp_path, monkeypatch):
    from fcr.analysis.run import main as analysis_main

    monkeypatch.chdir(tmp_path)  # main() changes to the repository root; restore the folder afterwards
    root, models = make_run_tree(tmp_path)
    # The CLI uses the default models folder and FLOP counter: point them at the test tree.
    monkeypatch.setattr("fcr.eval.training_cost.embedded_flops_per_image", lambda: flops_fn)
    monkeypatch.setattr("fcr.backends.models.MODELS_DIR", models)
    with pytest.raises(Exception, match="verdict.csv"):  # the report computes nothing: no tables, no report
        main(["--root", str(root)])
    assert analysis_main(["--root", str(root)]) == 0
    assert main(["--root", str(root)]) == 0
    assert "FCR(λ=0.10)-FD-10" in (root / "report" / "report.md").read_text()


def test_stage_times_sum_the_pipeline_markers(tmp_path) -> None:
    import json as _json

    from fcr.report.sections import stage_times, timing_section

    for stage, seconds in (("data", 30.0), ("exp-1-main-ablation/sweep/main", 90.0), ("report", 600.0)):
        (tmp_path / stage).mkdir(parents=True)
        (tmp_path / stage / ".pipeline_done.json").write_text(_json.dumps({"seconds": seconds, "finished": "t"}))
    times = stage_times(tmp_path)
    assert list(times["stage"]) == ["data", "exp-1-main-ablation/sweep/main", "report"]
    section = timing_section(tmp_path)  # the report's own marker is the previous report's: not counted
    assert "**2.0 min**" in section[0] and "| report |" not in section[1]


def test_build_report_adds_the_sd_gpu_cost_rows_when_given(tmp_path):
    csv = tmp_path / "bench_sd_gpu.csv"
    pd.DataFrame([{"model": "SD2.1 UNet architecture", "device": "GPU X", "batch": 4, "config": c,
                   "time_median_s": t, "peak_mem_mib": m}
                  for c, t, m in (("FD-5-par", 1.0, 10.0), ("FD-10-par", 0.5, 20.0),
                                  ("FD-5-seq", 1.0, 10.0), ("FD-10-seq", 0.9, 10.0))]).to_csv(csv, index=False)
    kw = {"models_dir": tmp_path / "nomodels", "train_flops_per_image": flops_fn}
    out = report_of(tmp_path / "run", tmp_path / "rep", verdict_kwargs=kw, sd_gpu_cost=csv)
    assert "Stable Diffusion scale" in out["readme_markdown"] and "SD2.1 architecture, batch 4" in out["readme_markdown"]
    assert "parallel decoding: 2×, +100 % memory" in out["readme_markdown"]
    none = report_of(tmp_path / "run", tmp_path / "rep2", verdict_kwargs=kw, sd_gpu_cost=tmp_path / "absent.csv")
    assert "Stable Diffusion scale" not in none["readme_markdown"]


def test_provenance_names_the_commits_the_run_was_made_with(tmp_path):
    import json

    from fcr.report.readme import RUN_INFO, provenance_header

    root = tmp_path / "run"
    root.mkdir()
    (root / RUN_INFO).write_text(json.dumps({"invocations": [
        {"commit": "abc1234", "dirty": False, "started": "2026-01-01T10:00:00"},
        {"commit": "def5678", "dirty": True, "started": "2026-01-01T11:00:00"}]}))
    header = provenance_header(root)
    assert "`abc1234`, `def5678`" in header and "uncommitted code changes" in header
    assert "2 pipeline invocations, 2026-01-01T10:00:00 to 2026-01-01T11:00:00" in header
    (root / RUN_INFO).unlink()
    assert "when this report was made" in provenance_header(root)


def test_supplementary_robustness_run_is_reported_beside_the_verdict(tmp_path):
    root = tmp_path / "run"
    folder = root / EXP2 / "robustness" / "seeds3"
    folder.mkdir(parents=True)
    # Hand-made notebook-04 criterion rows (test input): one pair passes, one fails with its interval above 0.
    pd.DataFrame([
        {"model": "base-v_fcr", "lambda_fcr": 0.1, "original_model": "base-v", "config": "FD-10", "stride": 10,
         "stress": "ood_prompts", "metric": "class_accuracy", "n_seeds": 3, "drop_fcr": 0.1, "drop_original": 0.2,
         "diff": -0.1, "diff_lo": -0.3, "diff_hi": 0.1, "passed": True},
        {"model": "base-v_fcr", "lambda_fcr": 0.1, "original_model": "base-v", "config": "FD-10", "stride": 10,
         "stress": "high_resolution", "metric": "fd_fashioncnn", "n_seeds": 3, "drop_fcr": 5.0, "drop_original": 3.0,
         "diff": 2.0, "diff_lo": 0.5, "diff_hi": 3.5, "passed": False},
    ]).to_csv(folder / "criterion.csv", index=False)
    kw = {"models_dir": tmp_path / "nomodels", "train_flops_per_image": flops_fn}
    out = report_of(root, tmp_path / "rep", verdict_kwargs=kw, sd_gpu_cost=None)
    md = out["readme_markdown"]
    assert "supplementary run `seeds3`" in md and "seeds per row: [3]" in md
    assert "1 pass, 1 FAIL of 2 stress × metric pairs" in md
    assert "above 0 (FCR worse) for 1 and below 0 (FCR better) for 0 of 2" in md
    assert out["verdict"].query("criterion == 'c. robustness'")["passed"].isna().all()  # main run absent


def test_the_headline_frontier_joins_every_frontier_run_of_one_original(tmp_path: Path) -> None:
    import pandas as pd

    from fcr import contract
    from fcr.report.headline import combined_points, headline_figure

    def run(folder: str, rows: list[tuple], name: str = contract.FRONTIER) -> None:
        path = tmp_path / folder
        path.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([{"model": m, "config": c, "flops_per_image": f, "psnr": q, "psnr_lo": q - 1, "psnr_hi": q + 1,
                       "is_reference": c == "full", "approach": a, "series": f"{m} · {c}"}
                      for m, c, f, q, a in rows]).to_csv(path / name, index=False)

    assert combined_points(tmp_path).empty and headline_figure(tmp_path, tmp_path / "report") is None
    run("exp-1-x/frontier/frontier", [("base", "full", 100.0, float("nan"), "training-free"),
                                      ("base", "DC-10", 26.0, 27.0, "training-free"),
                                      ("base", "DC-5", 34.0, 34.0, "training-free")])
    # The cache-aware run: its pooled table is read (not the per-run points); base's DC-10 again.
    run("exp-3-y/frontier/cache_aware", [("base", "full", 100.0, float("nan"), "training-free"),
                                         ("base", "DC-10", 26.0, 27.5, "training-free"),
                                         ("ca_seed1", "DC-10", 26.0, 1.0, "fine-tuned")])
    run("exp-3-y/frontier/cache_aware", [("base", "full", 100.0, float("nan"), "training-free"),
                                         ("base", "DC-10", 26.0, 27.5, "training-free"),
                                         ("ca", "DC-10", 26.0, 29.0, "cache-aware")], contract.FRONTIER_ARMS)
    run("exp-2-z/frontier/frontier", [("base-v", "full", 100.0, float("nan"), "training-free"),  # another original
                                      ("base-v", "DC-10", 26.0, 40.0, "training-free")])
    points = combined_points(tmp_path).set_index(["model", "config"])
    assert set(points.index) == {("base", "full"), ("base", "DC-10"), ("base", "DC-5"), ("ca", "DC-10")}
    assert points.loc[("base", "DC-10"), "psnr"] == 27.0  # kept from the first run
    assert points.loc[("ca", "DC-10"), "source"] == "exp-3-y/frontier/cache_aware"
    assert bool(points.loc[("ca", "DC-10"), "pareto"]) and not bool(points.loc[("base", "DC-10"), "pareto"])
    figure = headline_figure(tmp_path, tmp_path / "report")
    assert figure == tmp_path / "report" / "figures" / contract.HEADLINE_FRONTIER and figure.is_file()
