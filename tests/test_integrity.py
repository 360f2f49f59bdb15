"""Completeness is checked, never assumed: readable files, stage inventories, the pipeline re-running
a stage whose files are missing or damaged, ``verify`` on a clone of the committed results, and the
main job's reproduction table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from fcr import contract
from fcr.files import problem
from fcr.markers import incomplete, write_marker
from fcr.pipeline import Task, run_task

REPO = Path(__file__).resolve().parents[1]


def test_problem_names_each_kind_of_damage(tmp_path: Path) -> None:
    tensors = tmp_path / "cell.safetensors"
    save_file({"images": torch.zeros(3, 4)}, str(tensors))
    assert problem(tensors, ("images",)) is None
    assert "features" in problem(tensors, ("images", "features"))
    tensors.write_bytes(tensors.read_bytes()[:-5])
    assert problem(tensors).startswith("unreadable")
    table = tmp_path / "t.csv"
    table.write_text("a,b\n1,2\n3,4\n")
    assert problem(table) is None
    table.write_text("a,b\n1,2\n3")  # cut in the middle of a row
    assert "not a table" in problem(table)
    record = tmp_path / "r.json"
    record.write_text('{"a": [1, 2')
    assert problem(record).startswith("unreadable")
    assert problem(tmp_path / "absent.csv") == "missing"


def _stage(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.arange(10.0)}, str(folder / "cell.safetensors"))
    (folder / "table.csv").write_text("a\n1\n")
    (folder / contract.TRANSIENT).mkdir(exist_ok=True)
    (folder / contract.TRANSIENT / "step_1.safetensors").write_bytes(b"resume state")


def test_a_marker_counts_only_with_every_file_it_lists_whole(tmp_path: Path) -> None:
    folder = tmp_path / "stage"
    _stage(folder)
    marker = write_marker(folder, "abc", {"seconds": 1.0})
    assert sorted(marker["files"]) == ["cell.safetensors", "table.csv"]  # checkpoints are not results
    assert incomplete(folder, "abc") == []
    assert "other parameters" in incomplete(folder, "xyz")[0]
    data = (folder / "cell.safetensors").read_bytes()
    (folder / "cell.safetensors").write_bytes(data[:-4])
    assert incomplete(folder, "abc") == [f"cell.safetensors: {len(data) - 4} bytes, the stage wrote {len(data)} "
                                         "(cut short or changed)"]
    (folder / "cell.safetensors").unlink()
    assert incomplete(folder, "abc") == ["cell.safetensors: missing"]
    legacy = tmp_path / "legacy"  # a marker without an inventory says nothing about the files
    legacy.mkdir()
    (legacy / contract.DONE_MARKER).write_text(json.dumps({"fingerprint": "abc", "seconds": 1}))
    assert "lists no files" in incomplete(legacy, "abc")[0]


def test_a_notebook_stage_needs_the_files_its_contract_names(tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    _stage(folder)
    write_marker(folder, "abc", {})
    reasons = incomplete(folder, "abc", "03_stride_sweep")
    assert len(reasons) == len(contract.STAGE_OUTPUTS["03_stride_sweep"])
    assert all("the notebook writes it" in r for r in reasons)


def test_the_pipeline_runs_a_stage_again_when_a_file_is_missing(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "stage"
    runs = []

    def action() -> None:
        runs.append(1)
        _stage(folder)

    task = Task("s", folder, [], {"x": 1}, action=action)
    assert run_task(task).status == "ran"
    assert run_task(task).status.startswith("skipped")
    (folder / "table.csv").unlink()
    assert run_task(task).status == "ran" and len(runs) == 2
    assert "not complete: table.csv: missing" in capsys.readouterr().out


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.mark.slow
def test_verify_passes_on_the_committed_results_and_names_each_damage_in_a_clone(tmp_path: Path) -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--local", "--no-hardlinks", str(REPO), str(clone)], check=True)
    verify = [sys.executable, "-m", "fcr.pipeline", "verify"]
    clean = subprocess.run(verify, cwd=clone, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]

    sweep = clone / "outputs" / "study" / "exp-1-main-ablation" / "sweep" / "main"
    deleted = sorted((sweep / "quality").glob("*.json"))[0]
    deleted.unlink()
    truncated = sorted((sweep / "quality").glob("*.safetensors"))[-1]
    truncated.write_bytes(truncated.read_bytes()[:-16])
    table = clone / "outputs" / "reference" / "demo" / "report" / "safe_strides.csv"
    table.write_text(table.read_text().replace(",base,", ",/home/someone/fcr/models/base,", 1))
    damaged = subprocess.run(verify, cwd=clone, capture_output=True, text=True)
    assert damaged.returncode == 2
    problems = [line for line in damaged.stdout.splitlines() if not line.startswith(("note:", "verify:"))]
    assert len(problems) == 3, damaged.stdout
    rel = lambda p: p.relative_to(clone).as_posix()  # noqa: E731
    assert any(rel(deleted.parent.parent) in line and f"quality/{deleted.name}: missing" in line for line in problems)
    assert any(f"quality/{truncated.name}" in line and "cut short" in line for line in problems)
    assert any(line.startswith(rel(table)) and "absolute machine path" in line for line in problems)


def _report(folder: Path, fd: float, flops: float, fingerprint: str) -> Path:
    report = folder / "report"
    report.mkdir(parents=True)
    pd.DataFrame([{"variation": "FD-10-baseline", "model": "base", "config": "FD-10", "fd": fd, "fd_lo": 10.0,
                   "fd_hi": 14.0, "flops_per_image": flops, "time_per_image_s_bs1": fd / 10}]
                 ).to_csv(report / "exp1_table.csv", index=False)
    pd.DataFrame([{"stage": "sweep", "seconds": 1.0, "attempts": 1, "finished": "t", "fingerprint": fingerprint}]
                 ).to_csv(report / contract.STAGE_TIMES, index=False)
    return report


def test_reproduction_table_judges_each_metric_by_its_stated_rule(tmp_path: Path) -> None:
    from fcr.report.reproduction import reproduction_section, reproduction_table

    ref = _report(tmp_path / "ref", fd=12.0, flops=1e9, fingerprint="same")
    close = _report(tmp_path / "close", fd=13.5, flops=1e9, fingerprint="same")  # within the half-width 2
    table = reproduction_table(close, ref).set_index("metric")
    assert table.loc["fd", "within"] and table.loc["fd", "tolerance"] == pytest.approx(2.0)
    assert table.loc["flops_per_image", "within"] and table.loc["time_per_image_s_bs1", "rule"] == "shown"
    far = _report(tmp_path / "far", fd=14.5, flops=1.1e9, fingerprint="same")
    table = reproduction_table(far, ref).set_index("metric")
    assert not table.loc["fd", "within"] and not table.loc["flops_per_image", "within"]
    lines, judged = reproduction_section(tmp_path / "far", far, tmp_path / "ref")
    assert judged is not None and "0 of 2 judged values are within tolerance" in "\n".join(lines)
    other = _report(tmp_path / "other", fd=12.0, flops=1e9, fingerprint="smoke")
    lines, judged = reproduction_section(tmp_path / "other", other, tmp_path / "ref")
    assert judged is None and "Not compared" in "\n".join(lines)


def test_the_committed_reference_is_a_snapshot_the_main_job_never_writes_into() -> None:
    from fcr.pipeline import DEMO_REFERENCE, PROFILES, plan

    tasks = plan("embedded", manifest=PROFILES["main"]["manifest"])
    assert all(not t.folder.resolve().is_relative_to(DEMO_REFERENCE.resolve()) for t in tasks)
    assert (DEMO_REFERENCE / "report" / contract.STAGE_TIMES).is_file()
    assert not list(DEMO_REFERENCE.rglob(contract.DONE_MARKER))  # no marker: nothing to resume or skip
    ignored = subprocess.run(["git", "check-ignore", "-q", "outputs/embedded/x.csv"], cwd=REPO)
    if (REPO / ".git").exists() and shutil.which("git"):
        assert ignored.returncode == 0  # the main job's folder is never committed


def test_verify_notes_a_stage_in_progress_and_flags_tables_without_a_marker(tmp_path: Path) -> None:
    """A stage whose finished per-cell results are committed resumes from them (a note); tables
    without a marker are a problem."""
    from fcr.verify import Committed, _profile_problems

    exp = tmp_path / "exp-1-main-ablation" / "sweep"
    (exp / "grid" / "quality").mkdir(parents=True)
    (exp / "grid" / "quality" / "base__full__seed0.json").write_text("{}")
    (exp / "grid_best").mkdir(parents=True)
    (exp / "grid_best" / contract.QUALITY).write_text("model\n")
    # A distillation resumes from its finished rounds (record written last); an unfinished round is a problem.
    finished = tmp_path / "exp-1-main-ablation" / "pd_base" / "round1_steps24"
    (finished / "unet").mkdir(parents=True)
    (finished / "unet" / "config.json").write_text("{}")
    (finished / contract.DISTILLATION_FILE).write_text("{}")
    unfinished = tmp_path / "exp-1-main-ablation" / "pd_fcr_base" / "round1_steps24"
    unfinished.mkdir(parents=True)
    (unfinished / "train_log.csv").write_text("step\n")
    problems, notes = _profile_problems(Committed("study", tmp_path, profile="study"), tmp_path, None)
    assert any("sweep/grid:" in n and "in progress (1 per-cell result files committed" in n for n in notes)
    assert any("sweep/grid_best: no completion marker" in p for p in problems)
    assert not any("sweep/grid:" in p for p in problems)
    assert any("pd_base:" in n and "in progress (2 per-cell" in n for n in notes)
    assert not any("pd_base" in p for p in problems) and any("pd_fcr_base: no completion marker" in p for p in problems)
