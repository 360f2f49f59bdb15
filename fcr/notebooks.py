"""Run or prepare the numbered notebooks with papermill (parameters from flat YAML files).

``prepare`` injects parameters without executing (``--prepare-only``), which is how CI runs the
notebooks under nbval with smoke parameters: nbval has no parameter option of its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import papermill as pm

from fcr.config import SCHEMA, load_yaml, merge, validate
from fcr.paths import REPO_ROOT

__all__ = ["NOTEBOOKS_DIR", "list_notebooks", "notebook_parameters", "prepare", "run_notebook"]

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


def list_notebooks() -> list[Path]:
    """The numbered notebooks in order."""
    return sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def _parameters(param_files: list[str | Path], overrides: dict | None = None) -> dict:
    merged = merge(*(load_yaml(p) for p in param_files), overrides or {})
    validate(merged)  # fail before anything is written
    return merged


def notebook_parameters(notebook: Path, params: dict) -> dict:
    """The parameters a notebook declares (shared files hold keys of every notebook); keys unknown
    to the schema are kept so the notebook's own validation names them."""
    declared = set(pm.inspect_notebook(str(notebook)))
    return {k: v for k, v in params.items() if k in declared or k not in SCHEMA}


def prepare(param_files: list[str | Path], out_dir: str | Path, notebooks: list[Path] | None = None) -> list[Path]:
    """Write copies of the notebooks with parameters injected (not executed)."""
    params = _parameters(param_files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for nb in notebooks or list_notebooks():
        target = out_dir / nb.name
        pm.execute_notebook(str(nb), str(target), parameters=notebook_parameters(nb, params), prepare_only=True, progress_bar=False)
        written.append(target)
    return written


def run_notebook(notebook: str | Path, output: str | Path, param_files: list[str | Path], overrides: dict | None = None) -> Path:
    """Execute one notebook with papermill from the repository root; errors raise papermill's
    ``PapermillExecutionError`` and leave the failed notebook at ``output``."""
    params = notebook_parameters(Path(notebook), _parameters(param_files, overrides))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(notebook), str(output), parameters=params, cwd=str(REPO_ROOT), progress_bar=False)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcr.notebooks")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="inject parameters into copies of the notebooks (for nbval)")
    prep.add_argument("-f", "--params", action="append", required=True)
    prep.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for path in prepare(args.params, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
