"""The layers of docs/architecture.md hold: imports point down, the report reads tables only (never
torch, never a runner), import chains stay short and modules small."""

from __future__ import annotations

import subprocess
import sys

from architecture import LAYERS, REPORT_MAY_IMPORT, imports, layer_of, longest_chain, module_files

MAX_CHAIN = 8  # modules in the longest chain of module-level imports
MAX_LINES = 450  # lines of one module


def test_every_module_has_a_layer_and_imports_point_down() -> None:
    files = module_files()
    assert not [m for m in files if layer_of(m) < 0], "a module outside every layer of tests/architecture.py"
    upward = sorted(f"{m} -> {d}" for m, deps in imports(False).items() for d in deps if layer_of(d) > layer_of(m))
    assert not upward, f"imports that point up a layer ({[p[0] for p in LAYERS]}): {upward}"


def test_the_report_imports_only_tables_and_formatting() -> None:
    """fcr.report may import layer 0 and the analysis modules that compute on tables, nothing that
    runs a model (function-level imports included)."""
    wrong = sorted(f"{m} -> {d}" for m, deps in imports(False).items() if m.startswith("fcr.report")
                   for d in deps if not (d.startswith("fcr.report") or layer_of(d) == 0 or d in REPORT_MAY_IMPORT))
    assert not wrong, wrong


def test_importing_the_report_and_formatting_one_loads_no_torch(tmp_path) -> None:
    """In a fresh interpreter: import every report module, format a report from analysis tables
    written by hand (a verdict row and an empty notes file), and torch is still not loaded."""
    report_dir = tmp_path / "run" / "report"
    report_dir.mkdir(parents=True)
    (report_dir / "verdict.csv").write_text("criterion,scope,kind,measured,threshold,passed,note,value\n"
                                            "overall,all criteria,criterion,n/a,all of a-f,,nothing ran,\n")
    (report_dir / "analysis_notes.json").write_text('{"study_notes": [], "missing_tables": {}}')
    code = (
        "import importlib, pkgutil, sys\n"
        "import fcr.report\n"
        "for m in pkgutil.iter_modules(fcr.report.__path__):\n"
        "    importlib.import_module('fcr.report.' + m.name)\n"
        "from fcr.report.tables import build_report\n"
        f"out = build_report({str(tmp_path / 'run')!r}, backbones=())\n"
        "assert 'Success criteria' in out['markdown']\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_import_chains_are_short() -> None:
    chain = longest_chain()
    assert len(chain) <= MAX_CHAIN, " -> ".join(chain)


def test_modules_are_small() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in module_files().items()}
    big = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not big, big
