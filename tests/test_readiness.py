"""The GPU readiness script's path on a CPU with tiny models (benchmarks/gpu_readiness.py --tiny):
random SD-architecture models saved and loaded, notebooks 01, 02 (two FCR steps) and 03 through
the pipeline runner, and the result files it promises. Timings are recorded, never asserted."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_readiness", REPO / "benchmarks" / "gpu_readiness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tokenizer_needs_no_download_and_speaks_sd_token_ids() -> None:
    tokenizer = _script().char_tokenizer()
    ids = tokenizer("a coat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and max(ids) < 49408


@pytest.mark.slow  # the SD path through the pipeline runner: data, 2 fine-tuning steps, a 4-configuration sweep
def test_readiness_runs_the_sd_path_and_writes_its_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    out = tmp_path / "results" / "readiness"
    code = _script().main(["--tiny", "--device", "cpu", "--prompts", "2", "--steps", "10", "--work", str(tmp_path / "work"),
                           "--out", str(out)])
    assert code == 0, (tmp_path / "work" / "pipeline.log").read_text()[-4000:]
    stages = pd.read_csv(f"{out}.csv")
    assert list(stages["status"]) == ["ran"] * (len(stages) - 1) + ["ok"]
    assert any("fine-tune fcr" in s for s in stages["stage"]) and any("03_stride_sweep" in s for s in stages["stage"])
    cost = pd.read_csv(f"{out}_cost.csv").set_index("config")
    assert set(cost.index) == {"full", "FD-5", "FD-10", "DeepCache-5-b0"}
    assert {"time_per_image_s_bs1", "time_per_image_s_bs8"} <= set(cost.columns)
    assert cost.loc["FD-10", "flops_per_image"] < cost.loc["FD-5", "flops_per_image"] < cost.loc["full", "flops_per_image"]
    assert Path(f"{out}.env.json").is_file()
