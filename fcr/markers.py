"""Stage completion markers: what a pipeline stage leaves when it finishes, and the test of
whether it is complete. A stage is complete only when its marker's fingerprint equals the
parameters' and every file the marker lists (size and SHA-256, :mod:`fcr.files`) is present,
unchanged and readable, and the files the contract says its notebook writes are among them.
Completeness is checked every time, never assumed from the marker alone.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fcr import contract
from fcr.files import TEXT_SUFFIXES, check_inventory, inventory, write_json_atomic
from fcr.paths import portable_text

__all__ = ["incomplete", "make_portable", "missing_outputs", "read_marker", "stage_times", "write_marker",
           "write_stage_times"]

def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of the stage in ``folder``, or None when there is none or it is unreadable."""
    try:
        marker = json.loads((folder / contract.DONE_MARKER).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def missing_outputs(folder: Path, notebook: str | None) -> list[str]:
    """The files the contract says ``notebook`` writes that are not in ``folder``."""
    return [name for name in contract.STAGE_OUTPUTS.get(notebook or "", ()) if not (folder / name).is_file()]


def incomplete(folder: Path, fingerprint: str | None, notebook: str | None = None) -> list[str]:
    """Why the stage in ``folder`` is not complete (empty when it is). ``fingerprint`` None: the
    parameters are not compared (a stage that always runs, like the report)."""
    marker = read_marker(folder)
    if marker is None:
        return ["no completion marker" if not (folder / contract.DONE_MARKER).exists() else "marker unreadable"]
    if fingerprint is not None and marker.get("fingerprint") != fingerprint:
        return [f"made with other parameters (marker {marker.get('fingerprint')}, parameters {fingerprint})"]
    files = marker.get("files")
    if not isinstance(files, dict):
        return ["the marker lists no files (written before markers kept inventories)"]
    problems = check_inventory(folder, files)
    problems += [f"{name}: the notebook writes it, the marker does not list it"
                 for name in contract.STAGE_OUTPUTS.get(notebook or "", ()) if name not in files]
    return problems


def make_portable(folder: Path) -> list[Path]:
    """Rewrite the text files under ``folder`` that hold this checkout's paths (a table's model
    folder) relative to it, and in executed notebooks (logs) the interpreter's, home and temporary
    folders too (:func:`fcr.paths.portable_text`); returns the files rewritten. A path outside the
    checkout in a result or parameter file stays as it is: it is read back (e.g. an SD base model)."""
    changed = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in TEXT_SUFFIXES or contract.TRANSIENT in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        new = portable_text(text, logs=path.suffix.lower() == ".ipynb")  # only logs lose paths
        if new != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(path)
            changed.append(path)
    return changed


def write_marker(folder: Path, fingerprint: str, record: dict[str, Any]) -> dict[str, Any]:
    """Mark the stage in ``folder`` complete: ``record`` (times, attempts) plus the fingerprint and
    the inventory of every file under ``folder`` except training checkpoints and pipeline records."""
    files = inventory(folder, skip=(contract.TRANSIENT, contract.DONE_MARKER, contract.ATTEMPTS_RECORD,
                                      contract.PIPELINE_TIMING))
    marker = {**record, "fingerprint": fingerprint, "files": files,
              "finished": record.get("finished", time.strftime("%Y-%m-%dT%H:%M:%S%z"))}
    write_json_atomic(folder / contract.DONE_MARKER, marker)
    return marker


STAGE_TIME_COLUMNS = ["stage", "seconds", "attempts", "finished", "fingerprint"]


def stage_times(root: str | Path) -> list[dict[str, Any]]:
    """Wall time of every finished stage under ``root`` from its marker (the main job's time even
    when it ran over several resumed invocations): stage (folder relative to root), seconds,
    attempts, finished, fingerprint. A snapshot without markers (a committed reference copy)
    keeps them in ``report/stage_times.csv``, read instead."""
    root = Path(root)
    rows = []
    for path in sorted(root.rglob(contract.DONE_MARKER)):
        info = read_marker(path.parent) or {}
        rows.append({"stage": path.parent.relative_to(root).as_posix() or ".",
                     "seconds": float(info.get("seconds", float("nan"))), "attempts": info.get("attempts", 1),
                     "finished": info.get("finished", ""), "fingerprint": info.get("fingerprint", "")})
    saved = root / "report" / contract.STAGE_TIMES
    if not rows and saved.is_file():
        with saved.open(encoding="utf-8") as handle:
            rows = [{**r, "seconds": float(r["seconds"]), "attempts": int(r["attempts"])} for r in csv.DictReader(handle)]
    return rows


def write_stage_times(root: Path, stages: Sequence[dict[str, Any]]) -> Path:
    """``report/stage_times.csv``: the table the reports read stage times from."""
    path = root / "report" / contract.STAGE_TIMES
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=STAGE_TIME_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(stages)
    tmp.replace(path)
    return path
