"""The seed's stopping rule (issue #31): a candidate that fails criterion a is excluded from the
later phases; the pipeline's gate stage writes the log and the later-phase runs drop the excluded
candidates from their model lists."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from fcr import contract
from fcr.analysis.stopping_rule import candidates, excluded_models, gated_backbones, quality_gate
from fcr.manifest import Backbone, ManifestError, Study
from fcr.stage import Task
from fcr.study_design import parse_study

REPO = Path(__file__).resolve().parents[1]
GATED = Study(stopping_rule=True)
B = Backbone("base", "role", "exp", fcr_models={0.1: "fcr", 0.2: "fcr2"}, control="control",
             replicates={"fcr": ("fcr_r1",), "fcr2": ("fcr2_r1",), "control": ("control_r1",)},
             fcr_deep_models={0.1: "deep"}, study=GATED)


def _secondary(model: str, fd: str, acc: str, config: str = "FD-10") -> list[dict]:
    base = {"backbone": "base", "family": "secondary", "model": model, "config": config, "estimate": 1.0, "lo": 0.0,
            "hi": 2.0}
    return [{**base, "endpoint": "fd_increase_pct", "margin": 5.0, "decision": fd},
            {**base, "endpoint": "alignment_change_pct", "margin": -2.0, "decision": acc}]


CONTRASTS = pd.DataFrame([*_secondary("fcr", "non-inferior", "non-inferior"),
                          *_secondary("fcr2", "non-inferior", "not established at n = 320"),
                          *_secondary("fcr2", "non-inferior", "non-inferior", config="FD-20"),
                          {"backbone": "base", "family": "primary", "model": "deep", "config": "FD-10",
                           "endpoint": "psnr", "decision": "FCR worse"}])


def test_candidates_are_fcr_fine_tunes_and_their_replicates() -> None:
    assert candidates(B) == {"fcr": "fcr", "fcr_r1": "fcr", "fcr2": "fcr2", "fcr2_r1": "fcr2", "deep": "deep"}
    assert gated_backbones([B, Backbone("other", "role", "exp", study=Study())]) == [B]


def test_gate_keeps_passing_candidates_and_excludes_failing_ones_with_their_replicates() -> None:
    gate = quality_gate(CONTRASTS, [B]).set_index("candidate")
    assert gate.loc["fcr", "action"] == "kept" and gate.loc["fcr", "passed"]
    assert gate.loc["fcr_r1", "action"] == "kept" and gate.loc["fcr_r1", "tested_as"] == "fcr"
    # Criterion a at FD-10 only: fcr2 passing at FD-20 does not rescue it.
    for name in ("fcr2", "fcr2_r1"):
        assert gate.loc[name, "action"] == "excluded" and not gate.loc[name, "passed"]
        assert "not established at n = 320" in gate.loc[name, "reason"]
    # No secondary test of the deep model: kept, and the log says it was not evaluated.
    assert gate.loc["deep", "action"] == "kept" and gate.loc["deep", "passed"] is None
    assert "not evaluated" in gate.loc["deep", "reason"]
    assert quality_gate(CONTRASTS, [Backbone("base", "role", "exp", fcr_models={0.1: "fcr"})]).empty


def test_later_phase_task_drops_excluded_candidates_once_the_log_exists(tmp_path: Path) -> None:
    log = tmp_path / "stopping_rule" / contract.STOPPING_RULE
    task = Task("04", tmp_path / "robustness", [], {"robustness_models": ["base", "out/exp/fcr", "out/exp/fcr2"]},
                notebook="04_robustness", gate_log=log, gate_key="robustness_models")
    before = task.fingerprint()
    assert excluded_models(log) == set() and task.effective_overrides() == task.overrides
    log.parent.mkdir()
    quality_gate(CONTRASTS, [B]).to_csv(log, index=False)
    assert excluded_models(log) == {"fcr2", "fcr2_r1"}
    assert task.effective_overrides()["robustness_models"] == ["base", "out/exp/fcr"]
    assert task.fingerprint() != before  # the stage runs again without the excluded candidate
    assert task.overrides["robustness_models"][-1] == "out/exp/fcr2"  # the plan itself is unchanged


def test_an_actions_fingerprint_follows_the_stages_it_reads(tmp_path: Path) -> None:
    sweep = Task("03", tmp_path / "sweep", [], {"sweep_models": ["a"]}, notebook="03_stride_sweep")
    gate = Task("gate", tmp_path / "gate", [], {"stopping_rule": {}}, action=lambda: None, inputs=(sweep,))
    before = gate.fingerprint()
    sweep.overrides["sweep_models"] = ["a", "b"]
    assert gate.fingerprint() != before


def test_study_profile_gates_the_later_phases_after_the_primary_sweep() -> None:
    from fcr.pipeline import PROFILES, plan

    profile = PROFILES["study"]
    tasks = plan("embedded", profile["root"], manifest=profile["manifest"], bench=False, data=False, report=False)
    names = [t.name for t in tasks]
    gate = next(i for i, n in enumerate(names) if "stopping rule" in n)
    later = [i for i, t in enumerate(tasks) if t.notebook in ("04_robustness", "06_baselines_frontier")
             and not t.name.startswith("exp-3-cache-aware")]
    assert later and gate < min(later)
    assert [t.overrides["run_name"] for t in tasks[gate].inputs] == ["main"]
    assert names.index("exp-1-main-ablation: 03_stride_sweep (main)") < gate
    assert all(tasks[i].gate_log == tasks[gate].folder / contract.STOPPING_RULE for i in later)
    assert all(t.gate_log is None for t in tasks if t.notebook in ("03_stride_sweep", "05_mechanistic_regression"))
    # exp-3 (issue #33) has no stopping rule: its frontier samples cache-aware models, not FCR candidates.
    assert all(t.gate_log is None for t in tasks if t.name.startswith("exp-3-cache-aware"))
    # The demo does not gate (criterion a is not established at its n): no gate stage.
    assert not any("stopping rule" in t.name for t in plan("embedded", "/tmp/unused", data=False, report=False))


def test_stopping_rule_flag_is_validated() -> None:
    assert parse_study({"stopping_rule": True}, "s").stopping_rule
    assert not parse_study({}, "s").stopping_rule
    with pytest.raises(ManifestError, match="stopping_rule: expected true or false"):
        parse_study({"stopping_rule": "yes"}, "s")
    assert math.isclose(parse_study({"alpha": 0.01, "stopping_rule": False}, "s").alpha, 0.01)
