"""What the README and docs/results/ show of a run's report, generated from its committed tables only
(pandas; no torch): the README's compact results block and one docs page per profile.

``python -m fcr.report.front_page`` rewrites both from the committed reports; the claims test
(tests/test_claims.py) renders the block again from the same files and compares.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pandas as pd

from fcr import contract
from fcr.analysis.rows import format_number, markdown_table
from fcr.paths import REPO_ROOT, display_path

__all__ = ["RESULTS_PAGES", "front_page_block", "parameters_table", "results_page", "wall_time_page", "wall_time_ratios",
           "write_parameters_page",
           "write_results_pages"]

STUDY_REPORT = REPO_ROOT / "outputs" / "study" / "report"
# docs/results/<name>.md <- the report folder it shows.
RESULTS_PAGES = {
    "study": STUDY_REPORT,
    "demo": REPO_ROOT / "outputs" / "reference" / "demo" / "report",
    "pilot": REPO_ROOT / "outputs" / "pilot" / "report",
}
# Every committed sweep's cost table: criterion b's wall-time ratio is reported over all of them.
COST_SOURCES = ("outputs/study", "outputs/reference/demo")
SPEEDUPS = (("FD-10", "FD-5"), ("DeepCache-10-b0", "FD-5"))


def wall_time_ratios(sources: tuple[str, ...] = COST_SOURCES, repo: Path = REPO_ROOT) -> pd.DataFrame:
    """Wall-time speed-up ``time(reference) / time(config)`` per committed cost table, architecture
    and batch size, for the comparisons of :data:`SPEEDUPS` (criterion b): one row per measurement."""
    rows = []
    for source in sources:
        for path in sorted((repo / source).rglob(contract.COST)):
            cost = pd.read_csv(path)
            for arch, group in cost.groupby("architecture"):
                times = group.set_index("config")
                for column in sorted(c for c in cost.columns if re.fullmatch(r"time_per_image_s_bs\d+", c)):
                    for config, reference in SPEEDUPS:
                        if config in times.index and reference in times.index:
                            ratio = times.loc[reference, column] / times.loc[config, column]
                            if pd.notna(ratio):
                                rows.append({"cost table": display_path(path), "architecture": arch,
                                             "batch": int(column.rsplit("bs", 1)[1]), "comparison": f"{config} vs {reference}",
                                             "speed-up": float(ratio)})
    return pd.DataFrame(rows, columns=["cost table", "architecture", "batch", "comparison", "speed-up"])


def _spread(ratios: pd.DataFrame) -> str:
    summary = ratios.groupby(["comparison", "batch"])["speed-up"].agg(["count", "min", "median", "max"]).reset_index()
    summary = summary.rename(columns={"count": "measurements"})
    return markdown_table(summary.map(lambda x: format_number(x) if isinstance(x, float) else x))


def _ci(row: pd.Series) -> str:
    return f"[{format_number(row['lo'])}, {format_number(row['hi'])}]"


def _primary(contrasts: pd.DataFrame) -> str:
    rows = contrasts[contrasts["family"] == "primary"]
    table = pd.DataFrame({
        "backbone": rows["backbone"], "contrast": rows["contrast"], "stride": rows["config"],
        "endpoint": rows["endpoint"], "n pairs": rows["n"].astype(int),
        "estimate": rows["estimate"].map(format_number), "95 % CI": rows.apply(_ci, axis=1),
        "p (Holm)": rows["p_holm"].map(format_number), "tests in family": rows["m_tests"].astype(int),
        "MDE": rows["mde"].map(format_number), "training runs per arm": rows["n_runs"].map(
            lambda v: "" if pd.isna(v) else str(int(v))), "decision": rows["decision"]})
    return markdown_table(table)


def _cache_aware(contrasts: pd.DataFrame) -> str:
    """Issue #33's contrasts (each cache-aware arm against the original at the same cached
    configuration); empty when the study has none yet."""
    rows = contrasts[contrasts["family"].astype(str).str.startswith(contract.CACHE_AWARE_FAMILY)]
    if rows.empty:
        return ""
    table = pd.DataFrame({
        "arm": rows["model"], "Holm family": rows["family"].str[len(contract.CACHE_AWARE_FAMILY):],
        "configuration": rows["config"], "n pairs": rows["n"].astype(int),
        "estimate (dB)": rows["estimate"].map(format_number), "95 % CI": rows.apply(_ci, axis=1),
        "p (Holm)": rows["p_holm"].map(format_number), "tests in family": rows["m_tests"].astype(int),
        "MDE": rows["mde"].map(format_number), "training runs": rows["n_runs"].astype(int),
        "SD over runs": rows["run_sd"].map(format_number), "decision": rows["decision"]})
    return "\n".join([
        "**Cache-aware fine-tuning** (issue #33: fine-tuned so that its cached sampling reproduces the original's "
        "full sampling; PSNR to the original's full-sampling image, trained arm (mean over its training runs) minus "
        "the original at the same cached configuration, paired over prompt and initial noise):", "",
        markdown_table(table)])


def _criteria(verdict: pd.DataFrame) -> str:
    """The criterion rows as the verdict decided them, with rows of the same verdict beside two of
    them: criterion c per backbone and its difference-in-differences analysis (context, decides
    nothing), and criterion a for the models without FCR (context). Nothing is re-decided here."""
    from fcr.analysis.robustness_criterion import C_NAME, DID_NAME

    words = {"True": "PASS", "False": "FAIL"}
    shown = []
    for _, row in verdict.iterrows():
        crit, kind, scope = str(row["criterion"]), str(row["kind"]), str(row["scope"])
        label, measured = crit, "n/a" if pd.isna(row["measured"]) else str(row["measured"])
        if crit == C_NAME:
            label = "c. robustness (the seed's definition: FCR's drop under each stress ≤ the original's)"
            if kind not in ("criterion", "part"):
                continue
        elif crit == DID_NAME:
            label = "c. (additional analysis, decides nothing: difference in differences, 0.5 dB margin)"
            runs = re.search(r"mean over (\d+) training run", str(row["note"]))
            measured += f"; FCR training runs in the stress run: {runs.group(1)}" if runs else ""
        elif crit.startswith("a. ") and kind == "context" and "FCR" not in scope:
            label = "a. (context: a model without FCR)"
        elif kind != "criterion":
            continue
        shown.append({"criterion": label, "scope": scope, "measured": measured,
                      "verdict": words.get(str(row["passed"]), "n/a")})
    return markdown_table(pd.DataFrame(shown))


def front_page_block(report_dir: Path = STUDY_REPORT) -> str:
    """The README's results block: the primary contrasts and the seed's criteria, from
    ``contrasts.csv`` and ``verdict.csv`` of ``report_dir``."""
    contrasts = pd.read_csv(report_dir / contract.CONTRASTS)
    verdict = pd.read_csv(report_dir / "verdict.csv")
    where = display_path(report_dir)
    return "\n".join([
        f"Generated from `{where}/{contract.CONTRASTS}` and `{where}/verdict.csv` by "
        "`python -m fcr.report.front_page`; nothing in this block is typed by hand.",
        "",
        "**Primary contrast** (PSNR of each cached image to the same model's full-sampling image, FCR minus "
        "control, paired over prompt and initial noise, mean over the training runs of each arm):",
        "",
        _primary(contrasts),
        *([cache_aware] if (cache_aware := _cache_aware(contrasts)) else []),
        "**The seed's success criteria** (embedded equivalents: FD of the `fashioncnn` features plays FID, "
        "the prompted class's accuracy plays CLIPScore):",
        "",
        _criteria(verdict),
        "Criterion b's wall-time speed-ups over every committed CPU measurement (each sweep's cost table; "
        "wall time depends on the machine and its load, so one measurement decides nothing; on CPU the "
        "process's resident set is no per-configuration memory measurement, so memory is n/a there):",
        "",
        _spread(wall_time_ratios()),
        "Every measurement: [docs/results/wall_time.md](docs/results/wall_time.md); every row, note and part "
        "of the verdict: [docs/results/study.md](docs/results/study.md).",
    ])


def results_page(report_dir: Path, page: Path) -> str:
    """``report_dir``'s report.md with its relative links rewritten to work from ``page``."""
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    prefix = Path(os.path.relpath(report_dir, page.parent)).as_posix()

    def relink(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"[a-z]+:|/|#", target):
            return match.group(0)
        return f"{match.group(1)}({prefix}/{target})"

    body = re.sub(r"(!?\[[^\]]*\])\(([^)]+)\)", relink, text)
    title = f"# Results: {page.stem}\n\nGenerated from `{display_path(report_dir)}/report.md` (the report stage of the pipeline); " \
            "nothing here is typed by hand. Back to the [README](../../README.md).\n\n"
    return title + body


def wall_time_page() -> str:
    ratios = wall_time_ratios()
    shown = ratios.map(lambda x: format_number(x) if isinstance(x, float) else x)
    return ("# Results: wall-time speed-ups\n\nGenerated from every committed cost table (`cost.csv` of each sweep "
            f"under {', '.join(f'`{s}`' for s in COST_SOURCES)}) by `python -m fcr.report.front_page`; speed-up = "
            "time per image of the reference configuration / of the configuration, medians of timed repeats. Back to "
            "the [README](../../README.md).\n\n" + _spread(ratios) + "\n" + markdown_table(shown))


def write_results_pages(pages: dict[str, Path] = RESULTS_PAGES, folder: Path = REPO_ROOT / "docs" / "results") -> list[Path]:
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wall_time.md").write_text(wall_time_page(), encoding="utf-8")
    written.append(folder / "wall_time.md")
    for name, report_dir in pages.items():
        if (report_dir / "report.md").is_file():
            page = folder / f"{name}.md"
            page.write_text(results_page(report_dir, page), encoding="utf-8")
            written.append(page)
    return written


PARAMETERS_START, PARAMETERS_END = "<!-- parameters:start -->", "<!-- parameters:end -->"


def parameters_table() -> str:
    """Every key of :data:`fcr.config.SCHEMA`: type, default, constraint, doc."""
    from fcr.config import SCHEMA, rule_of

    rows = [{"key": f"`{key}`", "type": p.kind, "default": f"`{p.default!r}`", "constraint": rule_of(p),
             "doc": p.doc.replace("|", "\\|")} for key, p in SCHEMA.items()]
    return markdown_table(pd.DataFrame(rows))


def write_parameters_page(page: Path = REPO_ROOT / "docs" / "parameters.md") -> Path:
    """Replace the generated table of ``page`` (between the parameters markers; appended when absent)."""
    text = page.read_text(encoding="utf-8") if page.is_file() else "# Parameters\n"
    block = (f"{PARAMETERS_START}\n## Every key (generated from `fcr/config.py` `SCHEMA`)\n\n"
             f"{parameters_table()}{PARAMETERS_END}")
    if PARAMETERS_START in text:
        text = re.sub(re.escape(PARAMETERS_START) + ".*?" + re.escape(PARAMETERS_END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    page.write_text(text, encoding="utf-8")
    return page


def main(argv: list[str] | None = None) -> int:
    from fcr.report.readme import update_readme

    parser = argparse.ArgumentParser(prog="python -m fcr.report.front_page")
    parser.add_argument("--readme", default=str(REPO_ROOT / "README.md"))
    args = parser.parse_args(argv)
    update_readme(args.readme, front_page_block(), header="## Results")
    for page in [*write_results_pages(), write_parameters_page()]:
        print(f"wrote {display_path(page)}")
    print(f"updated the results block of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
