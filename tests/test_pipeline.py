"""The experiments manifest and the pipeline runner: planning, failure messages, and resuming after
SIGTERM and SIGKILL with nothing finished recomputed and the same final tables (smoke sizes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fcr.manifest import ManifestError, load_manifest
from fcr.pipeline import DONE, plan

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke_pipeline.yaml"


def test_manifest_maps_every_seed_variation_in_both_settings() -> None:
    experiments = load_manifest()
    assert list(experiments) == ["exp-1-main-ablation", "exp-2-generalisation-robustness"]
    for exp in experiments.values():
        assert 3 <= len(exp.run_variations) <= 5
        for setting in ("embedded", "sd"):
            plan_ = exp.settings[setting]
            evaluated = {m for run in plan_.notebooks for m in run.models}
            for row in [*plan_.variations.values(), *plan_.controls.values()]:
                assert row["model"] in evaluated, (exp.experiment_id, setting, row)
    raw = yaml.safe_load((REPO / "params" / "experiments.yaml").read_text())
    assert raw["expected_models"] and raw["expected_datasets"]


def _write_manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiments.yaml"
    path.write_text(text)
    return path


def test_manifest_errors_name_what_is_wrong(tmp_path: Path) -> None:
    missing_file = _write_manifest(tmp_path, """
experiments:
  - experiment_id: e
    run_variations: [a]
    settings:
      embedded:
        params: [params/no_such_file.yaml]
        variations: {a: {model: base, config: FD-5}}
""")
    with pytest.raises(ManifestError, match="no_such_file.yaml"):
        load_manifest(missing_file)
    unmapped = _write_manifest(tmp_path, """
experiments:
  - experiment_id: e
    run_variations: [a, b]
    settings:
      embedded:
        params: [params/fashion_mnist.yaml]
        variations: {a: {model: base, config: FD-5}}
""")
    with pytest.raises(ManifestError, match=r"\['b'\]"):
        load_manifest(unmapped)
    bad_notebook = _write_manifest(tmp_path, """
experiments:
  - experiment_id: e
    settings:
      embedded:
        notebooks: [{notebook: 07_nothing, models: [base]}]
""")
    with pytest.raises(ManifestError, match="07_nothing"):
        load_manifest(bad_notebook)
    unevaluated_backbone = _write_manifest(tmp_path, """
experiments:
  - experiment_id: e
    settings:
      embedded:
        notebooks: [{notebook: 03_stride_sweep, models: [base]}]
        backbones: [{original: base, role: r, fcr_models: {0.1: not_in_the_sweep}}]
""")
    with pytest.raises(ManifestError, match="not_in_the_sweep"):
        load_manifest(unevaluated_backbone)


def test_backbones_come_from_the_manifest() -> None:
    from fcr.manifest import backbones_of

    embedded = {b.name: b for b in backbones_of("embedded")}
    assert list(embedded) == ["base", "base-v", "derivative"]
    assert embedded["base"].control == "control_lambda0_fd10" and embedded["base"].robustness_run is None
    assert embedded["base-v"].fcr_configs == ("FD-10", "DPM++-FD-10") and embedded["derivative"].fcr_configs == ("FD-10",)
    sd = {b.name: b for b in backbones_of("sd")}
    assert (sd["sd21"].sweep_run, sd["sd21"].robustness_run) == ("sd21", "sd21")


def test_plan_fills_model_lists_and_quality_tables(tmp_path: Path) -> None:
    tasks = plan("embedded", root=tmp_path / "out", overlays=[SMOKE], bench=False)
    names = [t.name for t in tasks]
    assert names[0] == "01_data_prep" and names[-1] == "report"
    sweep = next(t for t in tasks if t.name == "exp-1-main-ablation: 03_stride_sweep (main)")
    assert sweep.overrides["sweep_models"][0] == "base"
    assert sweep.overrides["sweep_models"][1].endswith("exp-1-main-ablation/control_lambda0_fd10")
    mech = next(t for t in tasks if t.name.startswith("exp-2-generalisation-robustness: 05"))
    assert [Path(p).name for p in mech.overrides["quality_tables"]] == ["quality.csv", "robustness.csv"]
    # The study's λ-selection sweep runs before the main sweep and stays out of the regression.
    selection = names.index("exp-1-main-ablation: 03_stride_sweep (selection)")
    assert selection < names.index("exp-1-main-ablation: 03_stride_sweep (main)")
    mech1 = next(t for t in tasks if t.name.startswith("exp-1-main-ablation: 05"))
    assert [Path(p).parent.name for p in mech1.overrides["quality_tables"]] == ["main"]
    finetune = next(t for t in tasks if "fine-tune base-v" in t.name)
    merged = finetune.merged()
    assert (merged["model"], merged["prediction_type"], merged["lambda_fcr"]) == ("base-v", "v_prediction", 0.1)
    assert merged["max_train_steps"] == 2  # the overlay comes after the experiment's own files
    # every fine-tune of one experiment sees the same data and steps; only the variation differs
    exp1 = [t.merged() for t in tasks if t.name.startswith("exp-1-main-ablation: fine-tune")]
    assert len({(m["seed"], m["max_train_steps"], m["train_batch_size"], m["learning_rate"]) for m in exp1}) == 1
    assert sorted(m["lambda_fcr"] for m in exp1) == [0.0, 0.05, 0.1, 0.2]


def test_fingerprints_do_not_depend_on_how_the_output_folder_is_spelled(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A committed run resumes from another clone or another --root spelling: the same stages, the
    same fingerprints; a changed parameter still changes its stage's fingerprint."""
    def fingerprints(root: Path | str, overlays: tuple[Path, ...] = (SMOKE,)) -> dict[str, str]:
        return {t.name: t.fingerprint() for t in plan("embedded", root=root, overlays=overlays, bench=False,
                                                      report=False)}

    here = fingerprints(tmp_path / "clone_a" / "outputs" / "embedded")
    assert here == fingerprints(tmp_path / "clone_b" / "outputs" / "embedded")
    assert here == fingerprints(tmp_path / "clone_a" / "outputs" / ".." / "outputs" / "embedded")
    monkeypatch.chdir(tmp_path)  # a relative --root, read from the caller's folder
    assert here == fingerprints(Path("clone_c"))
    assert here == fingerprints(REPO / "outputs" / "embedded")  # inside the repository: written relative
    longer = tmp_path / "longer.yaml"
    longer.write_text("max_train_steps: 3\n")
    changed = fingerprints(tmp_path / "clone_a" / "outputs" / "embedded", overlays=(SMOKE, longer))
    fine_tunes = [name for name in here if "fine-tune" in name]
    assert fine_tunes and all(changed[name] != here[name] for name in fine_tunes)
    assert changed["01_data_prep"] == here["01_data_prep"]  # data prep does not read max_train_steps


# A small manifest for the kill/resume test: one fine-tune and the sweep, smoke sizes.
KILL_MANIFEST = """
experiments:
  - experiment_id: exp-k
    run_variations: [FD-5-baseline]
    settings:
      embedded:
        params: [params/fashion_mnist.yaml]
        finetune: [params/finetune_embedded.yaml]
        finetunes:
          control: [params/variations/control_lambda0_fd10.yaml]
        notebooks:
          - {notebook: 03_stride_sweep, models: [base, control]}
        variations:
          FD-5-baseline: {model: base, config: FD-5}
"""


def _pipeline(manifest: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "fcr.pipeline", "run", "--manifest", str(manifest), "--root", str(root),
            "-f", str(SMOKE), "--no-bench", "--no-report"]


def _start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_for(proc: subprocess.Popen, predicate, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"pipeline ended (rc {proc.returncode}) before the kill point: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError("kill point not reached in time")
        time.sleep(0.5)


QUALITY_COLUMNS = ["model", "config", "n_seeds", "fd_fashioncnn", "class_accuracy", "class_prob"]


@pytest.mark.slow
def test_killed_pipeline_resumes_without_recomputing(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path, KILL_MANIFEST)
    # Uninterrupted reference run.
    reference = tmp_path / "reference"
    done = subprocess.run(_pipeline(manifest, reference), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    root = tmp_path / "killed"
    exp = root / "exp-k"
    # 1. SIGTERM once the first fine-tune has finished.
    proc = _start(_pipeline(manifest, root))
    _wait_for(proc, lambda: (exp / "control" / DONE).is_file())
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    first_weights = sorted((exp / "control").rglob("*.safetensors"))
    assert first_weights
    stamps = {p: p.stat().st_mtime_ns for p in first_weights}
    # 2. SIGKILL (the whole process group, kernel included) once the sweep has written a result.
    proc = _start(_pipeline(manifest, root))
    _wait_for(proc, lambda: any((exp / "sweep" / "main" / "quality").glob("*.json")))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    finished = {p: p.stat().st_mtime_ns for p in (exp / "sweep" / "main" / "quality").glob("*.json")}
    assert finished
    # 3. Resume to the end.
    resumed = subprocess.run(_pipeline(manifest, root), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in first_weights} == stamps  # the finished fine-tune was skipped
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # finished sweep results were reused
    got = pd.read_csv(exp / "sweep" / "main" / "summary.csv")[QUALITY_COLUMNS]
    want = pd.read_csv(reference / "exp-k" / "sweep" / "main" / "summary.csv")[QUALITY_COLUMNS]
    pd.testing.assert_frame_equal(got, want)


@pytest.mark.slow  # executes a notebook through papermill
def test_failed_stage_names_the_notebook(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path, """
experiments:
  - experiment_id: exp-f
    settings:
      embedded:
        params: [params/fashion_mnist.yaml]
        notebooks:
          - {notebook: 03_stride_sweep, models: [no_such_model]}
""")
    root = tmp_path / "out"
    (root / "data").mkdir(parents=True)
    out = subprocess.run([*_pipeline(manifest, root), "--skip-data"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 1
    assert "03_stride_sweep" in out.stderr and "FAILED" in out.stderr
    assert str(root / "exp-f" / "sweep" / "main" / "03_stride_sweep.ipynb") in out.stderr


def test_resumed_stage_counts_its_interrupted_attempt(tmp_path: Path) -> None:
    import json

    from fcr.pipeline import ATTEMPTS, Task, run_task

    folder = tmp_path / "stage"

    def interrupted() -> None:
        (folder / "partial.txt").write_text("half")
        raise KeyboardInterrupt("killed")

    task = Task("s", folder, [], {"x": 1}, action=interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_task(task)
    assert not (folder / DONE).exists() and (folder / ATTEMPTS).is_file()
    # Place the interrupted attempt 100 s in the past, its last write 40 s in the past: it lasted 60 s.
    now = time.time()
    (folder / ATTEMPTS).write_text(json.dumps({"attempts": [{"started": now - 100}]}))
    os.utime(folder / "partial.txt", (now - 40, now - 40))
    task.action = lambda: (folder / "result.txt").write_text("done")
    stage = run_task(task)
    marker = json.loads((folder / DONE).read_text())
    assert marker["attempts"] == 2 and "resumed" in stage.status
    assert marker["seconds"] == pytest.approx(60 + marker["seconds_last_attempt"], abs=0.5)
    assert not (folder / ATTEMPTS).exists()
    assert run_task(task).status.startswith("skipped")
    # An uninterrupted stage: one attempt, seconds = its own time.
    fresh = run_task(Task("t", tmp_path / "fresh", [], {"x": 2}, action=lambda: None))
    marker = json.loads((tmp_path / "fresh" / DONE).read_text())
    assert marker["attempts"] == 1 and marker["seconds"] == marker["seconds_last_attempt"] and fresh.status == "ran"


def test_rerun_rebuilds_a_complete_stage_and_keeps_its_time(tmp_path: Path) -> None:
    import json

    from fcr.pipeline import Task, run_task, select_stages

    calls: list[int] = []
    folder = tmp_path / "exp" / "frontier" / "frontier"
    task = Task("f", folder, [], {"x": 1}, action=lambda: (calls.append(1), (folder / "t.csv").write_text(str(len(calls)))))
    run_task(task)
    first = json.loads((folder / DONE).read_text())
    assert run_task(task).status.startswith("skipped") and len(calls) == 1
    # A complete stage reruns on request (e.g. after a plot change); its files are re-inventoried
    # and the time it took to compute is kept, the rerun's beside it.
    assert run_task(task, rerun=True).status == "ran" and len(calls) == 2
    marker = json.loads((folder / DONE).read_text())
    assert marker["seconds"] == first["seconds"] and "rerun_seconds" in marker and (folder / "t.csv").read_text() == "2"
    other = Task("g", tmp_path / "exp" / "sweep" / "grid", [], {}, action=lambda: None)
    assert select_stages([task, other], tmp_path, "exp/frontier/*") == [task]
    with pytest.raises(SystemExit, match="exp/sweep/grid"):
        select_stages([task, other], tmp_path, "nothing/*")


def test_study_profile_plans_the_replicated_fine_tunes_and_its_sweeps(tmp_path: Path) -> None:
    from fcr.manifest import NOTEBOOK_KINDS
    from fcr.pipeline import PROFILES, main

    profile = PROFILES["study"]
    tasks = plan("embedded", tmp_path, manifest=profile["manifest"], bench=profile["bench"])
    names = [t.name for t in tasks]
    fine_tunes = [n.split("fine-tune ")[1] for n in names if "fine-tune" in n]
    replicated = sorted(f"{arm}{suffix}" for arm in ("control_lambda0_fd10", "fcr_lambda0.10_fd10")
                        for suffix in ("", "_seed1", "_seed2"))
    # The study's six, then what was added after its run: the 600- and 1500-step pairs, FCR-deep and
    # the Δ_max ablation.
    assert sorted(fine_tunes[:6]) == replicated
    assert fine_tunes[6:12] == ["control_lambda0_fd10_600", "fcr_lambda0.10_fd10_600", "control_lambda0_fd10_1500",
                                "fcr_lambda0.10_fd10_1500", "fcr_deep_lambda0.10_b0", "fcr_lambda0.10_dmax20"]
    # Issue #31's grid: the control and nine arms, three training seeds each, with checkpoint selection.
    grid = fine_tunes[12:42]
    assert len(grid) == 30 and grid[:3] == ["grid_control", "grid_control_seed1", "grid_control_seed2"]
    # Issue #31's exp-2 at power: control and FCR on base-v and derivative, three training seeds each.
    exp2 = {t.name.split("fine-tune ")[1]: t.merged() for t in tasks
            if t.name.startswith("exp-2-generalisation-robustness: fine-tune")}
    assert len(exp2) == 12 and fine_tunes[42:54] == list(exp2)
    assert {(p["model"], p["lambda_fcr"], p["seed"]) for p in exp2.values()} == {
        (m, lam, seed) for m in ("base-v", "derivative") for lam in (0.0, 0.1) for seed in (0, 1, 2)}
    assert all(p["max_train_steps"] == 150 and p.get("validate_every", 0) == 0 for p in exp2.values())
    # Issue #33's cache-aware arms, three training seeds each, after exp-1 and exp-2.
    exp3 = {t.name.split("fine-tune ")[1]: t.merged() for t in tasks if t.name.startswith("exp-3-cache-aware: fine-tune")}
    assert fine_tunes[54:] == list(exp3) and len(exp3) == 12
    assert {(p["cache_mode"], p["cache_interval"], p["cache_trainable"], p.get("seed", 0)) for p in exp3.values()} == {
        (mode, interval, part, seed) for mode, interval, part in (("deepcache", 10, "all"), ("deepcache", 5, "all"),
                                                                   ("encoder", 10, "all"), ("deepcache", 10, "scale_shift"))
        for seed in (0, 1, 2)}
    assert all(p["train_objective"] == "cache_aware" and p["learning_rate"] == (1e-3 if p["cache_trainable"] == "scale_shift"
                                                                                else 1e-5) for p in exp3.values())
    grid_params = {t.name.split("fine-tune ")[1]: t.merged() for t in tasks if "fine-tune grid_" in t.name}
    assert {p["seed"] for p in grid_params.values()} == {0, 1, 2}
    assert all(p["validate_every"] == 25 and p["max_train_steps"] == 150 for p in grid_params.values())
    assert grid_params["grid_ablation_features_mid_seed2"]["feature_group"] == "mid"
    assert grid_params["grid_control_seed1"]["lambda_fcr"] == 0.0
    steps = {t.name.split("fine-tune ")[1]: t.merged()["max_train_steps"] for t in tasks if "fine-tune" in t.name}
    assert steps["fcr_lambda0.10_fd10_600"] == 600 and steps["fcr_lambda0.10_fd10"] == 150
    assert steps["fcr_lambda0.10_fd10_1500"] == steps["control_lambda0_fd10_1500"] == 1500
    ablated = next(t for t in tasks if t.name.endswith("fine-tune fcr_lambda0.10_dmax20")).merged()
    assert (ablated["delta_max"], ablated["lambda_fcr"], ablated["seed"], ablated["max_train_steps"]) == (20, 0.1, 0, 150)
    sweeps = [t.folder.name for t in tasks if t.notebook == "03_stride_sweep" and "exp-1" in t.name]
    assert sweeps == ["main", "length", "ablation", "frontier", "steps25", "grid", "grid_best"]
    grid_sweep = next(t for t in tasks if t.notebook == "03_stride_sweep" and t.folder.name == "grid").merged()
    assert grid_sweep["seeds"] == [0, 1, 2, 3, 4, 5] and grid_sweep["strides"] == [1, 10, 20]
    assert len(grid_sweep["sweep_models"]) == 1 + 30  # the original and the grid's fine-tunes
    best = next(t for t in tasks if t.notebook == "03_stride_sweep" and t.folder.name == "grid_best").merged()
    assert best["seeds"] == [0, 1] and len(best["sweep_models"]) == 30
    assert best["sweep_models"][0].endswith("exp-1-main-ablation/grid_control/unet_best")
    few = next(t for t in tasks if t.notebook == "03_stride_sweep" and t.folder.name == "steps25").merged()
    assert (few["num_inference_steps"], few["strides"], few["seeds"]) == (25, [1, 5, 10], [0, 1, 2, 3, 4])
    stress = [t.merged() for t in tasks if t.notebook == "04_robustness"]
    assert [t["run_name"] for t in stress] == ["stress_pilot", "stress", "stress_replicates"]
    assert stress[0]["seeds"] == [100] and stress[1]["seeds"] == list(range(8))  # the pilot's seed is never reported
    # Issue #31: every training run of both arms, the seed's 10-step attack, the identical cells adopted.
    assert len(stress[2]["robustness_models"]) == 7 and stress[2]["seeds"] == list(range(8))
    assert (stress[1]["adversarial_steps"], stress[2]["adversarial_steps"]) == (2, 10)
    assert stress[2]["reuse_results_from"].endswith("robustness/stress")
    assert not any("benchmark" in n for n in names)
    seeds = {t.name.split("fine-tune ")[1]: t.merged()["seed"] for t in tasks if "fine-tune" in t.name}
    assert seeds["control_lambda0_fd10_seed2"] == seeds["fcr_lambda0.10_fd10_seed2"] == 2
    sweep = next(t for t in tasks if t.notebook == "03_stride_sweep")
    assert NOTEBOOK_KINDS[sweep.notebook] == "sweep" and len(sweep.merged()["sweep_models"]) == 7
    assert sweep.merged()["seeds"] == [0, 1, 2, 3, 4] and sweep.merged()["num_eval_images"] == 64
    with pytest.raises(SystemExit):
        main(["run", "--profile", "nope"])


def test_distillations_are_planned_and_their_rounds_are_model_names(tmp_path: Path) -> None:
    overlay = tmp_path / "distil.yaml"
    overlay.write_text("distill_base_steps: 16\ndistill_rounds: 2\n")
    cd_overlay = tmp_path / "cd.yaml"
    cd_overlay.write_text("distill_method: consistency\ndistill_base_steps: 50\n")
    manifest = _write_manifest(tmp_path, f"""
experiments:
  - experiment_id: e
    settings:
      embedded:
        params: [params/fashion_mnist.yaml]
        distillations: {{pd: [{overlay}], cd: [{cd_overlay}]}}
        notebooks: [{{notebook: 03_stride_sweep, models: [base, pd@round2, cd]}}]
""")
    tasks = plan("embedded", root=tmp_path / "out", manifest=manifest, bench=False, report=False, data=False)
    distil = next(t for t in tasks if t.name == "e: distil pd")
    assert distil.notebook == "02b_distillation" and distil.merged()["distill_rounds"] == 2
    sweep = next(t for t in tasks if "03_stride_sweep" in t.name)
    assert [t.name for t in tasks].index(distil.name) < [t.name for t in tasks].index(sweep.name)
    assert sweep.overrides["sweep_models"][1].endswith("e/pd/round2_steps4")
    assert sweep.overrides["sweep_models"][2].endswith("e/cd")  # a consistency student is its run folder
    clash = _write_manifest(tmp_path, """
experiments:
  - experiment_id: e
    settings:
      embedded:
        finetunes: {pd: [params/fashion_mnist.yaml]}
        distillations: {pd: [params/fashion_mnist.yaml]}
""")
    with pytest.raises(ManifestError, match="fine-tune names"):
        load_manifest(clash)
