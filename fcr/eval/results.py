"""Per-configuration result files: written as each configuration finishes, skipped when already
present, never silently reused when they were made with other parameters.

A result file is JSON: ``{"config": {...}, "result": {...}, "environment": {...}}``. ``config``
holds every parameter that shaped the result; a later run with a different config for the same
name raises :class:`StaleResultError` instead of mixing old and new numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fcr.files import problem, write_json_atomic
from fcr.paths import portable

__all__ = [
    "StaleResultError",
    "adopt_cell",
    "adopt_result",
    "module_fingerprint",
    "run_or_load",
    "save_safetensors_atomic",
    "weights_fingerprint",
    "write_json_atomic",
]


class StaleResultError(RuntimeError):
    """A result file exists for this name but was made with other parameters."""


def _normalise(obj: Any) -> Any:
    # JSON round trip so tuples/lists and int/float spellings compare the way they are stored;
    # paths as every machine spells them (fcr.paths.portable), so a clone elsewhere resumes.
    return portable(json.loads(json.dumps(obj, sort_keys=True, default=str)))


def run_or_load(
    path: str | Path,
    config: Mapping[str, Any],
    compute: Callable[[], Mapping[str, Any]],
    environment: Mapping[str, Any] | None = None,
    requires: Mapping[str | Path, Iterable[str]] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Return ``(result, computed)``: the stored result if ``path`` holds one made with ``config``,
    else ``compute()`` written to ``path``. ``requires``: files ``compute`` writes beside the
    result (path -> tensor keys it must hold); the stored result counts only when each is whole.
    A result file or side file that is cut short or unreadable is computed again, never read."""
    path = Path(path)
    config = _normalise(config)
    stored = _whole_result(path, requires or {})
    if stored is not None:
        if stored.get("config") == config:
            return stored["result"], False
        old = stored.get("config", {})
        differing = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise StaleResultError(
            f"{path} was made with other parameters (differing: {differing}); delete it or use another output_dir"
        )
    result = _normalise(dict(compute()))
    write_json_atomic(path, {"config": config, "result": result, "environment": dict(environment or {})})
    return result, True


def adopt_result(source: str | Path, path: str | Path, config: Mapping[str, Any],
                 side_files: Mapping[str | Path, str | Path] | None = None) -> bool:
    """Copy a finished run's result ``source`` (and its ``side_files``, source -> destination) to
    ``path`` when ``path`` has none and ``source`` is whole and was made with exactly ``config``;
    :func:`run_or_load` then loads it. True when it was copied. The side files go first and the
    result record last, so a kill in between leaves a cell that is computed again."""
    path = Path(path)
    if path.exists():
        return False
    sides = {Path(s): Path(d) for s, d in (side_files or {}).items()}
    stored = _whole_result(Path(source), {s: () for s in sides})
    if stored is None or stored.get("config") != _normalise(config):
        return False
    for src, dst in sides.items():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    write_json_atomic(path, {**stored, "adopted_from": portable(str(source))})
    return True


def adopt_cell(sources: Iterable[Path], out_dir: Path, sub: str, stem: str, config: Mapping[str, Any]) -> Path | None:
    """:func:`adopt_result` for a cell ``out_dir/sub/<stem>.json`` with its per-image side file
    ``<stem>.safetensors``, from the first of ``sources`` (run folders of the same layout) that
    finished it with exactly ``config``; the folder it came from, or None."""
    for source in sources:
        side = {source / sub / f"{stem}.safetensors": out_dir / sub / f"{stem}.safetensors"}
        if adopt_result(source / sub / f"{stem}.json", out_dir / sub / f"{stem}.json", config, side):
            return source
    return None


def _whole_result(path: Path, requires: Mapping[str | Path, Iterable[str]]) -> dict[str, Any] | None:
    """The stored result record, or None when it or a side file is missing or unreadable (the
    cell is then computed again; a kill between the side file and the result leaves such a cell)."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"{path}: cut short or unreadable; computing it again", flush=True)
        return None
    if not isinstance(stored, dict) or "result" not in stored:
        print(f"{path}: not a result record; computing it again", flush=True)
        return None
    for side, keys in requires.items():
        why = problem(side, keys)
        if why:
            print(f"{side}: {why}; computing {path.name} again", flush=True)
            return None
    return stored


# ----------------------------------------------------------------------------- inputs and side files


def _digest(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def module_fingerprint(module: torch.nn.Module) -> str:
    """Short hash of a module's state dict (which classifier / weights made a result)."""
    parts = []
    for key, value in sorted(module.state_dict().items()):
        parts.append(key.encode())
        parts.append(value.detach().cpu().contiguous().numpy().tobytes())
    return _digest(*parts)


def weights_fingerprint(unet_dir: Path) -> str:
    """Short hash of a UNet folder's weight files, so retrained weights under the same name are never mixed up."""
    return _digest(*(p.read_bytes() for p in sorted(unet_dir.glob("*.safetensors"))))


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write per-image tensors beside a result file; a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
