"""Pickle-free training checkpoints: model, EMA and optimizer state as safetensors, the rest as JSON.

accelerate's ``save_state``/``load_state`` pickle the optimizer and RNG states; we keep every
file on disk loadable without executing code. RNG state is not needed: the training loop derives
all randomness of step ``k`` from ``(seed, k)``, so resuming only needs the step number.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fcr.core.state_dicts import state_dict_mismatch

__all__ = [
    "read_step_log",
    "write_step_log",
    "CheckpointError",
    "latest_checkpoint",
    "load_module_weights",
    "load_optimizer_state",
    "prune_checkpoints",
    "save_module_weights",
    "save_optimizer_state",
    "save_training_checkpoint",
    "load_training_checkpoint",
]

STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the model."""


def save_module_weights(module: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a module's state dict (contiguous CPU copies) as safetensors."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def load_module_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights strictly; a missing file or mismatched keys/shapes raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or not safetensors: {exc}") from exc
    mismatch = state_dict_mismatch(module.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match the model: {mismatch}")
    module.load_state_dict(state)


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Flatten an optimizer state dict: tensors to safetensors, structure and scalars to metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    save_file(tensors, str(path), metadata=meta)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Inverse of :func:`save_optimizer_state`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"optimizer state {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in json.loads(meta["scalars"]).items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def save_training_checkpoint(
    directory: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    ema: torch.nn.Module | None = None,
) -> Path:
    """Write ``directory/step_XXXXXXX`` atomically (a temporary folder renamed when complete)."""
    directory = Path(directory)
    final = directory / f"{STEP_PREFIX}{step:07d}"
    tmp = directory / f".tmp_{STEP_PREFIX}{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_module_weights(model, tmp / "model.safetensors")
    if ema is not None:
        save_module_weights(ema, tmp / "ema.safetensors")
    save_optimizer_state(optimizer, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(STEP_PREFIX):]), default=None)


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` most recent complete checkpoints; returns what was deleted."""
    directory = Path(directory)
    done = sorted(
        (p for p in directory.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()),
        key=lambda p: int(p.name[len(STEP_PREFIX):]),
    )
    stale = done[:-keep] if keep > 0 else done
    for path in stale:
        shutil.rmtree(path)
    return stale


def load_training_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer (and EMA); returns the JSON state (with ``step``)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has no readable state.json: {exc}") from exc
    load_module_weights(model, path / "model.safetensors")
    if ema is not None:
        load_module_weights(ema, path / "ema.safetensors")
    load_optimizer_state(optimizer, path / "optimizer.safetensors")
    return state


def read_step_log(path: Path, up_to_step: int) -> list[dict[str, str]]:
    """The rows of a per-step CSV log (training or validation) up to ``up_to_step``: a resumed run
    redoes the steps after its checkpoint, so their rows are dropped."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(row["step"]) <= up_to_step]


def write_step_log(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write a per-step CSV log through a temporary file, so a kill never leaves half a log."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
