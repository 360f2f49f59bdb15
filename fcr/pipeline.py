"""The main job: ``python -m fcr.pipeline run --setting embedded``.

Runs, in order, every stage that exists, each notebook through papermill into
``outputs/<setting>/notebooks/``, skipping stages whose outputs are already complete, and says
plainly which stages are not built yet. It never fakes a stage that does not exist.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fcr.models import ModelNotFoundError, resolve_unet_dir
from fcr.notebooks import NOTEBOOKS_DIR, run_notebook
from fcr.paths import REPO_ROOT

__all__ = ["Stage", "main", "run"]

SETTINGS = {"embedded": [REPO_ROOT / "params" / "fashion_mnist.yaml"]}

# Stages the repository does not have yet, with the issue that builds them (shown, never faked).
NOT_BUILT = [
    "fine-tuning of the exp-1/exp-2 variations and their stride sweep (needs all embedded base models; issues 3-4)",
    "notebook 04_robustness and 05_mechanistic_regression, success-criteria verdict (issue 5)",
    "params/experiments.yaml manifest over both experiments (issue 5)",
]


@dataclass
class Stage:
    """One step of the main job and what it left behind."""

    name: str
    status: str
    output: str
    seconds: float


def _notebook_stage(name: str, setting: str, params: list[Path], done_marker: Path) -> Stage:
    out = REPO_ROOT / "outputs" / setting / "notebooks" / f"{name}.ipynb"
    if done_marker.exists() and out.exists():
        return Stage(name, "skipped (already complete)", str(out.relative_to(REPO_ROOT)), 0.0)
    start = time.perf_counter()
    run_notebook(NOTEBOOKS_DIR / f"{name}.ipynb", out, params)
    return Stage(name, "ran", str(out.relative_to(REPO_ROOT)), time.perf_counter() - start)


def run(setting: str = "embedded", bench: bool = True) -> list[Stage]:
    """Run every existing stage of the main job for ``setting``."""
    if setting not in SETTINGS:
        raise SystemExit(f"--setting {setting!r} is not runnable here; allowed: {sorted(SETTINGS)} "
                         "(the SD setting runs on a GPU machine: see the README)")
    params = SETTINGS[setting]
    stages = [_notebook_stage("01_data_prep", setting, params, REPO_ROOT / "outputs" / setting / "data" / "manifest.json")]
    if bench:
        out = REPO_ROOT / "outputs" / setting / "benchmarks" / "core_quick.csv"
        start = time.perf_counter()
        if out.exists():
            stages.append(Stage("core benchmark (quick)", "skipped (already complete)", str(out.relative_to(REPO_ROOT)), 0.0))
        else:
            subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_core.py"), "--quick", "--out", str(out)],
                           check=True, cwd=REPO_ROOT)
            stages.append(Stage("core benchmark (quick)", "ran", str(out.relative_to(REPO_ROOT)), time.perf_counter() - start))
    try:
        resolve_unet_dir("base")
        base_state = "present"
    except ModelNotFoundError as exc:
        base_state = f"missing: {exc}"
    if base_state == "present":
        # The original model's stride curve (FD baselines); needs only the shipped base model.
        sweep_params = [*params, REPO_ROOT / "params" / "sweep_base.yaml"]
        marker = REPO_ROOT / "outputs" / setting / "sweep" / "base_strides" / "summary.csv"
        stages.append(_notebook_stage("03_stride_sweep", setting, sweep_params, marker))
    print("\n== main job summary ==")
    for s in stages:
        print(f"- {s.name}: {s.status} -> {s.output} ({s.seconds:.0f} s)")
    print(f"- embedded base model: {base_state}")
    print("Not built yet (no result is produced for these):")
    for item in NOT_BUILT:
        print(f"- {item}")
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcr.pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the main job")
    r.add_argument("--setting", default="embedded")
    r.add_argument("--no-bench", action="store_true", help="skip the core cost benchmark")
    args = parser.parse_args(argv)
    run(args.setting, bench=not args.no_bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
