"""The main job: ``python -m fcr.pipeline run --setting embedded``.

Runs every experiment of ``params/experiments.yaml`` for one setting, each notebook through
papermill: data preparation (01), the cost benchmark, then per experiment the fine-tunes (02, one
run folder per variation) and the evaluation notebooks (03 sweep, 04 robustness, 05 mechanistic
regression) into ``<root>/<experiment>/``, and finally the combined tables, figures and the
success-criteria verdict (:func:`analyze_and_report`: ``fcr.analysis`` writes the tables,
``fcr.report`` formats them) into ``<root>/report/``.

Resumable: a stage that finished leaves a marker (:mod:`fcr.markers`) with the hash of its
parameters and the inventory of the files it wrote; it is skipped next time only when the hash
matches and every listed file is present, unchanged and readable (otherwise it runs again, and
inside it training resumes from its last checkpoint and the notebooks skip the per-configuration
results that are whole). A failing notebook stops the job with papermill's error and the path of
the failed notebook.

``python -m fcr.pipeline verify`` checks the committed results (:mod:`fcr.verify`).
"""

from __future__ import annotations

import argparse
import fnmatch
import signal
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from fcr import contract
from fcr.files import write_json_atomic
from fcr.grid_design import split_variant
from fcr.manifest import MANIFEST, MODEL_LIST_KEYS, Experiment, SettingPlan, load_manifest
from fcr.markers import (make_portable, read_marker, stage_times, write_marker,
                         write_stage_times)
from fcr.paths import REPO_ROOT
from fcr.stage import ATTEMPTS, DONE, PipelineError, Stage, Task, json_list, rel_path, run_task

__all__ = ["ATTEMPTS", "DONE", "PROFILES", "PipelineError", "Stage", "Task", "analyze_and_report", "main", "plan", "run",
           "run_task"]

SETTING_DATA_PARAMS = {"embedded": "params/fashion_mnist.yaml", "sd": "params/sd15.yaml"}
# The committed copy of a demo run (tables, report, stage times; no weights or images): the main
# job's report compares its own numbers with it, and the study's shows its stage times. The main job
# writes into outputs/<setting>/, which is never committed, so it never writes here.
DEMO_REFERENCE = REPO_ROOT / "outputs" / "reference" / "demo"
# Named profiles: the experiments manifest, the output folder, whether the cost benchmark runs, whose
# stage times the report shows beside its own and which committed run it is compared with.
# ``main``: the <= 40 min demo on 2 CPU cores; ``study``: the powered study of params/study/ (hours on CPU).
PROFILES = {
    "main": {"manifest": MANIFEST, "root": None, "bench": True, "timing_beside": None, "reference": DEMO_REFERENCE},
    "study": {"manifest": REPO_ROOT / "params" / "study" / "experiments.yaml",
              "root": REPO_ROOT / "outputs" / "study", "bench": False,
              "timing_beside": DEMO_REFERENCE, "reference": None},  # the demo's stage times beside the study's
}


def plan(
    setting: str = "embedded",
    root: str | Path | None = None,
    experiments: list[str] | None = None,
    overlays: list[str | Path] = (),
    manifest: str | Path = MANIFEST,
    bench: bool = True,
    report: bool = True,
    data: bool = True,
    readme: str | Path | None = None,
    timing_beside: str | Path | None = None,
    reference: str | Path | None = None,
) -> list[Task]:
    """The tasks of the main job in order. ``overlays``: parameter files applied after every
    stage's own files (e.g. params/smoke_pipeline.yaml for a code-path run); ``root`` the output
    folder (default ``outputs/<setting>``); ``timing_beside``: another run whose stage times the
    report shows beside this run's (the study shows the demo's); ``reference``: a committed run the
    report compares this run's numbers with (the main job: :data:`DEMO_REFERENCE`)."""
    if setting not in SETTING_DATA_PARAMS:
        raise SystemExit(f"--setting {setting!r}: allowed {sorted(SETTING_DATA_PARAMS)}")
    root = Path(root) if root is not None else REPO_ROOT / "outputs" / setting
    overlays = [Path(p) for p in overlays]
    all_experiments = load_manifest(manifest)
    chosen = experiments or list(all_experiments)
    unknown = [e for e in chosen if e not in all_experiments]
    if unknown:
        raise SystemExit(f"unknown experiment(s) {unknown}; the manifest has {list(all_experiments)}")
    common = {"data_dir": rel_path(root / "data")}
    tasks = []
    if data:
        tasks.append(Task("01_data_prep", root / "data", [REPO_ROOT / SETTING_DATA_PARAMS[setting], *overlays],
                          dict(common), notebook="01_data_prep"))
    if bench and setting == "embedded":
        out = root / "benchmarks" / "core_quick.csv"

        def core_benchmark(out: Path = out) -> None:
            subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_core.py"), "--quick", "--out", str(out)],
                           check=True, cwd=REPO_ROOT)

        tasks.append(Task("core benchmark (quick)", out.parent, [], {"quick": True}, action=core_benchmark))
    for exp_id in chosen:
        tasks += _experiment_tasks(all_experiments[exp_id], setting, root, overlays, common)
    if report:
        report_dir = root / "report"

        def build(root: Path = root, setting: str = setting, manifest: str | Path = manifest) -> None:
            write_stage_times(root, stage_times(root))
            analyze_and_report(root, setting=setting, manifest=manifest, timing_beside=timing_beside,
                               reference=reference, readme=readme)

        tasks.append(Task("report", report_dir, [], {"experiments": chosen, "always": time.time()}, action=build))
    for task in tasks:
        task.root = root
    return tasks


def analyze_and_report(root: str | Path, *, setting: str = "embedded", manifest: str | Path = MANIFEST,
                       timing_beside: str | Path | None = None, reference: str | Path | None = None,
                       readme: str | Path | None = None) -> dict[str, Any]:
    """The report stage: the analysis (:func:`fcr.analysis.run.analyze`, derived tables and the
    verdict) into ``root/report``, then the report formatted from them
    (:func:`fcr.report.tables.build_report`); with ``readme``, its results block and the profile's
    docs/results page too."""
    from fcr.analysis.run import analyze
    from fcr.report.tables import build_report

    root = Path(root)
    report_dir = root / "report"
    analyze(root, report_dir, setting=setting, manifest=manifest)
    report = build_report(root, report_dir, setting=setting, manifest=manifest, timing_beside=timing_beside,
                          reference=reference)
    if readme is not None:  # the README's results block and the profile's docs/results page
        from fcr.report.front_page import RESULTS_PAGES, front_page_block, write_results_pages
        from fcr.report.readme import update_readme

        update_readme(readme, front_page_block(report_dir), header="## Results")
        write_results_pages({n: d for n, d in RESULTS_PAGES.items() if d.resolve() == report_dir.resolve()})
    return report


def _model_source(model: str, finetuned: Mapping[str, str]) -> str:
    """What a notebook loads for a manifest model name: a fine-tune's run folder, its best-step
    weights for ``<fine-tune>@best`` (labelled so in result tables), else the name as it is."""
    name, variant = split_variant(model)
    if variant == "best" and name in finetuned:
        return rel_path(Path(finetuned[name]) / contract.BEST_UNET)
    return finetuned.get(model, model)


def _round_sources(name: str, folder: Path, param_files: list[Path], common: Mapping[str, Any]) -> dict[str, str]:
    """{``<name>@round<r>``: the round's folder} of a progressive distillation run by its parameters;
    {``<name>``: its folder} of a consistency distillation (one student)."""
    from fcr.config import load_options
    from fcr.train.distillation import progressive_rounds

    d = load_options(*param_files, overrides=dict(common)).distillation
    if d.distill_method == "consistency":
        return {name: rel_path(folder)}
    return {f"{name}@round{r.index}": rel_path(folder / r.folder_name)
            for r in progressive_rounds(d.distill_base_steps, d.distill_rounds, d.distill_guidance_scale)}


# The seed's later phases: robustness (phase 4) and the combination frontier (phase 3) run only the
# candidates the stopping rule kept; phase 1 (sweeps, mechanism) runs every candidate.
GATED_NOTEBOOKS = ("04_robustness", "06_baselines_frontier")


def _gate_sweeps(spec: SettingPlan) -> set[str]:
    """The 03 runs the stopping rule reads: the gated backbones' sweeps and the λ-selection run."""
    from fcr.analysis.stopping_rule import gated_backbones

    runs = {b.sweep_run for b in gated_backbones(spec.backbones)}
    if spec.study is not None and spec.study.selection_run is not None:
        runs.add(spec.study.selection_run)
    return runs


def _stopping_rule_task(exp: Experiment, spec: SettingPlan, root: Path, exp_dir: Path) -> Task | None:
    """The stage that writes the stopping rule's log (``<exp>/stopping_rule/stopping_rule.csv``) for
    the backbones whose study sets ``stopping_rule``; None when none does."""
    from fcr.analysis.stopping_rule import CRITERION_A_CONFIG, gated_backbones, write_gate

    gated = gated_backbones(spec.backbones)
    if not gated:
        return None
    folder = exp_dir / "stopping_rule"

    def gate(root: Path = root, folder: Path = folder) -> None:
        log = write_gate(root, gated, folder)
        print(f"   stopping rule: {folder / contract.STOPPING_RULE}", flush=True)
        for _, r in log.iterrows():
            print(f"   - {r['candidate']}: {r['action']} ({r['reason']})", flush=True)

    return Task(f"{exp.experiment_id}: stopping rule (criterion a, {CRITERION_A_CONFIG})", folder, [],
                {"stopping_rule": {"config": CRITERION_A_CONFIG, "backbones": [b.name for b in gated]}}, action=gate)


def _experiment_tasks(exp: Experiment, setting: str, root: Path, overlays: list[Path], common: dict) -> list[Task]:
    if setting not in exp.settings:
        raise SystemExit(f"{exp.experiment_id} has no {setting!r} setting in the manifest")
    spec = exp.settings[setting]
    exp_dir = root / exp.experiment_id
    tasks = []
    finetuned = {name: rel_path(exp_dir / name) for name in spec.finetunes}
    for name, files in spec.finetunes.items():
        tasks.append(Task(f"{exp.experiment_id}: fine-tune {name}", exp_dir / name,
                          [*spec.params, *spec.finetune, *files, *overlays],
                          {**common, "output_dir": rel_path(exp_dir), "run_name": name}, notebook="02_finetune"))
    for name, files in spec.distillations.items():
        param_files = [*spec.params, *files, *overlays]
        tasks.append(Task(f"{exp.experiment_id}: distil {name}", exp_dir / name, param_files,
                          {**common, "output_dir": rel_path(exp_dir), "run_name": name}, notebook="02b_distillation"))
        finetuned.update(_round_sources(name, exp_dir / name, param_files, common))
    tables: list[str] = []
    gate = _stopping_rule_task(exp, spec, root, exp_dir)
    for run in spec.notebooks:
        folder = exp_dir / run.kind / run.run
        overrides = {**common, "output_dir": rel_path(exp_dir), "run_name": run.run,
                     MODEL_LIST_KEYS[run.notebook]: [_model_source(m, finetuned) for m in run.models]}
        gated = gate is not None and run.notebook in GATED_NOTEBOOKS
        if gated and not any(t is gate for t in tasks):  # the gate runs once, before the first later phase
            gate.inputs = tuple(t for t in tasks if t.notebook == "03_stride_sweep"
                                and t.overrides.get("run_name") in _gate_sweeps(spec))
            tasks.append(gate)
        if run.notebook == "05_mechanistic_regression":
            overrides["quality_tables"] = list(tables)
        if run.notebook == "06_baselines_frontier":  # the sweep run of the same name (the manifest checks it)
            overrides["frontier_sweep_run"] = run.run
        tasks.append(Task(f"{exp.experiment_id}: {run.notebook} ({run.run})", folder,
                          [*spec.params, *run.params, *overlays], overrides, notebook=run.notebook,
                          gate_log=gate.folder / contract.STOPPING_RULE if gated else None,
                          gate_key=MODEL_LIST_KEYS[run.notebook] if gated else None))
        selection = spec.study.selection_run if spec.study is not None else None
        if run.notebook == "03_stride_sweep" and run.run != selection:  # λ-selection data stays out of 05
            tables.append(rel_path(folder / contract.QUALITY))
        elif run.notebook == "04_robustness":
            tables.append(rel_path(folder / contract.ROBUSTNESS))
    return tasks


def _terminate(signum, frame) -> None:  # noqa: ARG001
    # SIGTERM unwinds like Ctrl-C, so papermill shuts its kernel down; finished stages keep their markers.
    raise KeyboardInterrupt(f"signal {signum}")


def _record_invocation(root: Path) -> None:
    """Append this invocation's code revision and start time to ``<root>/pipeline_run.json``: the
    report's provenance names the commit(s) the results were made with, not the one it runs at."""
    from fcr.report.readme import RUN_INFO, code_revision

    path = root / RUN_INFO
    invocations = json_list(path, "invocations")
    invocations.append({**code_revision(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"invocations": invocations})


def run(setting: str = "embedded", *, root: str | Path | None = None, experiments: list[str] | None = None,
        overlays: list[str | Path] = (), bench: bool = True, readme: str | Path | None = None,
        manifest: str | Path = MANIFEST, report: bool = True, data: bool = True,
        timing_beside: str | Path | None = None, reference: str | Path | None = None,
        stages: str | None = None, rerun: bool = False) -> list[Stage]:
    """Run (or resume) the main job; returns what each stage did. ``stages``: a glob on the stage
    folders relative to the root (``exp-1-*/frontier/*``): only those run; ``rerun``: run the
    chosen stages even when complete."""
    signal.signal(signal.SIGTERM, _terminate)
    tasks = plan(setting, root, experiments, overlays, manifest=manifest, bench=bench, report=report, data=data,
                 readme=readme, timing_beside=timing_beside, reference=reference)
    root_dir = Path(root) if root is not None else REPO_ROOT / "outputs" / setting
    if stages is not None:
        tasks = select_stages(tasks, root_dir, stages)
    _record_invocation(root_dir)
    done: list[Stage] = []
    start = time.perf_counter()
    for task in tasks:
        print(f"== {task.name}", flush=True)
        done.append(run_task(task, rerun=rerun))
        print(f"   {done[-1].status} ({done[-1].seconds:.0f} s) -> {done[-1].output}", flush=True)
    total = time.perf_counter() - start
    timing = [{"name": s.name, "status": s.status, "seconds": s.seconds} for s in done]
    write_json_atomic(root_dir / "report" / contract.PIPELINE_TIMING,
                      {"total_seconds_this_invocation": total, "stages": timing})
    print("\n== main job summary ==")
    for s in done:
        print(f"- {s.name}: {s.status} -> {s.output} ({s.seconds:.0f} s)")
    print(f"total {total:.0f} s this invocation")
    return done


def select_stages(tasks: list[Task], root: Path, pattern: str) -> list[Task]:
    """The tasks whose folder, relative to ``root``, matches the glob ``pattern``; none is an error
    that lists the folders there are."""
    folders = [t.folder.relative_to(root).as_posix() if t.folder.is_relative_to(root) else t.folder.as_posix()
               for t in tasks]
    chosen = [t for t, f in zip(tasks, folders) if fnmatch.fnmatch(f, pattern)]
    if not chosen:
        raise SystemExit(f"--stage {pattern!r} matches no stage folder; there are: {', '.join(folders)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcr.pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the main job")
    r.add_argument("experiments", nargs="*", help="experiment ids (default: all in the manifest)")
    r.add_argument("--setting", default="embedded", choices=sorted(SETTING_DATA_PARAMS))
    r.add_argument("--profile", default="main", choices=sorted(PROFILES),
                   help="main: the demo (params/experiments.yaml -> outputs/<setting>); study: the powered study "
                        "(params/study/experiments.yaml -> outputs/study, no benchmark); --manifest/--root override")
    r.add_argument("--root", default=None, help="output folder (default: the profile's)")
    r.add_argument("-f", "--params", action="append", default=[], dest="overlays",
                   help="parameter file applied after every stage's own (repeatable)")
    r.add_argument("--no-bench", action="store_true", help="skip the core cost benchmark")
    r.add_argument("--readme", default=None, help="write the results section of this README from the run")
    r.add_argument("--manifest", default=None, help="experiments manifest (default: the profile's)")
    r.add_argument("--no-report", action="store_true", help="skip the combined report")
    r.add_argument("--skip-data", action="store_true", help="skip data preparation (data_dir already prepared)")
    r.add_argument("--stage", default=None, dest="stages",
                   help="only the stages whose folder (relative to the root) matches this glob")
    r.add_argument("--rerun", action="store_true", help="run the chosen stages even when complete")
    r.add_argument("--reference", default=None, help="committed run to compare this run's numbers with "
                   "(default: the profile's; 'none' for no comparison)")
    sub.add_parser("verify", help="check the committed results: markers, their files, fingerprints, machine paths")
    rep = sub.add_parser("report", help="the report stage alone: analysis tables, then report.md")
    rep.add_argument("--profile", default="main", choices=sorted(PROFILES))
    rep.add_argument("--root", default=None, help="the run's output folder (default: the profile's)")
    rep.add_argument("--setting", default="embedded", choices=sorted(SETTING_DATA_PARAMS))
    rep.add_argument("--manifest", default=None, help="experiments manifest (default: the profile's)")
    rep.add_argument("--readme", default=None, help="also write the results block of this README")
    args = parser.parse_args(argv)
    if args.command == "verify":
        from fcr.verify import main as verify_main

        return verify_main()
    profile = PROFILES[args.profile]
    if args.command == "report":
        root = Path(args.root or profile["root"] or REPO_ROOT / "outputs" / args.setting)
        report_dir = root / "report"
        previous = read_marker(report_dir)
        write_stage_times(root, stage_times(root))
        analyze_and_report(root, setting=args.setting, manifest=args.manifest or profile["manifest"],
                           timing_beside=profile["timing_beside"], reference=profile["reference"],
                           readme=args.readme)
        make_portable(report_dir)
        if previous is not None:  # the stage's marker lists the rebuilt files, so verify keeps passing
            record = {k: v for k, v in previous.items() if k not in ("files", "fingerprint")}
            write_marker(report_dir, str(previous.get("fingerprint", "")),
                         {**record, "rebuilt": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        print(f"report: {report_dir / 'report.md'}")
        return 0
    reference = profile["reference"] if args.reference is None else (None if args.reference == "none" else args.reference)
    try:
        run(args.setting, root=args.root if args.root is not None else profile["root"],
            experiments=args.experiments or None, overlays=args.overlays,
            bench=profile["bench"] and not args.no_bench, readme=args.readme,
            manifest=args.manifest if args.manifest is not None else profile["manifest"],
            report=not args.no_report, data=not args.skip_data, timing_beside=profile["timing_beside"],
            reference=reference, stages=args.stages, rerun=args.rerun)
    except PipelineError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc}); run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
