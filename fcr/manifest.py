"""The experiments manifest (``params/experiments.yaml``): the seed's experiments and, per setting,
what produces each run variation. Loaded with ``yaml.safe_load`` and checked at once, so a typo in
a path, a model or a notebook name fails before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fcr.paths import REPO_ROOT

__all__ = [
    "MODEL_LIST_KEYS",
    "NOTEBOOK_KINDS",
    "Experiment",
    "ManifestError",
    "NotebookRun",
    "SettingPlan",
    "load_manifest",
]

MANIFEST = REPO_ROOT / "params" / "experiments.yaml"
# The parameter holding a notebook's list of models, and the folder kind its results go to.
MODEL_LIST_KEYS = {"03_stride_sweep": "sweep_models", "04_robustness": "robustness_models",
                   "05_mechanistic_regression": "variance_models"}
NOTEBOOK_KINDS = {"03_stride_sweep": "sweep", "04_robustness": "robustness", "05_mechanistic_regression": "mechanistic"}


class ManifestError(ValueError):
    """The experiments manifest is malformed or names something that does not exist."""


@dataclass(frozen=True)
class NotebookRun:
    """One evaluation notebook run of an experiment."""

    notebook: str
    run: str
    params: tuple[Path, ...]
    models: tuple[str, ...]

    @property
    def kind(self) -> str:
        return NOTEBOOK_KINDS[self.notebook]


@dataclass(frozen=True)
class SettingPlan:
    """What an experiment runs in one setting (embedded or sd)."""

    params: tuple[Path, ...]
    finetune: tuple[Path, ...]
    finetunes: dict[str, tuple[Path, ...]]
    notebooks: tuple[NotebookRun, ...]
    variations: dict[str, dict[str, str]]
    controls: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    description: str
    run_variations: tuple[str, ...]
    settings: dict[str, SettingPlan]


def _paths(value: Any, where: str, root: Path) -> tuple[Path, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{where}: expected a list of parameter files, got {value!r}")
    out = []
    for v in value:
        path = root / v
        if not path.is_file():
            raise ManifestError(f"{where}: parameter file {v!r} does not exist")
        out.append(path)
    return tuple(out)


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _setting(raw: Any, where: str, root: Path) -> SettingPlan:
    raw = _mapping(raw, where)
    unknown = set(raw) - {"params", "finetune", "finetunes", "notebooks", "variations", "controls"}
    if unknown:
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)}")
    finetunes = {str(name): _paths(files, f"{where}.finetunes.{name}", root)
                 for name, files in _mapping(raw.get("finetunes", {}), f"{where}.finetunes").items()}
    runs = []
    for i, nb in enumerate(raw.get("notebooks", [])):
        nb = _mapping(nb, f"{where}.notebooks[{i}]")
        name = nb.get("notebook")
        if name not in MODEL_LIST_KEYS:
            raise ManifestError(f"{where}.notebooks[{i}].notebook: allowed {sorted(MODEL_LIST_KEYS)}, got {name!r}")
        models = nb.get("models")
        if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
            raise ManifestError(f"{where}.notebooks[{i}].models: expected a non-empty list of model names")
        runs.append(NotebookRun(name, str(nb.get("run", "main")),
                                _paths(nb.get("params", []), f"{where}.notebooks[{i}].params", root), tuple(models)))
    seen = {(r.notebook, r.run) for r in runs}
    if len(seen) != len(runs):
        raise ManifestError(f"{where}.notebooks: two runs of the same notebook share a run name")
    rows = {}
    for section in ("variations", "controls"):
        rows[section] = {}
        for name, spec in _mapping(raw.get(section, {}), f"{where}.{section}").items():
            spec = _mapping(spec, f"{where}.{section}.{name}")
            if set(spec) != {"model", "config"}:
                raise ManifestError(f"{where}.{section}.{name}: needs exactly 'model' and 'config', got {sorted(spec)}")
            rows[section][str(name)] = {"model": str(spec["model"]), "config": str(spec["config"])}
    return SettingPlan(
        params=_paths(raw.get("params", []), f"{where}.params", root),
        finetune=_paths(raw.get("finetune", []), f"{where}.finetune", root),
        finetunes=finetunes,
        notebooks=tuple(runs),
        variations=rows["variations"],
        controls=rows["controls"],
    )


def load_manifest(path: str | Path = MANIFEST, root: str | Path = REPO_ROOT) -> dict[str, Experiment]:
    """Experiments by id, validated: parameter files exist, notebooks are known, and every run
    variation of the seed is mapped in every setting."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise ManifestError(f"experiments manifest {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text())
    data = _mapping(data, str(path))
    experiments = {}
    for i, raw in enumerate(data.get("experiments", [])):
        raw = _mapping(raw, f"experiments[{i}]")
        exp_id = raw.get("experiment_id")
        if not isinstance(exp_id, str) or not exp_id:
            raise ManifestError(f"experiments[{i}].experiment_id: expected a name")
        variations = tuple(raw.get("run_variations", []))
        settings = {name: _setting(spec, f"{exp_id}.settings.{name}", root)
                    for name, spec in _mapping(raw.get("settings", {}), f"{exp_id}.settings").items()}
        for name, plan in settings.items():
            missing = [v for v in variations if v not in plan.variations]
            if missing:
                raise ManifestError(f"{exp_id}.settings.{name}.variations: run variations {missing} are not mapped")
        experiments[exp_id] = Experiment(exp_id, str(raw.get("description", "")).strip(), variations, settings)
    if not experiments:
        raise ManifestError(f"{path}: no experiments")
    return experiments
