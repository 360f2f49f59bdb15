"""The experiments manifest (``params/experiments.yaml``): the seed's experiments and, per setting,
what produces each run variation. Loaded with ``yaml.safe_load`` and checked at once, so a typo in
a path, a model or a notebook name fails before anything runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from fcr.contract import model_label
from fcr.grid_design import Grid, parse_grid
from fcr.paths import REPO_ROOT
from fcr.study_design import ManifestError, Study, _mapping, parse_study

__all__ = [
    "MANIFEST",
    "MODEL_LIST_KEYS",
    "NOTEBOOK_KINDS",
    "Backbone",
    "Experiment",
    "ManifestError",
    "NotebookRun",
    "SettingPlan",
    "backbones_of",
    "load_manifest",
]

MANIFEST = REPO_ROOT / "params" / "experiments.yaml"
# The parameter holding a notebook's list of models, and the folder kind its results go to.
MODEL_LIST_KEYS = {"03_stride_sweep": "sweep_models", "04_robustness": "robustness_models",
                   "05_mechanistic_regression": "variance_models", "06_baselines_frontier": "frontier_models"}
NOTEBOOK_KINDS = {"03_stride_sweep": "sweep", "04_robustness": "robustness", "05_mechanistic_regression": "mechanistic",
                  "06_baselines_frontier": "frontier"}


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
class Backbone:
    """One backbone of an experiment, as the verdict and tables read it: the original model's label,
    the role it plays, the FCR fine-tunes by λ (run folder names, as in the sweep's ``summary.csv``),
    the λ = 0 control if the experiment has one, and the notebook runs its results are in."""

    name: str
    role: str
    experiment: str
    fcr_models: Mapping[float, str] = field(default_factory=dict)
    control: str | None = None
    sweep_run: str = "main"
    robustness_run: str | None = "main"  # None: the experiment has no notebook-04 run of that name
    mechanistic_run: str | None = "main"  # None: the experiment has no notebook-05 run of that name
    # Training replicates: a fine-tune's label -> the labels of the same fine-tune with other training
    # seeds, paired by position across models (replicate k of the control and of FCR share seed k).
    replicates: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    fcr_configs: tuple[str, ...] = ()  # configurations the setting's variations read the FCR models at
    # The quality-vs-cost frontier (notebook 06 run of this name, reading the sweep run of the same name)
    # and the FCR-deep fine-tunes by λ it holds: criterion b's deep-caching rows read them.
    frontier_run: str | None = None
    fcr_deep_models: Mapping[float, str] = field(default_factory=dict)
    # Fidelity vs fine-tune length: the 03 run holding longer fine-tunes, and per number of training
    # steps the (FCR, λ = 0 control) pair trained that long (the study's own pair is the shortest point).
    length_run: str | None = None
    length_models: Mapping[int, tuple[str, str]] = field(default_factory=dict)
    # FCR ablations (e.g. Δ_max): the 03 run holding them, and per label the FCR fine-tune that differs
    # from the backbone's first FCR model in that one setting; each is tested against the backbone's
    # control as sampled in its sweep run (same prompts and initial noise).
    ablation_run: str | None = None
    ablation_models: Mapping[str, str] = field(default_factory=dict)
    # A few-step sampler regime (e.g. 25-step DDIM): the 03 run that samples the original, the first
    # FCR model and the control with fewer sampling steps; its safe strides and FCR vs control there.
    few_steps_run: str | None = None
    # The sampling seeds the robustness run declares (its own parameter files; () when they do not
    # say): a criterion-c result on fewer seeds is an interim look, not the pre-registered test.
    robustness_seeds: tuple[int, ...] = ()
    study: Study | None = None  # the setting's pre-registered study (contrasts of this backbone)
    # (name, model label, configuration) of the setting's variations and controls on this backbone's
    # models, in manifest order (variations first): the rows of the report's experiment tables.
    rows: tuple[tuple[str, str, str], ...] = ()
    grid: Grid | None = None  # the pre-registered ablation grid (fcr.grid_design, issue #31)


@dataclass(frozen=True)
class SettingPlan:
    """What an experiment runs in one setting (embedded or sd)."""

    params: tuple[Path, ...]
    finetune: tuple[Path, ...]
    finetunes: dict[str, tuple[Path, ...]]
    notebooks: tuple[NotebookRun, ...]
    variations: dict[str, dict[str, str]]
    controls: dict[str, dict[str, str]] = field(default_factory=dict)
    backbones: tuple[Backbone, ...] = ()
    study: Study | None = None
    # Progressive distillations (notebook 02b): {name: parameter files}; notebooks name a round's
    # student ``<name>@round<r>``.
    distillations: dict[str, tuple[Path, ...]] = field(default_factory=dict)


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


def _backbones(raw: Any, where: str, experiment: str, runs: Sequence[NotebookRun]) -> tuple[Backbone, ...]:
    """The ``backbones`` list of a setting; every model it names must be evaluated by the sweep run it names."""
    if not isinstance(raw, list):
        raise ManifestError(f"{where}: expected a list of backbones")
    out = []
    for i, spec in enumerate(raw):
        spec = _mapping(spec, f"{where}[{i}]")
        unknown = set(spec) - {"original", "role", "fcr_models", "control", "sweep_run", "robustness_run",
                               "mechanistic_run", "replicates", "frontier_run", "fcr_deep_models", "length_run",
                               "length_models", "ablation_run", "ablation_models", "few_steps_run", "grid"}
        if unknown or not isinstance(spec.get("original"), str) or not isinstance(spec.get("role"), str):
            raise ManifestError(f"{where}[{i}]: needs 'original' and 'role' (and optionally fcr_models, control, "
                                f"sweep_run, robustness_run, mechanistic_run, replicates, frontier_run, "
                                f"fcr_deep_models, length_run, length_models, ablation_run, ablation_models, "
                                f"few_steps_run, grid); unknown keys "
                                f"{sorted(unknown)}")
        fcr_models = _by_lambda(spec.get("fcr_models", {}), f"{where}[{i}].fcr_models")
        b = Backbone(spec["original"], spec["role"], experiment, {float(k): str(v) for k, v in fcr_models.items()},
                     spec.get("control"), str(spec.get("sweep_run", "main")), str(spec.get("robustness_run", "main")),
                     str(spec.get("mechanistic_run", "main")))
        robustness = next((r for r in runs if r.notebook == "04_robustness" and r.run == b.robustness_run), None)
        if robustness is None:
            b = replace(b, robustness_run=None)  # this experiment does not stress-test the backbone
        else:
            b = replace(b, robustness_seeds=_declared_seeds(robustness))
        if not any(r.notebook == "05_mechanistic_regression" and r.run == b.mechanistic_run for r in runs):
            b = replace(b, mechanistic_run=None)  # this experiment does not measure the backbone's features
        b = replace(b, **_frontier(spec, f"{where}[{i}]", b.name, runs), **_length(spec, f"{where}[{i}]", runs),
                    **_ablation(spec, f"{where}[{i}]", runs), **_few_steps(spec, f"{where}[{i}]", b, runs))
        b = replace(b, grid=parse_grid(spec.get("grid"), f"{where}[{i}].grid",
                                       {r.run: r.models for r in runs if r.notebook == "03_stride_sweep"}))
        replicates = _replicates(spec.get("replicates", {}), f"{where}[{i}].replicates",
                                 [*b.fcr_models.values(), *([b.control] if b.control else [])])
        sweep = next((r for r in runs if r.notebook == "03_stride_sweep" and r.run == b.sweep_run), None)
        named = [b.name, *b.fcr_models.values(), *([b.control] if b.control else []),
                 *(m for extra in replicates.values() for m in extra)]
        if sweep is None or any(m not in sweep.models for m in named):
            raise ManifestError(f"{where}[{i}]: models {named} must all be evaluated by the 03_stride_sweep run "
                                f"{b.sweep_run!r}")
        # Result tables name a model by its label (fcr.contract.model_label).
        out.append(replace(b, name=model_label(b.name), fcr_models={k: model_label(v) for k, v in b.fcr_models.items()},
                           control=model_label(b.control) if b.control else None,
                           fcr_deep_models={k: model_label(v) for k, v in b.fcr_deep_models.items()},
                           length_models={k: tuple(model_label(m) for m in v) for k, v in b.length_models.items()},
                           ablation_models={k: model_label(v) for k, v in b.ablation_models.items()},
                           replicates={model_label(k): tuple(model_label(m) for m in v) for k, v in replicates.items()}))
    return tuple(out)


def _by_lambda(raw: Any, where: str) -> dict:
    """A mapping of fine-tunes keyed by their λ > 0 (``fcr_models``, ``fcr_deep_models``)."""
    mapping = _mapping(raw, where)
    if not all(isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam > 0 for lam in mapping):
        raise ManifestError(f"{where}: keys are the fine-tunes' λ > 0, got {list(mapping)}")
    return mapping


def _named_run(runs: Sequence[NotebookRun], notebook: str, name: Any, where: str) -> NotebookRun:
    """The run of ``notebook`` named ``name``; ManifestError naming ``where`` when there is none."""
    run = next((r for r in runs if r.notebook == notebook and r.run == str(name)), None)
    if run is None:
        raise ManifestError(f"{where}: no {notebook} run named {name!r}")
    return run


def _declared_run(spec: Mapping[str, Any], run_key: str, models_key: str, notebook: str, where: str,
                  runs: Sequence[NotebookRun]) -> tuple[NotebookRun, dict] | None:
    """The ``notebook`` run a backbone names in ``run_key`` and the mapping under ``models_key``;
    ``None`` when no run is named (then the mapping must be empty)."""
    run, models = spec.get(run_key), _mapping(spec.get(models_key, {}), f"{where}.{models_key}")
    if run is None:
        if models:
            raise ManifestError(f"{where}.{models_key}: needs {run_key} (the run that evaluates them)")
        return None
    return _named_run(runs, notebook, run, f"{where}.{run_key}"), models


def _frontier(spec: Mapping[str, Any], where: str, original: str, runs: Sequence[NotebookRun]) -> dict[str, Any]:
    """``frontier_run`` and ``fcr_deep_models`` of a backbone: the run must be a 06_baselines_frontier
    run whose models start with the original and hold every FCR-deep fine-tune."""
    declared = _declared_run(spec, "frontier_run", "fcr_deep_models", "06_baselines_frontier", where, runs)
    if declared is None:
        return {}
    frontier, deep = declared
    run = frontier.run
    deep = _by_lambda(deep, f"{where}.fcr_deep_models")
    named = [original, *map(str, deep.values())]
    if frontier.models[0] != original or any(m not in frontier.models for m in named):
        raise ManifestError(f"{where}: the frontier run {run!r} must evaluate {named}, the original first")
    return {"frontier_run": str(run), "fcr_deep_models": {float(k): str(v) for k, v in deep.items()}}


def _length(spec: Mapping[str, Any], where: str, runs: Sequence[NotebookRun]) -> dict[str, Any]:
    """``length_run`` and ``length_models`` ({training steps: [FCR model, control model]}) of a
    backbone; every model must be evaluated by that 03_stride_sweep run."""
    declared = _declared_run(spec, "length_run", "length_models", "03_stride_sweep", where, runs)
    if declared is None:
        return {}
    sweep, pairs = declared
    run = sweep.run
    out: dict[int, tuple[str, str]] = {}
    for steps, pair in pairs.items():
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ManifestError(f"{where}.length_models: keys are numbers of training steps >= 1, got {steps!r}")
        if not isinstance(pair, list) or len(pair) != 2 or any(m not in sweep.models for m in pair):
            raise ManifestError(f"{where}.length_models.{steps}: expected [FCR model, control model] of the "
                                f"03_stride_sweep run {run!r}, got {pair!r}")
        out[steps] = (str(pair[0]), str(pair[1]))
    return {"length_run": str(run), "length_models": out}


def _ablation(spec: Mapping[str, Any], where: str, runs: Sequence[NotebookRun]) -> dict[str, Any]:
    """``ablation_run`` and ``ablation_models`` ({label: FCR model}) of a backbone; every model must be
    evaluated by that 03_stride_sweep run."""
    declared = _declared_run(spec, "ablation_run", "ablation_models", "03_stride_sweep", where, runs)
    if declared is None:
        return {}
    sweep, models = declared
    run = sweep.run
    for label, model in models.items():
        if not isinstance(model, str) or model not in sweep.models:
            raise ManifestError(f"{where}.ablation_models.{label}: expected an FCR model of the 03_stride_sweep run "
                                f"{run!r}, got {model!r}")
    return {"ablation_run": str(run), "ablation_models": {str(k): str(v) for k, v in models.items()}}


def _declared_seeds(run: NotebookRun) -> tuple[int, ...]:
    """``seeds`` of the last of the run's own parameter files that sets them; () when none does."""
    from fcr.config import load_yaml

    seeds: tuple[int, ...] = ()
    for path in run.params:
        raw = load_yaml(path)
        if isinstance(raw.get("seeds"), list):
            seeds = tuple(int(v) for v in raw["seeds"])
    return seeds


def _few_steps(spec: Mapping[str, Any], where: str, b: Backbone, runs: Sequence[NotebookRun]) -> dict[str, Any]:
    """``few_steps_run`` of a backbone: a 03_stride_sweep run that evaluates the original, its first
    FCR model and its control (those its contrasts compare)."""
    name = spec.get("few_steps_run")
    if name is None:
        return {}
    sweep = _named_run(runs, "03_stride_sweep", name, f"{where}.few_steps_run")
    named = [b.name, *list(b.fcr_models.values())[:1], *([b.control] if b.control else [])]
    if any(m not in sweep.models for m in named):
        raise ManifestError(f"{where}.few_steps_run: the 03_stride_sweep run {sweep.run!r} must evaluate {named}")
    return {"few_steps_run": str(sweep.run)}


def _replicates(raw: Any, where: str, fine_tunes: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``replicates`` of a backbone: each key one of its fine-tunes (FCR or control), each value a
    non-empty list of other models; every fine-tune that has replicates has the same number, so
    replicate ``k`` pairs across models."""
    raw = _mapping(raw, where)
    out = {}
    for model, extra in raw.items():
        if model not in fine_tunes:
            raise ManifestError(f"{where}: {model!r} is not one of the backbone's fine-tunes {list(fine_tunes)}")
        if not isinstance(extra, list) or not extra or not all(isinstance(m, str) for m in extra):
            raise ManifestError(f"{where}.{model}: expected a non-empty list of model names, got {extra!r}")
        out[str(model)] = tuple(extra)
    if len({len(v) for v in out.values()}) > 1:
        raise ManifestError(f"{where}: every fine-tune needs the same number of replicates, got "
                            f"{ {k: len(v) for k, v in out.items()} }")
    return out


def _table_rows(b: Backbone, rows: Mapping[str, Mapping[str, Mapping[str, str]]]) -> tuple[tuple[str, str, str], ...]:
    """The variations, then controls, whose model is one of ``b``'s (by result-table label)."""
    mine = {b.name, *b.fcr_models.values(), *([b.control] if b.control else [])}
    return tuple((name, model_label(spec["model"]), spec["config"])
                 for section in ("variations", "controls") for name, spec in rows[section].items()
                 if model_label(spec["model"]) in mine)


def _setting(raw: Any, where: str, root: Path, experiment: str) -> SettingPlan:
    raw = _mapping(raw, where)
    unknown = set(raw) - {"params", "finetune", "finetunes", "distillations", "notebooks", "variations", "controls",
                          "backbones", "study"}
    if unknown:
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)}")
    finetunes = {str(name): _paths(files, f"{where}.finetunes.{name}", root)
                 for name, files in _mapping(raw.get("finetunes", {}), f"{where}.finetunes").items()}
    distillations = {str(name): _paths(files, f"{where}.distillations.{name}", root)
                     for name, files in _mapping(raw.get("distillations", {}), f"{where}.distillations").items()}
    clash = sorted(set(distillations) & set(finetunes))
    if clash:
        raise ManifestError(f"{where}.distillations: {clash} are fine-tune names too (each names one folder)")
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
    for i, r in enumerate(runs):  # a frontier reads the sweep run of its own name, run before it
        sweep = next((s for s in runs[:i] if s.notebook == "03_stride_sweep" and s.run == r.run), None)
        if r.notebook == "06_baselines_frontier" and (sweep is None or sweep.models[0] != r.models[0]
                                                       or not set(r.models) <= set(sweep.models)):
            raise ManifestError(f"{where}.notebooks[{i}]: a 06_baselines_frontier run reads the 03_stride_sweep run of "
                                f"the same name ({r.run!r}), listed before it, whose models (original first) include "
                                "its own")
    rows = {}
    for section in ("variations", "controls"):
        rows[section] = {}
        for name, spec in _mapping(raw.get(section, {}), f"{where}.{section}").items():
            spec = _mapping(spec, f"{where}.{section}.{name}")
            if set(spec) != {"model", "config"}:
                raise ManifestError(f"{where}.{section}.{name}: needs exactly 'model' and 'config', got {sorted(spec)}")
            rows[section][str(name)] = {"model": str(spec["model"]), "config": str(spec["config"])}
    study = parse_study(raw.get("study"), f"{where}.study")
    if study is not None and study.selection_run is not None:
        _named_run(runs, "03_stride_sweep", study.selection_run, f"{where}.study.selection_run")
    return SettingPlan(
        params=_paths(raw.get("params", []), f"{where}.params", root),
        finetune=_paths(raw.get("finetune", []), f"{where}.finetune", root),
        finetunes=finetunes,
        distillations=distillations,
        notebooks=tuple(runs),
        variations=rows["variations"],
        controls=rows["controls"],
        backbones=tuple(
            replace(b, study=study, rows=_table_rows(b, rows), fcr_configs=tuple(dict.fromkeys(
                spec["config"] for spec in rows["variations"].values() if spec["model"] in b.fcr_models.values())))
            for b in _backbones(raw.get("backbones", []), f"{where}.backbones", experiment, runs)),
        study=study,
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
        settings = {name: _setting(spec, f"{exp_id}.settings.{name}", root, exp_id)
                    for name, spec in _mapping(raw.get("settings", {}), f"{exp_id}.settings").items()}
        for name, plan in settings.items():
            missing = [v for v in variations if v not in plan.variations]
            if missing:
                raise ManifestError(f"{exp_id}.settings.{name}.variations: run variations {missing} are not mapped")
        experiments[exp_id] = Experiment(exp_id, str(raw.get("description", "")).strip(), variations, settings)
    if not experiments:
        raise ManifestError(f"{path}: no experiments")
    return experiments


def backbones_of(setting: str, path: str | Path = MANIFEST) -> tuple[Backbone, ...]:
    """Every experiment's backbones in ``setting``, in manifest order (what the verdict and tables read)."""
    return tuple(b for exp in load_manifest(path).values() if setting in exp.settings
                 for b in exp.settings[setting].backbones)
