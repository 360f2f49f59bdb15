"""The experiment tables (exp-1 main ablation, exp-2 generalisation): per manifest variation its
quality (mean and 95 % interval over seeds), cost against the reference configuration of the same
architecture, and a paired test against the original model's reference configuration, computed
on the per-image side files notebook 03 saved. :func:`fcr.analysis.run.analyze` writes them as
``exp1_table.csv`` / ``exp2_table.csv``; the report formats them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fcr import contract
from fcr.analysis.paired import load_side_file, quality_stem
from fcr.analysis.rows import EXP1, EXP2, read_table, result_dir
from fcr.stats import paired_test
from fcr.manifest import Backbone, backbones_of

__all__ = ["PAIRED_ENDPOINTS", "TABLE_METRICS", "exp1_table", "exp2_table", "exp2_table_by_sweep_run",
           "paired_vs_reference"]

# Metric label -> accepted summary.csv columns (embedded first, SD second).
TABLE_METRICS: dict[str, tuple[str, ...]] = {
    "fd": ("fd_fashioncnn", "fid"),
    "class_accuracy": ("class_accuracy", "clip_score"),
    "kid": ("kid_fashioncnn",),
    "is": ("is_fashioncnn",),
}

# Per-image endpoints of the sweep's side files a paired test uses, first found in both files wins.
PAIRED_ENDPOINTS: tuple[str, ...] = ("prompted_prob", "clip_score")


def paired_vs_reference(
    sweep_dir: str | Path, model: str, config: str, ref_model: str, ref_config: str
) -> dict[str, Any]:
    """Paired t / Wilcoxon test of ``model@config`` vs ``ref_model@ref_config`` on the per-image
    probability of the prompted class (SD: the per-image CLIPScore; :data:`PAIRED_ENDPOINTS`), pooled
    over every seed both have side files for (same seed: same prompts and initial noise in every
    model and configuration, checked on the labels where the side files have them).

    Falls back to ``paired_tests.csv`` (same model only; the mean difference averaged and the
    largest p over seeds). Returns ``paired_mean_diff, paired_p_t, paired_p_wilcoxon, paired_n,
    paired_source``; empty values when neither source has the pair.
    """
    sweep_dir = Path(sweep_dir)
    empty = {"paired_mean_diff": math.nan, "paired_p_t": math.nan, "paired_p_wilcoxon": math.nan,
             "paired_n": math.nan, "paired_source": ""}
    if (model, config) == (ref_model, ref_config):
        return empty
    folder = sweep_dir / "quality"
    stem = quality_stem(model, config, 0).rsplit("seed", 1)[0]
    a_all, b_all, seeds = [], [], []
    for path in sorted(folder.glob(f"{stem}seed*.safetensors")):
        seed = int(path.stem.rsplit("seed", 1)[1])
        ref = folder / f"{quality_stem(ref_model, ref_config, seed)}.safetensors"
        if not ref.is_file():
            continue
        a, b = load_side_file(path), load_side_file(ref)
        if "labels" in a and "labels" in b and (
                a["labels"].shape != b["labels"].shape or not bool((a["labels"] == b["labels"]).all())):
            raise ValueError(f"{path} and {ref} were not made from the same prompts")
        endpoint = next((k for k in PAIRED_ENDPOINTS if k in a and k in b), None)
        if endpoint is None:
            continue
        a_all.append(a[endpoint].double().numpy())
        b_all.append(b[endpoint].double().numpy())
        seeds.append(seed)
    if seeds:
        test = paired_test(np.concatenate(a_all), np.concatenate(b_all))
        what = "" if endpoint == PAIRED_ENDPOINTS[0] else f" (per-image {endpoint})"
        return {"paired_mean_diff": test["mean_diff"], "paired_p_t": test["p_t"],
                "paired_p_wilcoxon": test["p_wilcoxon"], "paired_n": test["n"],
                "paired_source": f"side files{what}, seeds {seeds}"}
    path = sweep_dir / contract.PAIRED_TESTS
    if model == ref_model and path.is_file():
        tests = pd.read_csv(path)
        rows = tests[(tests["model"].astype(str) == model) & (tests["config_a"] == config)
                     & (tests["config_b"] == ref_config)]
        if not rows.empty:
            return {"paired_mean_diff": float(rows["mean_diff"].mean()), "paired_p_t": float(rows["p_t"].max()),
                    "paired_p_wilcoxon": float(rows["p_wilcoxon"].max()), "paired_n": float(rows["n"].sum()),
                    "paired_source": f"paired_tests.csv ({len(rows)} seed(s); mean difference, largest p)"}
    return empty


def _first_col(df: pd.DataFrame, names: Sequence[str]) -> str | None:
    return next((n for n in names if n in df.columns), None)


def _cost_lookup(sweep_dir: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    cost = pd.read_csv(sweep_dir / contract.COST) if (sweep_dir / contract.COST).is_file() else None
    table = pd.read_csv(sweep_dir / contract.COST_TABLE) if (sweep_dir / contract.COST_TABLE).is_file() else None
    return cost, table


def _variation_table(sweep_dir: str | Path, specs: Sequence[tuple[str, str, str, str, str]]) -> pd.DataFrame:
    """One row per ``(variation, model, config, ref_model, ref_config)`` with quality (mean and 95 %
    interval over seeds), cost against ``ref_config`` of the same architecture and a paired test
    against ``ref_model@ref_config``."""
    sweep_dir = Path(sweep_dir)
    summary = read_table(sweep_dir / contract.SUMMARY)
    quality = pd.read_csv(sweep_dir / contract.QUALITY) if (sweep_dir / contract.QUALITY).is_file() else None
    cost, table = _cost_lookup(sweep_dir)
    rows = []
    for variation, model, config, ref_model, ref_config in specs:
        out: dict[str, Any] = {"variation": variation, "model": model, "config": config, "note": ""}
        hit = summary[(summary["model"].astype(str) == model) & (summary["config"].astype(str) == config)]
        if hit.empty:
            out["note"] = f"not in {sweep_dir / 'summary.csv'} (model or configuration not run)"
            rows.append(out)
            continue
        s = hit.iloc[0]
        out["n_seeds"] = int(s.get("n_seeds", 1))
        out["ci_source"] = "t interval over seeds"
        for key, names in TABLE_METRICS.items():
            col = _first_col(summary, names)
            if col is None:
                continue
            out[key] = s[col]
            out[f"{key}_lo"], out[f"{key}_hi"] = s.get(f"{col}_lo", math.nan), s.get(f"{col}_hi", math.nan)
            single = out["n_seeds"] == 1 and quality is not None and f"{col}_lo" in quality.columns
            if single and not (math.isfinite(float(out[f"{key}_lo"])) and math.isfinite(float(out[f"{key}_hi"]))):
                q = quality[(quality["model"].astype(str) == model) & (quality["config"].astype(str) == config)]
                if not q.empty:
                    out[f"{key}_lo"], out[f"{key}_hi"] = q[f"{col}_lo"].iloc[0], q[f"{col}_hi"].iloc[0]
                    out["ci_source"] = "1 seed: bootstrap over images (FD, accuracy only)"
        arch = str(s["architecture"]) if "architecture" in s.index else None
        if arch is not None and cost is not None:
            c = cost[(cost["architecture"].astype(str) == arch)].set_index("config")
            for tcol in sorted(col for col in cost.columns if col.startswith("time_per_image_s_bs")):
                b = tcol[len("time_per_image_s_bs"):]
                if config in c.index:
                    out[f"time_per_image_s_bs{b}"] = float(c.loc[config, tcol])
                    if ref_config in c.index:
                        out[f"time_speedup_bs{b}"] = float(c.loc[ref_config, tcol]) / float(c.loc[config, tcol])
            # On CPU the profiler's peak is the process's resident-set high-water mark: it never falls,
            # so it cannot tell configurations apart and is no memory result. Only the CUDA allocator's is.
            on_gpu = "device" in c.columns and str(c["device"].iloc[0]).startswith("cuda")
            if on_gpu and config in c.index and ref_config in c.index and "peak_memory_bytes" in c.columns:
                mem = c["peak_memory_bytes"].astype(float)
                out["peak_memory_vs_ref"] = mem[config] / mem[ref_config]
        if arch is not None and table is not None:
            t = table[(table["architecture"].astype(str) == arch) & (table["config"].astype(str) == config)]
            if not t.empty:
                r = t.iloc[0]
                out["flops_per_image"] = r.get("flops_per_image", math.nan)
                if f"flops_speedup_vs_{ref_config}" in r.index:
                    out["flops_speedup"] = r[f"flops_speedup_vs_{ref_config}"]
                    out["bound_flops_speedup"] = r.get(f"bound_flops_speedup_vs_{ref_config}", math.nan)
        out.update(paired_vs_reference(sweep_dir, model, config, ref_model, ref_config))
        rows.append(out)
    return pd.DataFrame(rows)


def exp1_table(
    sweep_dir: str | Path,
    *,
    backbone: Backbone | None = None,
    full_config: str = "full",
    reference_config: str = "FD-5",
    stride_config: str = "FD-10",
) -> pd.DataFrame:
    """exp-1 (main ablation): full sampling, the FD-5 and FD-10 baselines of the original model,
    the λ = 0 control and every FCR λ at ``stride_config``. Quality: mean and 95 % interval over
    seeds; time per image (per timed batch size) and speed-ups vs ``reference_config`` of the
    same architecture (measured time, counted FLOPs, analytic bound); paired test vs the original
    model's ``reference_config`` (per-image prompted-class probability; mean_diff = row − FD-5).
    ``backbone``: default the embedded exp-1 backbone of ``params/experiments.yaml``. The rows are
    the manifest's variations and controls on the backbone's models (named as there); a manifest
    without them gets the rows above, named by model and configuration."""
    if backbone is None:
        backbone = next(b for b in backbones_of("embedded") if b.experiment == EXP1)
    ref = (backbone.name, reference_config)
    if backbone.rows:  # the manifest's variations and controls, by their names
        return _variation_table(sweep_dir, [(name, model, config, *ref) for name, model, config in backbone.rows])
    specs = [
        ("Full sampling", backbone.name, full_config, *ref),
        (f"{reference_config}-baseline", backbone.name, reference_config, *ref),
        (f"{stride_config}-baseline", backbone.name, stride_config, *ref),
    ]
    if backbone.control:
        specs.append((f"λ=0 control, {stride_config}", backbone.control, stride_config, *ref))
    specs += [(f"FCR λ={lam:g}, {stride_config}", model, stride_config, *ref)
              for lam, model in sorted(backbone.fcr_models.items())]
    return _variation_table(sweep_dir, specs)


def exp2_table(
    sweep_dir: str | Path,
    *,
    backbones: Sequence[Backbone] | None = None,
    dpm_config: str = "DPM++-FD-10",
    lambda_fcr: float = 0.10,
    reference_config: str = "FD-5",
    stride_config: str = "FD-10",
) -> pd.DataFrame:
    """exp-2 (generalisation): per backbone the manifest's variations and controls on its models
    (named as there); for a manifest without them, its original model at ``reference_config``, the
    FCR model (λ = ``lambda_fcr``) at ``stride_config`` and, where the manifest reads a backbone's
    FCR model at ``dpm_config``, that too (encoder caching on DPM-Solver++). Same columns as
    :func:`exp1_table`; speed-ups and paired tests are against the backbone's original model at
    ``reference_config``. ``backbones``: default the embedded exp-2 backbones of ``params/experiments.yaml``."""
    if backbones is None:
        backbones = [b for b in backbones_of("embedded") if b.experiment == EXP2]
    specs = []
    for b in backbones:
        ref = (b.name, reference_config)
        if b.rows:  # the manifest's variations and controls, by their names
            specs += [(name, model, config, *ref) for name, model, config in b.rows]
            continue
        fcr = b.fcr_models.get(lambda_fcr) or next(iter(b.fcr_models.values()), None)
        specs.append((f"{b.role}: {b.name} {reference_config}", b.name, reference_config, *ref))
        if fcr is None:
            continue
        specs.append((f"{b.role}: FCR λ={lambda_fcr:g} {stride_config}", fcr, stride_config, *ref))
        if dpm_config in b.fcr_configs:
            specs.append((f"{b.role}: FCR λ={lambda_fcr:g} + DPM-Solver++ {stride_config}", fcr, dpm_config, *ref))
    return _variation_table(sweep_dir, specs)


def exp2_table_by_sweep_run(root: Path, backbones: Sequence[Backbone], dpm_config: str) -> pd.DataFrame:
    """exp-2's table over every sweep run its backbones were evaluated in (one run in the embedded
    setting; one per backbone for SD, whose backbones differ in resolution and prediction type)."""
    exp2 = [b for b in backbones if b.experiment == EXP2]
    runs = list(dict.fromkeys(b.sweep_run for b in exp2))
    parts = [exp2_table(result_dir(root, EXP2, "sweep", run), backbones=[b for b in exp2 if b.sweep_run == run],
                        dpm_config=dpm_config) for run in runs]
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
