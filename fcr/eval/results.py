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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = [
    "StaleResultError",
    "module_fingerprint",
    "run_or_load",
    "save_safetensors_atomic",
    "weights_fingerprint",
    "write_json_atomic",
]


class StaleResultError(RuntimeError):
    """A result file exists for this name but was made with other parameters."""


def _normalise(obj: Any) -> Any:
    # JSON round trip so tuples/lists and int/float spellings compare the way they are stored.
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def write_json_atomic(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write JSON through a temporary file and ``os.replace``: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def run_or_load(
    path: str | Path,
    config: Mapping[str, Any],
    compute: Callable[[], Mapping[str, Any]],
    environment: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Return ``(result, computed)``: the stored result if ``path`` holds one made with ``config``,
    else ``compute()`` written to ``path``."""
    path = Path(path)
    config = _normalise(config)
    if path.is_file():
        stored = json.loads(path.read_text())
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
