"""Result files: skipped when present with the same config, refused when stale, atomic."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcr.eval.results import StaleResultError, run_or_load


def test_finished_configurations_are_skipped(tmp_path: Path) -> None:
    calls = []

    def compute():
        calls.append(1)
        return {"fd": 1.5}

    path = tmp_path / "stride5.json"
    assert run_or_load(path, {"stride": 5, "keys": (0, 5)}, compute) == ({"fd": 1.5}, True)
    assert run_or_load(path, {"stride": 5, "keys": [0, 5]}, compute) == ({"fd": 1.5}, False)
    assert len(calls) == 1


def test_a_result_from_other_parameters_is_not_reused(tmp_path: Path) -> None:
    path = tmp_path / "stride5.json"
    run_or_load(path, {"stride": 5, "seed": 0}, lambda: {"fd": 1.0})
    with pytest.raises(StaleResultError, match=r"differing: \['seed'\]"):
        run_or_load(path, {"stride": 5, "seed": 1}, lambda: {"fd": 2.0})


def test_a_failed_computation_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"

    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        run_or_load(path, {"a": 1}, boom)
    assert not path.exists() and not list(tmp_path.iterdir())
