"""Criterion f: fine-tune compute as a share of pre-training compute."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fcr.analysis.rows import SD_PRETRAINING, THRESHOLDS, InputError, all_of, count_verdicts, fmt3, verdict_row
from fcr.eval import training_cost
from fcr.manifest import Backbone

__all__ = [
    "F_NAME",
    "criterion_f",
]

# ----------------------------------------------------------------------------- f. training overhead

F_NAME = "f. training overhead"

def _pretraining(model: str, models_dir: Path, flops_fn: Callable[[str, bool], float],
                 depth: int = 0) -> tuple[float, list[str]]:
    """Pre-training FLOPs of an embedded model, its ancestors' included (a derivative model is a fine-tune)."""
    if depth > 5:
        raise InputError(f"model lineage of {model!r} is deeper than 5 levels (a cycle?)")
    run = training_cost.run_compute(models_dir / model)
    per_image = flops_fn(run.architecture, run.lambda_fcr > 0)
    total = run.images * per_image
    parts = [f"{model}: {run.steps} steps × {run.images_per_step} images × {fmt3(per_image / 1e9)} GFLOP "
             f"(λ={run.lambda_fcr:g}, {run.steps_source})"]
    if run.parent is not None:
        parent_total, parent_parts = _pretraining(run.parent, models_dir, flops_fn, depth + 1)
        total += parent_total
        parts += parent_parts
    return total, parts


def criterion_f(root: Path, backbones: Sequence[Backbone], selected: Sequence[str], models_dir: Path,
                 flops_fn: Callable[[str, bool], float], sd_finetune_gpu_hours: float | None) -> list[dict]:
    thr = f"fine-tune compute ≤ {THRESHOLDS['overhead_pct']:g} % of pre-training compute"
    rows, verdicts = [], []
    for b in backbones:
        for lam, label in b.fcr_models.items():
            kind = "part" if label in selected or not selected else "context"
            scope = f"{label} (from {b.name})"
            try:
                run = training_cost.run_compute(root / b.experiment / label)
                ft_img = flops_fn(run.architecture, run.lambda_fcr > 0)
                ft = run.images * ft_img
                pre, lineage = _pretraining(b.name, models_dir, flops_fn)
                pct = training_cost.overhead_percent(ft, pre)
                ok = pct <= THRESHOLDS["overhead_pct"]
                measured = f"{fmt3(pct)} % ({fmt3(ft / 1e15)} PFLOP vs {fmt3(pre / 1e15)} PFLOP)"
                note = (f"Fine-tune: {run.steps} steps ({run.steps_source}) × {run.images_per_step} images × "
                        f"{fmt3(ft_img / 1e9)} GFLOP per image of a λ={run.lambda_fcr:g} training step. Pre-training: "
                        f"{'; '.join(lineage)}. "
                        "FLOPs per image counted with torch.utils.flop_counter on one forward + backward "
                        "(fcr.eval.training_cost.training_step_flops).")
            except (InputError, training_cost.TrainingRunError, FileNotFoundError) as exc:
                ok, measured, note, pct = None, "n/a", str(exc), None
            if kind == "part":
                verdicts.append(ok)
            rows.append(verdict_row(F_NAME, scope, measured, thr, ok, note, kind=kind, value=pct))
    rows.insert(0, verdict_row(F_NAME, "selected FCR runs (embedded)", count_verdicts(verdicts, "runs"),
                        thr, all_of(verdicts), "AND over the best-λ run of each backbone (criterion a)."))
    # Stable Diffusion: the published pre-training figure; the SD fine-tune is not run here.
    budget = SD_PRETRAINING["gpu_hours"] * THRESHOLDS["overhead_pct"] / 100.0
    sd_thr = f"≤ {budget:,.0f} {SD_PRETRAINING['hardware']} GPU-hours ({thr})"
    if sd_finetune_gpu_hours is None:
        rows.append(verdict_row(F_NAME, "SD1.5 (published pre-training compute)", "n/a", sd_thr, None,
                         f"Not measurable here: no SD fine-tune ran on this machine (no SD weights can be loaded). "
                         f"Denominator: {SD_PRETRAINING['gpu_hours']:,.0f} GPU-hours, {SD_PRETRAINING['source']}. "
                         "Note: the seed's plan of ≤ 40 GPU-hours per variation (fine-tune + evaluation) is a plan, "
                         "not a measurement.", kind="context"))
    else:
        pct = 100.0 * sd_finetune_gpu_hours / SD_PRETRAINING["gpu_hours"]
        rows.append(verdict_row(F_NAME, "SD1.5 (published pre-training compute)",
                         f"{fmt3(pct)} % ({fmt3(sd_finetune_gpu_hours)} GPU-hours)", sd_thr,
                         pct <= THRESHOLDS["overhead_pct"],
                         f"GPU-hours of the SD fine-tune as given; denominator {SD_PRETRAINING['source']}. "
                         "GPU-hours of different GPU types are not the same compute.", kind="context", value=pct))
    return rows
