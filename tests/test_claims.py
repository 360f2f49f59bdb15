"""Every generated number in the README and docs/ comes from a committed file: the generated parts
are rendered again from the committed tables and must equal what is written; the few numbers of
the hand-written prose are checked against the files they come from; every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from fcr import contract
from fcr.report.front_page import (PARAMETERS_END, PARAMETERS_START, RESULTS_PAGES, STUDY_REPORT, front_page_block,
                                   parameters_table, results_page, wall_time_page)
from fcr.report.readme import README_END, README_START

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _between(text: str, start: str, end: str) -> str:
    return text[text.index(start) + len(start):text.index(end)]


def test_the_readme_results_block_is_the_committed_tables_rendered() -> None:
    block = _between(README.read_text(encoding="utf-8"), README_START, README_END)
    assert block.strip() == f"## Results\n\n{front_page_block(STUDY_REPORT)}".strip()


def test_results_pages_and_the_parameters_page_are_regenerated_from_committed_files() -> None:
    for name, report_dir in RESULTS_PAGES.items():
        page = REPO / "docs" / "results" / f"{name}.md"
        assert page.read_text(encoding="utf-8") == results_page(report_dir, page), f"{page}: run python -m fcr.report.front_page"
    assert (REPO / "docs" / "results" / "wall_time.md").read_text(encoding="utf-8") == wall_time_page()
    params = (REPO / "docs" / "parameters.md").read_text(encoding="utf-8")
    assert parameters_table() in _between(params, PARAMETERS_START, PARAMETERS_END)


def test_the_front_page_gives_the_answer_first() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150
    assert lines[3].startswith("make setup main") and lines[4].startswith("make setup test")
    head = "\n".join(lines[:60])
    figure = re.search(r"!\[[^\]]*\]\(([^)]+\.png)\)", head)
    assert figure and (REPO / figure.group(1)).is_file()
    assert README_START in head
    assert next(i for i, line in enumerate(lines) if line.startswith("| backbone | contrast")) < 60


def test_hand_written_numbers_match_their_files() -> None:
    text = README.read_text(encoding="utf-8")
    primary = pd.read_csv(STUDY_REPORT / contract.CONTRASTS).query("family == 'primary'")
    assert "320 paired prompt/noise pairs" in text and set(primary["n"]) == {320}
    assert "three fine-tuning runs per arm" in text and set(primary["n_runs"]) == {3.0}
    assert "less faithful" in text and set(primary["decision"]) == {"FCR worse"}
    times = pd.read_csv(REPO / "outputs" / "reference" / "demo" / "report" / contract.STAGE_TIMES)
    total = times["seconds"].sum()
    assert "about 35 min" in text and round(total / 60) == 35
    reproducing = (REPO / "docs" / "reproducing.md").read_text(encoding="utf-8")
    assert f"{total:.1f} s = {total / 60:.1f} min" in reproducing
    again = REPO / "outputs" / "reference" / "reproductions" / "2026-12-06-intel-xeon"
    table = pd.read_csv(again / contract.REPRODUCTION)
    judged = table[table["rule"] != "shown"]
    assert f"{int(judged['within'].sum())} of {len(judged)} judged values within tolerance" in reproducing
    assert f"largest relative difference {judged['relative_difference'].abs().max():.1e}" in reproducing
    ci = (REPO / "benchmarks" / "results" / "ci_time_2026-12-06.md").read_text(encoding="utf-8")
    assert "at most 27.5 min" in text and "27 min 33 s" in ci and "real 21m8.560s" in ci and "real 6m24.325s" in ci
    seconds = pd.read_csv(again / contract.STAGE_TIMES)["seconds"].sum()
    assert f"{seconds:.0f} s = {seconds / 60:.1f} min" in reproducing
    inpainting = pd.read_csv(REPO / "outputs" / "inpainting_replication" / "contrasts.csv").query(
        "endpoint == 'psnr_vs_full'").set_index("config")
    for config, words in (("DeepCache-5-b0", "under DeepCache-5-b0"), ("FD-10", "at FD-10")):
        r = inpainting.loc[config]
        signed = [f"{v:+.2f}".replace("-", "−") for v in (r["mean_diff_db"], r["ci_lo"], r["ci_hi"])]
        assert f"{signed[0]} dB [{signed[1]}, {signed[2]}] {words}" in text.replace("\n", " "), config
    dc = inpainting.loc["DeepCache-5-b0"]
    assert f"[{dc['run_ci_lo']:+.2f}, {dc['run_ci_hi']:+.2f}] lies above 0" in text and dc["run_ci_lo"] > 0

    # Cache-aware fine-tuning (issue #33): the pre-registered family, the frontier points named.
    flat = text.replace("\n", " ")
    contrasts = pd.read_csv(STUDY_REPORT / contract.CONTRASTS)
    aware = contrasts[contrasts["family"] == f"{contract.CACHE_AWARE_FAMILY}all"]
    assert len(aware) == 3 and set(aware["decision"]) == {"trained better"} and set(aware["n"]) == {384}
    assert set(aware["n_runs"]) == {3} and "384 pairs, 3 runs per arm" in flat
    assert f"+{aware['estimate'].min():.2f} to +{aware['estimate'].max():.2f} dB" in flat
    frontiers = REPO / "outputs" / "study"
    arms = pd.read_csv(frontiers / "exp-3-cache-aware" / "frontier" / "cache_aware" / contract.FRONTIER_ARMS)
    peers = pd.read_csv(frontiers / "exp-1-main-ablation" / "frontier" / "frontier" / contract.FRONTIER)
    full = peers.loc[peers["is_reference"].astype(bool), "flops_per_image"].iloc[0]

    def point(table: pd.DataFrame, model: str, config: str) -> tuple[str, str]:
        row = table[(table["model"] == model) & (table["config"] == config)].iloc[0]
        return f"{row['flops_per_image'] / full:.2f}", f"{row['psnr']:.1f} dB"

    cost, psnr = point(arms, "ca_dc5", "DeepCache-5-b0")
    assert f"DeepCache-5-b0 ({cost} of full sampling's FLOPs) it is on the frontier at {psnr}" in flat
    assert f"({point(arms, 'ca_dc10', 'DeepCache-10-b0')[0]}: {point(arms, 'ca_dc10', 'DeepCache-10-b0')[1]})" in flat
    assert f"DPM-Solver++-12 ({': '.join(point(peers, 'base', 'DPM++-12'))})" in flat
    from fcr.report.headline import combined_points

    combined = combined_points(frontiers).set_index(["model", "config"])
    assert combined.loc[("ca_dc5", "DeepCache-5-b0"), "pareto"] and not combined.loc[("ca_dc10", "DeepCache-10-b0"), "pareto"]
    dpm, ours = combined.loc[("base", "DPM++-12")], combined.loc[("ca_dc10", "DeepCache-10-b0")]
    assert dpm["flops_per_image"] < ours["flops_per_image"] and dpm["psnr"] > ours["psnr"]  # "still dominates"


def test_every_relative_link_resolves() -> None:
    pages = [README, REPO / "outputs" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:|#", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_wall_time_ratios_are_reference_time_over_config_time(tmp_path: Path) -> None:
    from fcr.report.front_page import wall_time_ratios

    sweep = tmp_path / "run" / "sweep"
    sweep.mkdir(parents=True)
    pd.DataFrame([{"architecture": "base", "config": "FD-5", "time_per_image_s_bs1": 2.0, "time_per_image_s_bs8": 1.0},
                  {"architecture": "base", "config": "FD-10", "time_per_image_s_bs1": 1.0, "time_per_image_s_bs8": 0.8}]
                 ).to_csv(sweep / contract.COST, index=False)
    ratios = wall_time_ratios(("run",), repo=tmp_path)
    assert list(ratios["batch"]) == [1, 8]
    assert list(ratios["speed-up"]) == [2.0, 1.25] and set(ratios["comparison"]) == {"FD-10 vs FD-5"}
