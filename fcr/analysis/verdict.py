"""Success criteria of the research strategy (seed section 5), evaluated on a pipeline run's files.

:func:`evaluate_criteria` reads the result files of a run under ``root`` (``outputs/embedded``)
and returns one row per criterion and scope: the measured value next to the threshold and
``passed`` (True / False, or None when an input is missing or cannot measure the criterion; the
note then names the missing file and the notebook or stage that writes it). Nothing is estimated
when a file is missing.

Embedded equivalents of the seed's metrics: the Fréchet distance of the ``fashioncnn`` classifier
features (``fd_fashioncnn``) plays FID, and the accuracy of the prompted class (``class_accuracy``,
classifier agreement with the prompt) plays CLIPScore. An SD run's summary with ``fid`` /
``clip_score`` columns is read the same way.

Row kinds: ``criterion`` rows make the verdict (``overall`` is their three-valued AND),
``part`` rows are the pieces a criterion row combines, ``context`` rows are shown for reading only.

Expected layout (params/experiments.yaml, whose ``backbones`` say which models and runs the verdict
reads; folder names in :data:`LAYOUT`, file and column names in :mod:`fcr.contract`). ``<kind>/<run>/`` with run ``main``; a results folder directly in
``<kind>/`` is accepted too (:func:`result_dir`)::

    <root>/exp-1-main-ablation/<variation>/    fine-tune run folders (train_config.json, params.yaml, train_log.csv)
    <root>/exp-1-main-ablation/sweep/main/     notebook 03: summary.csv, cost.csv, cost_table.csv, paired_tests.csv
    <root>/exp-1-main-ablation/mechanistic/main/   notebook 05: variance_reduction.csv, regression.json
    <root>/exp-2-generalisation-robustness/<variation>/, sweep/main/, mechanistic/main/   the same for exp-2
    <root>/exp-2-generalisation-robustness/robustness/main/criterion.csv   notebook 04
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from fcr.analysis.deep_caching import deep_caching_rows
from fcr.analysis.human_preference import DEFAULT_HUMAN_ANALYSIS, human_preference_rows
from fcr.analysis.overhead import criterion_f
from fcr.analysis.quality_cost import criterion_a, criterion_b, sd_gpu_cost_rows
from fcr.analysis.robustness_criterion import criterion_c_rows
from fcr.analysis.rows import VERDICT_COLUMNS, all_of, count_verdicts, result_dir, verdict_row
from fcr.eval import training_cost
from fcr.manifest import Backbone, backbones_of
from fcr.analysis.mechanism import criterion_e

__all__ = [
    "evaluate_criteria",
]


# ----------------------------------------------------------------------------- entry point


def evaluate_criteria(
    root: str | Path,
    *,
    setting: str = "embedded",
    backbones: Sequence[Backbone] | None = None,
    models_dir: str | Path | None = None,
    robustness_dirs: Sequence[str | Path] | None = None,
    mechanistic_dirs: Sequence[str | Path] | None = None,
    stride_config: str = "FD-10",
    reference_config: str = "FD-5",
    contrasts: pd.DataFrame | None = None,
    safe_strides: pd.DataFrame | None = None,
    train_flops_per_image: Callable[[str, bool], float] | None = None,
    sd_finetune_gpu_hours: float | None = None,
    sd_gpu_cost: str | Path | None = None,
    human_analysis: str | Path | None = DEFAULT_HUMAN_ANALYSIS,
    stress_did: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Evaluate the seed's success criteria a–f on the run under ``root``.

    Returns a table with :data:`VERDICT_COLUMNS`: ``criterion``, ``scope`` (backbone, model or
    experiment), ``kind`` (criterion / part / context), ``measured`` (readable), ``value`` (the
    key number), ``threshold``, ``passed`` (True / False / None when not measurable) and ``note``.
    The last row, ``overall``, is the three-valued AND of all ``criterion`` rows.

    ``backbones``: default those of ``setting`` in ``params/experiments.yaml``.
    ``models_dir``: the original models' folders (pre-training logs for f; default ``models/``).
    ``robustness_dirs`` / ``mechanistic_dirs``: notebook 04 / 05 result folders (default: the
    backbones' notebook-04 and notebook-05 runs).
    ``train_flops_per_image(architecture, fcr)``: FLOPs per image of a training step (default:
    counted with :func:`fcr.eval.training_cost.training_step_flops` on the embedded architecture, once per pair).
    ``sd_finetune_gpu_hours``: GPU-hours of an SD FCR fine-tune, if one was run elsewhere.
    ``sd_gpu_cost``: ``benchmarks/bench_sd_gpu.py``'s CSV: adds criterion-b context rows at SD scale.
    ``human_analysis``: notebook 07's output folder: the human-preference context row (n/a without ratings).
    ``stress_did``: the study's criterion-c family (:func:`fcr.report.study.stress_did_table`); where it
    has rows, its difference in differences follows criterion c (the seed's definition) as context rows.
    ``contrasts``: the study's pre-registered contrasts (:func:`fcr.report.study.study_tables`);
    criterion a of a backbone with a study is then its non-inferiority test; ``safe_strides`` (the
    study's per-model stride tests) adds the same test of the original model and of the control at
    the stride as context rows.
    """
    from fcr.backends.models import MODELS_DIR

    root = Path(root)
    backbones = backbones_of(setting) if backbones is None else backbones
    models_dir = Path(models_dir) if models_dir is not None else MODELS_DIR
    if robustness_dirs is None:
        robustness_dirs = list(dict.fromkeys(result_dir(root, b.experiment, "robustness", b.robustness_run)
                                             for b in backbones if b.robustness_run is not None))
    if mechanistic_dirs is None:
        mechanistic_dirs = list(dict.fromkeys(result_dir(root, b.experiment, "mechanistic", b.mechanistic_run)
                                              for b in backbones if b.mechanistic_run is not None))
    robustness_dirs = [Path(d) for d in robustness_dirs]
    mechanistic_dirs = [Path(d) for d in mechanistic_dirs]
    flops_fn = train_flops_per_image or training_cost.embedded_flops_per_image()

    rows: list[dict] = []
    selected: list[str] = []
    per_backbone: dict[str, tuple[bool | None, bool | None]] = {}
    for b in backbones:
        a_rows, best, a_ok = criterion_a(root, b, stride_config, reference_config, contrasts, safe_strides)
        b_rows, b_ok = criterion_b(root, b, best, a_ok, stride_config, reference_config)
        rows += a_rows + b_rows + deep_caching_rows(root, b)
        if best:
            selected.append(best)
        per_backbone[b.name] = (a_ok, b_ok)
    if sd_gpu_cost is not None:
        rows += sd_gpu_cost_rows(sd_gpu_cost, stride_config, reference_config)
    rows += criterion_c_rows(robustness_dirs, backbones, stress_did)

    def word(v: bool | None) -> str:
        return "pass" if v else "n/a" if v is None else "FAIL"

    d_ok = all_of(v for pair in per_backbone.values() for v in pair)
    rows.append(verdict_row("d. generalization", "all backbones",
                     "; ".join(f"{n}: a {word(a)}, b {word(bb)}" for n, (a, bb) in per_backbone.items()),
                     "every backbone passes a and b", d_ok,
                     "Backbones and the roles they play: "
                     + ", ".join(f"{b.name} = {b.role}" for b in backbones) + "."))
    rows += criterion_e(mechanistic_dirs, selected)
    rows += criterion_f(root, backbones, selected, models_dir, flops_fn, sd_finetune_gpu_hours)
    rows += human_preference_rows(human_analysis)

    table = pd.DataFrame(rows, columns=VERDICT_COLUMNS)
    verdict_rows = table[table["kind"] == "criterion"]
    overall = all_of(verdict_rows["passed"].tolist())
    failing = verdict_rows[verdict_rows["passed"] == False]  # noqa: E712  (None must not match)
    unmeasured = verdict_rows[verdict_rows["passed"].isna()]
    note = "Three-valued AND of every criterion row (seed: all must hold to claim a win)."
    if len(failing):
        note += " Failing: " + "; ".join(f"{r.criterion} [{r.scope}]" for r in failing.itertuples()) + "."
    if len(unmeasured):
        note += " Not measurable: " + "; ".join(f"{r.criterion} [{r.scope}]" for r in unmeasured.itertuples()) + "."
    measured = count_verdicts(verdict_rows["passed"].tolist(), "criterion rows")
    overall_row = pd.DataFrame([verdict_row("overall", "all criteria", measured, "all of a–f", overall, note)],
                               columns=VERDICT_COLUMNS)
    table = pd.concat([table, overall_row], ignore_index=True)
    table["passed"] = table["passed"].astype(object).where(table["passed"].notna(), None)
    return table
