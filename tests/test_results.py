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


def test_a_result_cut_short_is_computed_again_never_read(tmp_path: Path) -> None:
    path = tmp_path / "cell.json"
    run_or_load(path, {"a": 1}, lambda: {"fd": 1.0})
    path.write_text(path.read_text()[:25])  # a copy interrupted half way
    assert run_or_load(path, {"a": 1}, lambda: {"fd": 2.0}) == ({"fd": 2.0}, True)


def test_a_result_whose_side_file_is_missing_or_truncated_is_computed_again(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    side = tmp_path / "cell.safetensors"
    path = tmp_path / "cell.json"

    def compute():
        save_file({"images": torch.zeros(4, 2)}, str(side))
        return {"fd": 1.0}

    requires = {side: ("images",)}
    assert run_or_load(path, {"a": 1}, compute, requires=requires)[1] is True
    assert run_or_load(path, {"a": 1}, compute, requires=requires)[1] is False  # whole: loaded
    side.unlink()
    assert run_or_load(path, {"a": 1}, compute, requires=requires)[1] is True  # missing: computed again
    side.write_bytes(side.read_bytes()[:-8])
    assert run_or_load(path, {"a": 1}, compute, requires=requires)[1] is True  # truncated: computed again
    assert run_or_load(path, {"a": 1}, compute, requires={side: ("features",)})[1] is True  # a key missing


def test_results_store_paths_of_this_checkout_relative_to_it(tmp_path: Path) -> None:
    import json

    from fcr.paths import REPO_ROOT

    path = tmp_path / "cell.json"
    source = str(REPO_ROOT / "outputs" / "study" / "run")
    run_or_load(path, {"model_source": source}, lambda: {"fd": 1.0})
    assert json.loads(path.read_text())["config"]["model_source"] == "outputs/study/run"
    # The same cell asked for with the relative spelling (another clone, another --root) is found.
    assert run_or_load(path, {"model_source": "outputs/study/run"}, lambda: {"fd": 2.0}) == ({"fd": 1.0}, False)


def test_a_finished_runs_identical_cell_is_adopted_and_only_that(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from fcr.eval.results import adopt_result

    src, dst = tmp_path / "done", tmp_path / "new"
    src.mkdir()

    def compute():
        save_file({"images": torch.ones(2, 2)}, str(src / "cell.safetensors"))
        return {"fd": 1.0}

    run_or_load(src / "cell.json", {"a": 1, "path": (1, 2)}, compute, requires={src / "cell.safetensors": ()})
    sides = {src / "cell.safetensors": dst / "cell.safetensors"}
    assert not adopt_result(src / "cell.json", dst / "cell.json", {"a": 2, "path": [1, 2]}, sides)  # other params
    assert not (dst / "cell.json").exists() and not (dst / "cell.safetensors").exists()
    assert not adopt_result(src / "missing.json", dst / "cell.json", {"a": 1, "path": [1, 2]}, sides)
    assert adopt_result(src / "cell.json", dst / "cell.json", {"a": 1, "path": [1, 2]}, sides)  # a tuple stored as list
    assert (dst / "cell.safetensors").read_bytes() == (src / "cell.safetensors").read_bytes()
    result, computed = run_or_load(dst / "cell.json", {"a": 1, "path": [1, 2]}, lambda: {"fd": 9.0},
                                   requires={dst / "cell.safetensors": ()})
    assert (result, computed) == ({"fd": 1.0}, False)
    assert not adopt_result(src / "cell.json", dst / "cell.json", {"a": 1, "path": [1, 2]}, sides)  # has its own
    (src / "cell.safetensors").write_bytes(b"cut")  # a damaged source is never adopted
    assert not adopt_result(src / "cell.json", tmp_path / "third" / "cell.json", {"a": 1, "path": [1, 2]},
                            {src / "cell.safetensors": tmp_path / "third" / "cell.safetensors"})
