"""The pre-registered ablation grid of a backbone (``grid`` of a backbone in an experiments manifest,
issue #31): arms grouped into Holm families, each arm and the λ = 0 control with the same training
replicates (replicate ``k`` of every arm shares training seed ``k`` with replicate ``k`` of the
control), the 03 run that samples them, and optionally the run that samples their best-step weights
(``<fine-tune>@best``, the sensitivity analysis of checkpoint selection)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fcr.study_design import ManifestError, _mapping

__all__ = ["BEST_SUFFIX", "Grid", "GridArm", "best_of", "parse_grid", "split_variant"]

# A fine-tune's best-step weights (its ``unet_best/``) are named ``<fine-tune>@best`` in a model list.
BEST_SUFFIX = "@best"


def best_of(model: str) -> str:
    """The name of ``model``'s best-step weights in a model list and in result tables."""
    return f"{model}{BEST_SUFFIX}"


def split_variant(model: str) -> tuple[str, str]:
    """``("grid_control", "best")`` for ``"grid_control@best"``; ``(model, "")`` for a plain name."""
    name, _, variant = model.partition("@")
    return name, variant


@dataclass(frozen=True)
class GridArm:
    """One arm: its family, its label in tables and plots, and its fine-tunes (one per training seed)."""

    family: str
    label: str
    models: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    """A backbone's ablation grid, as :mod:`fcr.analysis.grid` evaluates it."""

    run: str
    control: tuple[str, ...]
    arms: tuple[GridArm, ...]
    reference: GridArm | None = None  # reported on the pairs it shares with the control, not tested again
    best_run: str | None = None
    reference_run: str | None = None  # the 03 run that sampled the reference arm (None: ``run``)

    @property
    def families(self) -> dict[str, tuple[GridArm, ...]]:
        """Arms by family, in manifest order."""
        out: dict[str, list[GridArm]] = {}
        for arm in self.arms:
            out.setdefault(arm.family, []).append(arm)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def fine_tunes(self) -> tuple[str, ...]:
        """Every fine-tune of the grid (control first), without the reference's."""
        return (*self.control, *(m for arm in self.arms for m in arm.models))


def _models(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        raise ManifestError(f"{where}: expected a non-empty list of fine-tunes (one per training seed), got {value!r}")
    return tuple(value)


def parse_grid(raw: Any, where: str, run_models: Mapping[str, Sequence[str]]) -> Grid | None:
    """The ``grid`` block at ``where`` (None when absent), checked against ``run_models`` ({03 run
    name: its models}): every arm has as many replicates as the control, every model is sampled
    by ``run``, and ``best_run`` samples ``<fine-tune>@best`` of every grid fine-tune."""
    if raw is None:
        return None
    raw = _mapping(raw, where)
    unknown = set(raw) - {"run", "best_run", "control", "reference", "reference_run", "families"}
    if unknown or "run" not in raw or "control" not in raw or "families" not in raw:
        raise ManifestError(f"{where}: needs run, control and families (optionally reference, reference_run, "
                            f"best_run); "
                            f"unknown keys {sorted(unknown)}")
    control = _models(raw["control"], f"{where}.control")
    arms = []
    for family, spec in _mapping(raw["families"], f"{where}.families").items():
        spec = _mapping(spec, f"{where}.families.{family}")
        if not spec:
            raise ManifestError(f"{where}.families.{family}: a family needs at least one arm")
        arms += [GridArm(str(family), str(label), _models(models, f"{where}.families.{family}.{label}"))
                 for label, models in spec.items()]
    reference = None
    if raw.get("reference") is not None:
        ref = _mapping(raw["reference"], f"{where}.reference")
        if len(ref) != 1:
            raise ManifestError(f"{where}.reference: expected one {{label: [fine-tunes]}}, got {len(ref)} entries")
        (label, models), = ref.items()
        reference = GridArm("reference", str(label), _models(models, f"{where}.reference.{label}"))
    if raw.get("reference_run") is not None and reference is None:
        raise ManifestError(f"{where}.reference_run: names the run of a reference arm, and there is none")
    grid = Grid(str(raw["run"]), control, tuple(arms), reference,
                None if raw.get("best_run") is None else str(raw["best_run"]),
                None if raw.get("reference_run") is None else str(raw["reference_run"]))
    for arm in (*grid.arms, *([reference] if reference else [])):
        if len(arm.models) != len(control):
            raise ManifestError(f"{where}: arm {arm.label!r} has {len(arm.models)} training runs, the control "
                                f"{len(control)}: replicate k pairs with the control's replicate k")
    labels = [a.label for a in grid.arms]
    if len(set(labels)) != len(labels):
        raise ManifestError(f"{where}.families: arm labels must be unique, got {labels}")
    needed = {grid.run: list(grid.fine_tunes)}
    if reference is not None:
        needed.setdefault(grid.reference_run or grid.run, []).extend(reference.models)
    if grid.best_run is not None:
        needed[grid.best_run] = [best_of(m) for m in grid.fine_tunes]
    for run, models in needed.items():
        if run not in run_models:
            raise ManifestError(f"{where}: no 03_stride_sweep run named {run!r}")
        missing = [m for m in models if m not in run_models[run]]
        if missing:
            raise ManifestError(f"{where}: the 03_stride_sweep run {run!r} does not sample {missing}")
    return grid
