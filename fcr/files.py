"""Result files on disk: written whole (atomic JSON), checked whole (one check per kind of file),
and inventoried (size and SHA-256 of every file a stage wrote, kept by the stage's completion
marker) so that a missing, truncated or altered file is found and its stage redone, never read.

Torch-free and pandas-free on purpose: the pipeline's planner and ``verify`` import it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from fcr.paths import portable

__all__ = ["TEXT_SUFFIXES", "FileRecord", "check_inventory", "file_record", "inventory", "problem", "write_json_atomic"]

FileRecord = dict  # {"bytes": int, "sha256": str}
# Result files that are text: where machine paths can stand (rewritten by the pipeline, flagged by verify).
TEXT_SUFFIXES = frozenset({".csv", ".json", ".md", ".yaml", ".yml", ".ipynb", ".txt", ".tsv"})
_PNG_END = b"IEND\xaeB`\x82"


def write_json_atomic(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write JSON through a temporary file and ``os.replace``: a kill never leaves half a file.
    Paths of this machine are written portably (:func:`fcr.paths.portable`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(portable(json.loads(json.dumps(payload, default=str))), indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def problem(path: str | Path, keys: Iterable[str] = ()) -> str | None:
    """Why ``path`` cannot be read as what its suffix says, or None when it can: a table parses,
    JSON/YAML/notebooks load, a safetensors file opens (its header covers the whole file) and holds
    ``keys``, a PNG ends with its end chunk. Other files only need to exist."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open  # the check reads the header only, never the tensors

            with safe_open(str(path), framework="numpy") as handle:
                absent = sorted(set(keys) - set(handle.keys()))
            return f"holds no tensor {absent}" if absent else None
        if suffix in {".json", ".ipynb"}:
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix in {".yaml", ".yml"}:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        elif suffix == ".csv":
            rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
            widths = {len(r) for r in rows if r}
            if not rows or len(widths) > 1:
                return "not a table (empty, or rows of different widths: cut short?)"
        elif suffix == ".png":
            data = path.read_bytes()
            if not data.startswith(b"\x89PNG") or not data.rstrip(b"\x00").endswith(_PNG_END):
                return "not a whole PNG"
    except Exception as exc:  # noqa: BLE001 - every reader's error means the same here: unreadable
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def file_record(path: Path) -> FileRecord:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def inventory(folder: Path, skip: Iterable[str] = ()) -> dict[str, FileRecord]:
    """Size and SHA-256 of every file under ``folder`` (paths relative to it, POSIX), except those
    under a folder named in ``skip`` (at any depth: a distillation's rounds keep their own checkpoints) or
    named in ``skip``, and temporary ``.*.tmp`` files."""
    skip = set(skip)
    records = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part in skip for part in rel.parts):
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue
        records[rel.as_posix()] = file_record(path)
    return records


def check_inventory(folder: Path, records: Mapping[str, FileRecord]) -> list[str]:
    """One line per file of ``records`` that is missing, of another size or content, or unreadable."""
    problems = []
    for rel, want in records.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        if path.stat().st_size != want["bytes"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, the stage wrote {want['bytes']} (cut short or changed)")
            continue
        if file_record(path)["sha256"] != want["sha256"]:
            problems.append(f"{rel}: content differs from what the stage wrote")
            continue
        why = problem(path)
        if why:
            problems.append(f"{rel}: {why}")
    return problems
