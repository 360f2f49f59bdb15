"""Does trajectory feature drift predict the caching error, image by image? (issue #12, item 5)

For every model x stride ``s`` x image of the sweep: ``y`` = the image's paired caching fidelity
at ``FD-s`` (e.g. PSNR to the same model's full sampling, :mod:`fcr.experiments.paired_fidelity`)
and ``x`` = its encoder drift at stride ``s`` along its own full-sampling trajectory
(:mod:`fcr.experiments.trajectory_drift`), the same prompt and z_T. Three fits on those points:

- **as written** (the seed's criterion e: R² ≥ 0.6): OLS of ``y`` on ``x`` alone, pooled;
- **partial R²** of ``x`` given stride and model (OLS with ``C(stride) + C(model)`` with and without
  ``x``): how much of what stride and model leave unexplained the drift explains;
- **mixed model** (statsmodels ``MixedLM``): ``y ~ x + C(stride) + C(model)`` with a random
  intercept per prompt/noise pair (the same image appears at every stride and model, so the points
  are not independent): the slope of ``x`` with its 95 % interval.

:func:`run_trajectory_drift` measures the drift of the sweep's own prompts and noise and writes it
per image; :func:`drift_points` joins it with the sweep's per-image fidelity files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from fcr import contract
from fcr.eval.results import save_safetensors_atomic, write_json_atomic
from fcr.analysis.paired import cell_tensors, load_fidelity
from fcr.experiments.trajectory_drift import drift_key, trajectory_drift
from fcr.options import Options

__all__ = [
    "DRIFT_FOLDER",
    "drift_file",
    "drift_points",
    "drift_regression",
    "plot_drift_regression",
    "run_drift_regression",
    "run_trajectory_drift",
]

DRIFT_FOLDER = "trajectory"


def drift_file(out_dir: str | Path, model: str, seed: int) -> Path:
    """Where one model x seed's per-image drift is stored."""
    return Path(out_dir) / DRIFT_FOLDER / f"{model}__seed{seed}.safetensors"


def run_trajectory_drift(
    opts: Options, models: Mapping[str, str], out_dir: str | Path, *, seeds: Sequence[int], n_images: int,
    strides: Sequence[int], groups: Sequence[str] = ("all",), progress: bool = True,
) -> list[Path]:
    """Per-image drift of every model (label -> name or run folder) on the first ``n_images``
    evaluation prompts of each seed, exactly the sweep's prompts and z_T (validated ``opts`` of
    the sweep's sizes); a (model, seed) file already written with the same strides, groups and
    images is kept (resumable)."""
    from fcr.backends.models import resolve_device
    from fcr.eval.context import RunContext, Sampling, eval_prompts, load_models

    device = resolve_device(opts.run.device)
    loaded = load_models(opts, models, device)
    sampling = Sampling.from_options(opts)
    want = {"strides": ",".join(map(str, strides)), "groups": ",".join(groups), "n_images": str(n_images)}
    written = []
    for seed in seeds:
        prompts = eval_prompts(opts, opts.evaluation.num_eval_images, seed)
        if n_images > len(prompts):
            raise ValueError(f"n_images={n_images} exceeds the sweep's num_eval_images={len(prompts)}")
        subset = prompts.head(n_images) if hasattr(prompts, "head") else prompts[:n_images]
        for label, m in loaded.items():
            path = drift_file(out_dir, label, seed)
            if path.is_file():
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                if all(meta.get(k) == v for k, v in want.items()):
                    written.append(path)
                    continue
            out = trajectory_drift(m.model, subset, seed=seed, strides=strides, groups=groups,
                                   num_inference_steps=opts.sampling.num_inference_steps,
                                   guidance_scale=sampling.guidance_scale, batch_size=sampling.batch_size,
                                   progress=progress)
            tensors = {k: torch.from_numpy(v) for k, v in out.drift.items()}
            save_safetensors_atomic(tensors, path, {**want, "model": label, "seed": str(seed),
                                                    "prompts": json.dumps(RunContext.prompt_texts(subset))})
            written.append(path)
    return written


def drift_points(drift_dir: str | Path, sweep_dir: str | Path, models: Sequence[str], seeds: Sequence[int],
                 strides: Sequence[int], *, group: str = "all", variant: str = "norm", endpoint: str = "psnr",
                 reference: str = "own_full") -> pd.DataFrame:
    """One row per model x seed x stride x image: ``drift`` and the sweep's per-image ``endpoint``
    of ``FD-<stride>`` (the first images of the seed, as many as the drift file holds). Refuses a
    drift file whose prompts are not the sweep cell's (the points would not be paired)."""
    from safetensors import safe_open

    rows = []
    for model in models:
        for seed in seeds:
            path = drift_file(drift_dir, model, seed)
            drift = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                mine = json.loads((f.metadata() or {}).get("prompts", "[]"))
            theirs = json.loads(cell_tensors(sweep_dir, model, "full", seed)[1] or "[]")
            if mine != theirs[: len(mine)]:
                raise ValueError(f"{path}: its prompts are not the first {len(mine)} of the sweep's {model} seed {seed}; "
                                 "rerun run_trajectory_drift with the sweep's parameters")
            for s in strides:
                x = drift[drift_key(s, group, variant)].double().numpy()
                y = load_fidelity(sweep_dir, model, f"FD-{s}", seed, reference)[endpoint].double().numpy()[: len(x)]
                rows += [{"model": model, "seed": seed, "image": i, "pair": f"{seed}:{i}", "stride": s,
                          "drift": float(x[i]), endpoint: float(y[i])} for i in range(len(x))]
    return pd.DataFrame(rows)


def _r2(fit: Any) -> float:
    return float(fit.rsquared)


def drift_regression(points: pd.DataFrame, endpoint: str = "psnr") -> dict[str, Any]:
    """The three fits of the module docstring on :func:`drift_points` rows."""
    import statsmodels.formula.api as smf

    data = points.rename(columns={endpoint: "y"})
    out: dict[str, Any] = {"endpoint": endpoint, "n_points": len(data), "n_pairs": int(data["pair"].nunique()),
                           "n_models": int(data["model"].nunique()), "strides": sorted(int(s) for s in data["stride"].unique())}
    pooled = smf.ols("y ~ drift", data).fit()
    out["as_written"] = {"r2": _r2(pooled), "slope": float(pooled.params["drift"]),
                         "p": float(pooled.pvalues["drift"])}
    fixed = "C(stride)" + (" + C(model)" if out["n_models"] > 1 else "")
    reduced = smf.ols(f"y ~ {fixed}", data).fit()
    full = smf.ols(f"y ~ drift + {fixed}", data).fit()
    sse_r, sse_f = float(reduced.ssr), float(full.ssr)
    out["partial"] = {"r2_stride_model": _r2(reduced), "r2_with_drift": _r2(full),
                      "partial_r2_drift": (sse_r - sse_f) / sse_r if sse_r > 0 else math.nan}
    try:
        mixed = smf.mixedlm(f"y ~ drift + {fixed}", data, groups=data["pair"]).fit(reml=True)
        lo, hi = (float(v) for v in mixed.conf_int().loc["drift"])
        out["mixed"] = {"slope": float(mixed.params["drift"]), "lo": lo, "hi": hi,
                        "p": float(mixed.pvalues["drift"]), "pair_variance": float(mixed.cov_re.iloc[0, 0]),
                        "converged": bool(mixed.converged)}
    except (np.linalg.LinAlgError, ValueError) as exc:  # e.g. one point per pair
        out["mixed"] = {"error": str(exc)}
    return out


def run_drift_regression(
    opts: Options, models: Mapping[str, str], out_dir: str | Path, progress: bool = True
) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """Notebook 05's trajectory section for validated ``opts``: the drift of ``trajectory_images``
    prompts of each ``trajectory_seeds`` seed at ``trajectory_strides`` (resumable), joined with the
    per-image PSNR to own full sampling of the sweep whose ``quality.csv`` is in ``quality_tables``,
    and the fits; writes :data:`fcr.contract.TRAJECTORY_POINTS` and
    :data:`fcr.contract.TRAJECTORY_REGRESSION`. None when ``trajectory_seeds`` is empty."""
    if not opts.mechanistic.trajectory_seeds:
        return None
    out_dir = Path(out_dir)
    sweep_dir = next(Path(p).parent for p in opts.mechanistic.quality_tables if Path(p).name == contract.QUALITY)
    seeds, strides = list(opts.mechanistic.trajectory_seeds), list(opts.mechanistic.trajectory_strides)
    run_trajectory_drift(opts, models, out_dir, seeds=seeds, n_images=opts.mechanistic.trajectory_images, strides=strides,
                         progress=progress)
    points = drift_points(out_dir, sweep_dir, list(models), seeds, strides)
    points.to_csv(out_dir / contract.TRAJECTORY_POINTS, index=False)
    fit = {**drift_regression(points), "sweep": str(sweep_dir), "seeds": seeds, "feature_group": "all",
           "variant": "norm", "reference": "own_full"}
    write_json_atomic(out_dir / contract.TRAJECTORY_REGRESSION, fit)
    return points, fit


def plot_drift_regression(points: pd.DataFrame, endpoint: str = "psnr"):
    """Per-image caching fidelity against trajectory drift; hue = model, style = stride."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6, 4))
    sns.scatterplot(data=points, x="drift", y=endpoint, hue="model", style="stride", s=14, alpha=0.6, ax=ax)
    ax.set_xlabel("encoder drift along the full-sampling trajectory (normalised, all features)")
    ax.set_ylabel(f"{endpoint} to the model's own full sampling")
    fig.tight_layout()
    return fig
