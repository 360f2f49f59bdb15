"""Run or prepare the numbered notebooks with papermill (parameters from flat YAML files).

``prepare`` injects parameters without executing (``--prepare-only``), which is how CI runs the
notebooks under nbval with smoke parameters: nbval has no parameter option of its own.
``parameters`` regenerates every notebook's parameters cell from the schema (:mod:`fcr.options`):
the keys a notebook declares, each at its default with its doc, so no cell drifts from the schema.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import papermill as pm

from fcr.config import SCHEMA, load_yaml, merge, validate
from fcr.paths import REPO_ROOT

__all__ = ["NOTEBOOKS_DIR", "list_notebooks", "notebook_parameters", "parameters_cell", "prepare", "run_notebook",
           "write_parameter_cells"]

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


def list_notebooks() -> list[Path]:
    """The numbered notebooks in order (``02b_...`` runs after ``02_...``: it reads 02's data)."""
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]*_*.ipynb"), key=lambda p: p.name.split("_", 1)[0])


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


def _literal(value: object) -> str:
    """A Python literal for a parameters cell (floats keep a dot, so YAML readers see floats too)."""
    if isinstance(value, float) and value != 0 and abs(value) < 1e-3:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def parameters_cell(keys: list[str]) -> str:
    """The parameters cell declaring ``keys``: schema order, each at its default with its doc."""
    known = [k for k in SCHEMA if k in set(keys)]
    # papermill's parser drops a line whose comment holds "=": say "is" there.
    return "\n".join(f"{k} = {_literal(SCHEMA[k].default)}  # {SCHEMA[k].doc.replace(' = ', ' is ').replace('=', ' is ')}"
                     for k in known)


def _parameters_cell_index(nb: dict) -> int:
    return next(i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", []))


def write_parameter_cells(notebooks: list[Path] | None = None) -> list[Path]:
    """Regenerate the parameters cell of each notebook from the schema; return the notebooks changed."""
    changed = []
    for path in notebooks or list_notebooks():
        nb = json.loads(path.read_text())
        cell = nb["cells"][_parameters_cell_index(nb)]
        keys = list(pm.inspect_notebook(str(path)))
        if path.stem == "02_finetune":  # the fine-tune's keys are listed in code (FINETUNE_KEYS)
            from fcr.train.finetune import FINETUNE_KEYS

            keys += [k for k in FINETUNE_KEYS if k not in keys]
        source = parameters_cell(keys)
        if "".join(cell["source"]) != source:
            cell["source"] = source.splitlines(keepends=True)
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcr.notebooks")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="inject parameters into copies of the notebooks (for nbval)")
    prep.add_argument("-f", "--params", action="append", required=True)
    prep.add_argument("--out", required=True)
    sub.add_parser("parameters", help="regenerate every notebook's parameters cell from the schema")
    args = parser.parse_args(argv)
    paths = prepare(args.params, args.out) if args.command == "prepare" else write_parameter_cells()
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
