"""Criterion b for deep caching (issue #13): the seed's "≥ 1.4× vs FD-5 at ≤ 2 % extra memory, equal
quality", evaluated for DeepCache at interval 10 on the frontier run of a backbone, against the
original model's FD-5 and against its DeepCache-5.

Rows per caching model (the original model with DeepCache: context; each FCR-deep fine-tune: a
criterion row) x comparator: the measured wall-time ratio at every timed batch size, peak memory
(measurable on a GPU only), and equal quality as the study's two non-inferiority tests (ΔFD ≤ +5 %,
Δ prompt alignment ≥ −2 %, same images; :func:`fcr.analysis.contrasts.noninferiority`), Holm
over every quality test these rows make. Passed = the three-valued AND of the three parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fcr import contract
from fcr.analysis.contrasts import adjust_family, common_seeds, noninferiority
from fcr.analysis.rows import (
    THRESHOLDS,
    InputError,
    all_of,
    backbone_scope,
    fmt3,
    fmt_pct,
    read_table,
    result_dir,
    verdict_row,
)
from fcr.manifest import Backbone, Study

__all__ = ["DEEP_B_NAME", "deep_caching_rows"]

DEEP_B_NAME = "b. speed-up (deep caching)"
INTERVAL, REFERENCE_INTERVAL = 10, 5  # the seed's stride pair, as DeepCache intervals


def _branch(quality: pd.DataFrame, model: str) -> int | None:
    """The skip branch an FCR-deep fine-tune regularised (its params.yaml), None when unknown."""
    from fcr.backends.models import ModelNotFoundError, model_training_params, resolve_unet_dir

    sources = quality.loc[quality["model"].astype(str) == model, "model_source"] if "model_source" in quality else []
    for source in list(dict.fromkeys(sources))[:1]:
        try:
            trained = model_training_params(resolve_unet_dir(str(source))) or {}
        except ModelNotFoundError:
            return None
        if trained.get("feature_group") == "deep":
            return int(trained.get("fcr_deep_branch", 0))
    return None


def _quality_word(tests: list[dict[str, Any]]) -> tuple[bool | None, str]:
    """True when both margins are shown (Holm), False when one is shown violated, None otherwise
    (the tests' ``decision``, :func:`fcr.analysis.contrasts.adjust_family`)."""
    parts = [f"{'ΔFD' if t['endpoint'] == 'fd_increase_pct' else 'Δ alignment'} {fmt_pct(t['estimate'])} "
             f"[{fmt3(t['lo'])}, {fmt3(t['hi'])}] (p_Holm {fmt3(t['p_holm'])})" for t in tests]
    decisions = [t["decision"] for t in tests]
    if "inferior" in decisions:
        return False, "; ".join(parts)
    return (True if all(d == "non-inferior" for d in decisions) else None), "; ".join(parts)


def deep_caching_rows(root: str | Path, b: Backbone) -> list[dict]:
    """Criterion-b rows for deep caching on ``b``'s frontier run (none when it has no frontier run)."""
    if b.frontier_run is None:
        return []
    sweep = result_dir(root, b.experiment, "sweep", b.frontier_run)
    scope = backbone_scope(b)
    study = b.study or Study()
    thr = (f"≥ {THRESHOLDS['speedup']:g}× wall time, ≤ +{THRESHOLDS['memory_increase_pct']:g} % memory, "
           f"FD ≤ +{study.fd_margin_pct:g} % and alignment ≥ {study.alignment_margin_pct:g} % (non-inferior, Holm)")
    try:
        quality = read_table(sweep / contract.QUALITY)
        cost = read_table(sweep / contract.COST)
    except InputError as exc:
        return [verdict_row(DEEP_B_NAME, scope, "n/a", thr, None, str(exc))]
    deep = {f"FCR-deep λ={lam:g}": (m, _branch(quality, m)) for lam, m in sorted(b.fcr_deep_models.items())}
    branch = next((br for _, br in deep.values() if br is not None), 0)
    methods = [("DeepCache", b.name, branch, "context")] + [(name, m, br if br is not None else branch, "criterion")
                                                           for name, (m, br) in deep.items()]
    planned = []
    for name, model, br, kind in methods:
        config = f"DeepCache-{INTERVAL}-b{br}"
        for vs_config in ("FD-5", f"DeepCache-{REFERENCE_INTERVAL}-b{br}"):
            planned.append((name, model, config, vs_config, kind))
    # Quality tests first, so Holm runs over every one of them.
    tests: list[list[dict[str, Any]]] = []
    for _, model, config, vs_config, _ in planned:
        seeds = common_seeds(quality, [(model, config), (b.name, vs_config)])
        tests.append([{"kind": "non-inferiority", **t} for t in noninferiority(sweep, model, config, b.name, vs_config,
                                                                                seeds, study)] if seeds else [])
    flat = adjust_family([t for group in tests for t in group], study)
    m_tests = flat[0]["m_tests"] if flat else 0
    rows = []
    arch_of = quality.groupby("model")["architecture"].first().astype(str).to_dict() if "architecture" in quality else {}
    for (name, model, config, vs_config, kind), group in zip(planned, tests):
        label = f"{scope}: {name} ({model}) {config} vs {b.name} {vs_config}"
        arch = arch_of.get(model)
        hit = cost[(cost["architecture"].astype(str) == str(arch)) & (cost["config"].isin([config, vs_config]))]
        by = hit.set_index("config")
        if not group or config not in by.index or vs_config not in by.index:
            rows.append(verdict_row(DEEP_B_NAME, label, "n/a", thr, None,
                                    f"{sweep}: {model}@{config} or {b.name}@{vs_config} was not run (quality or cost)",
                                    kind=kind))
            continue
        tcols = sorted((c for c in cost.columns if c.startswith("time_per_image_s_bs")), key=lambda c: int(c[19:]))
        speed = {int(c[19:]): float(by.loc[vs_config, c]) / float(by.loc[config, c]) for c in tcols}
        time_ok = all(v >= THRESHOLDS["speedup"] for v in speed.values()) if speed else None
        device = str(by.loc[config, "device"]) if "device" in by.columns else "unknown device"
        mem_ok, mem = None, "memory n/a (CPU: process-wide RSS high-water mark)"
        if device.startswith("cuda") and "peak_memory_bytes" in by.columns:
            inc = 100.0 * (float(by.loc[config, "peak_memory_bytes"]) / float(by.loc[vs_config, "peak_memory_bytes"]) - 1)
            mem_ok, mem = inc <= THRESHOLDS["memory_increase_pct"], f"memory {fmt_pct(inc)}"
        q_ok, q_text = _quality_word(group)
        measured = ", ".join(f"batch {k}: {fmt3(v)}×" for k, v in speed.items()) + f"; {mem}; {q_text}"
        note = (f"Wall time per image (medians of timed repeats, device {device}) of {config} vs {vs_config} on "
                f"architecture {arch}; quality: non-inferiority of {model}@{config} against {b.name}@{vs_config} on "
                f"the same {group[0]['n']} images, Holm over the {m_tests} quality tests of these rows "
                f"(frontier run {b.frontier_run!r}).")
        rows.append(verdict_row(DEEP_B_NAME, label, measured, thr, all_of([time_ok, mem_ok, q_ok]), note, kind=kind,
                                value=min(speed.values()) if speed else None))
    return rows
