"""The pre-registered design of a study (the ``study`` block of an experiments manifest), fixed
before the run and evaluated by :mod:`fcr.analysis.contrasts`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fcr.contract import FIDELITY_DIRECTIONS

__all__ = ["ManifestError", "Study", "parse_study"]


class ManifestError(ValueError):
    """The experiments manifest is malformed or names something that does not exist."""


@dataclass(frozen=True)
class Study:
    """The pre-registered design of an experiment's study (``study`` of a setting), fixed before the
    run: test level and power, the strides of the contrasts, the primary paired fidelity endpoint
    (against the model's own full sampling), the seed's non-inferiority margins against the
    original's FD-5, and the sweep run λ is selected on (never the reported one). Evaluated by
    :mod:`fcr.analysis.contrasts`."""

    alpha: float = 0.05
    power: float = 0.8
    strides: tuple[str, ...] = ("FD-10",)
    primary_endpoint: str = "psnr"
    primary_reference: str = "own_full"
    fd_margin_pct: float = 5.0
    alignment_margin_pct: float = -2.0
    reference_config: str = "FD-5"
    selection_run: str | None = None
    n_boot: int = 2000
    # Criterion c as a difference in differences (fcr.experiments.robustness.fidelity.stress_did): the
    # non-inferiority margin of FCR's drop in the primary endpoint under stress over the comparator's
    # (primary endpoint units, e.g. dB); None: the study does not test criterion c.
    stress_margin: float | None = None
    pilot: tuple[tuple[str, str], ...] = ()  # free-text provenance of the sizes (e.g. the pilot's numbers)
    # The seed's stopping rule: an FCR candidate that fails criterion a (this study's secondary family at
    # stride 10) is dropped from the later phases' runs (robustness, frontier); fcr.analysis.stopping_rule.
    stopping_rule: bool = False

    def __post_init__(self) -> None:
        if self.primary_endpoint not in FIDELITY_DIRECTIONS:
            raise ManifestError(f"study.primary_endpoint: {self.primary_endpoint!r}; "
                                f"allowed {sorted(FIDELITY_DIRECTIONS)}")
        if self.primary_reference not in ("own_full", "original_full"):
            raise ManifestError(f"study.primary_reference: 'own_full' or 'original_full', "
                                f"got {self.primary_reference!r}")
        if not (0 < self.alpha < 1 and 0 < self.power < 1):
            raise ManifestError(f"study: alpha and power must lie in (0, 1); got {self.alpha}, {self.power}")
        if self.n_boot < 100:
            raise ManifestError(f"study.n_boot: at least 100 replicates; got {self.n_boot}")
        if self.stress_margin is not None and not self.stress_margin > 0:
            raise ManifestError(f"study.stress_margin: a positive margin in the primary endpoint's units; "
                                f"got {self.stress_margin}")


_STUDY_KEYS = {f.name for f in fields(Study)}


def parse_study(raw: Any, where: str) -> Study | None:
    """The ``study`` block at ``where`` of a manifest (None when absent), checked."""
    if raw is None:
        return None
    raw = _mapping(raw, where)
    unknown = set(raw) - _STUDY_KEYS
    if unknown:
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)}; allowed {sorted(_STUDY_KEYS)}")
    kw = dict(raw)
    for key in ("alpha", "power", "fd_margin_pct", "alignment_margin_pct", "stress_margin"):
        if key in kw and (isinstance(kw[key], bool) or not isinstance(kw[key], (int, float))):
            raise ManifestError(f"{where}.{key}: expected a number, got {kw[key]!r} (write 1.0e-2, not 1e-2)")
        if key in kw:
            kw[key] = float(kw[key])
    if "stopping_rule" in kw and not isinstance(kw["stopping_rule"], bool):
        raise ManifestError(f"{where}.stopping_rule: expected true or false, got {kw['stopping_rule']!r}")
    if "strides" in kw:
        if not isinstance(kw["strides"], list) or not all(isinstance(c, str) for c in kw["strides"]):
            raise ManifestError(f"{where}.strides: expected a list of configuration names, got {kw['strides']!r}")
        kw["strides"] = tuple(kw["strides"])
    if "pilot" in kw:
        kw["pilot"] = tuple((str(k), str(v)) for k, v in _mapping(kw["pilot"], f"{where}.pilot").items())
    return Study(**kw)


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value
