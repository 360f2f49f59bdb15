"""Every result file a stage writes and the report reads, and the columns the report reads from
them: one name each, imported by writers and readers alike, so renaming one is one edit here.

The quality columns differ by setting: the embedded default's Fréchet distance of the ``fashioncnn``
classifier features plays FID, and its prompted-class accuracy plays CLIPScore.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "CACHE_AWARE_CONTRASTS",
    "CACHE_AWARE_FAMILY",
    "CACHE_AWARE_FD_INF",
    "CACHE_TRAINING_FILE",
    "ATTEMPTS_RECORD",
    "ANALYSIS_NOTES",
    "DONE_MARKER",
    "EXP1_TABLE",
    "EXP2_TABLE",
    "SUPPLEMENTARY_ROBUSTNESS",
    "VERDICT",
    "REPRODUCTION",
    "STAGE_OUTPUTS",
    "STAGE_TIMES",
    "PIPELINE_TIMING",
    "TRANSIENT",
    "CELL_FOLDERS",
    "COLUMNS",
    "COST",
    "COST_TABLE",
    "CONTRASTS",
    "CRITERION",
    "DROPS",
    "FIDELITY",
    "FD_INFINITY",
    "APPROACHES",
    "FRONTIER",
    "HEADLINE_FRONTIER",
    "FRONTIER_ARMS",
    "FEW_STEPS_CONTRASTS",
    "FEW_STEPS_SAFE_STRIDES",
    "LENGTH_CONTRASTS",
    "ABLATION_CONTRASTS",
    "GRID_SECONDARY",
    "GRID_SELECTIONS",
    "GRID_SENSITIVITY",
    "GRID_FOREST",
    "STOPPING_RULE",
    "MATCHED_COST",
    "FIDELITY_DIRECTIONS",
    "FIDELITY_PER_IMAGE",
    "PAIRED_TESTS",
    "PRODUCERS",
    "QUALITY",
    "QUALITY_DROPS",
    "REGRESSION",
    "REGRESSION_FITS",
    "REGRESSION_POINTS",
    "ROBUSTNESS",
    "STRESS_DID",
    "STRESS_FIDELITY",
    "STRESS_FIDELITY_SUMMARY",
    "SAFE_STRIDES",
    "REGIME_SAFE_STRIDES",
    "RUN_PARAMS",
    "SUMMARY",
    "TRAIN_CONFIG",
    "TRAIN_LOG",
    "VALIDATION_LOG",
    "EARLY_STOPPING",
    "BEST_UNET",
    "TRAJECTORY_POINTS",
    "TRAJECTORY_REGRESSION",
    "model_label",
    "VARIANCE",
    "VARIANCE_REDUCTION",
]

# The pipeline's records in every stage folder (fcr.markers): the completion marker (fingerprint of
# the parameters, wall time, inventory of the files written) and the start times of unfinished
# attempts; the stage times of a run, as a table, in its report folder.
DONE_MARKER = ".pipeline_done.json"
ATTEMPTS_RECORD = ".pipeline_attempts.json"
STAGE_TIMES = "stage_times.csv"
PIPELINE_TIMING = "pipeline_timing.json"  # this invocation's stages, written after the report's marker
TRANSIENT = "checkpoints"  # training checkpoints: for resuming only, never part of a finished stage
# Subfolders of per-cell results a runner writes as each cell finishes (run_or_load): a stage in progress
# commits these, whole, so another machine resumes from them; its tables and marker come at the end.
CELL_FOLDERS = ("quality", "results", "cost", "images", "reference")
# The main job's report: this run's numbers beside the committed reference run's (fcr.report.reproduction).
REPRODUCTION = "reproduction.csv"
# Training run folder (notebook 02 / python -m fcr train).
RUN_PARAMS = "params.yaml"
TRAIN_CONFIG = "train_config.json"
TRAIN_LOG = "train_log.csv"
# Checkpoint selection on the mini-validation set (fcr.train.validation), when validate_every > 0.
VALIDATION_LOG = "validation.csv"
EARLY_STOPPING = "early_stopping.json"
BEST_UNET = "unet_best"
# A distillation round folder (fcr.train.distillation): the student's sampler (method, grid, steps).
DISTILLATION_FILE = "distillation.json"
# What a cache-aware fine-tune was trained for (fcr.train.cache_aware), beside its unet/.
CACHE_TRAINING_FILE = "cache_training.json"
# Notebook 06: cache-aware fine-tunes against the original at the configuration they were trained for.
CACHE_AWARE_CONTRASTS = "cache_aware_contrasts.csv"
CACHE_AWARE_FD_INF = "cache_aware_fd_infinity.csv"  # its secondary endpoint: FD∞ vs the original's full sampling
CACHE_AWARE_FAMILY = "cache-aware: "  # prefix of its Holm families among the study's CONTRASTS rows
ROUND_FOLDER = re.compile(r"round\d+_steps\d+")  # a distillation round: round<r>_steps<N>
# Stride sweep (notebook 03).
QUALITY = "quality.csv"
SUMMARY = "summary.csv"
COST = "cost.csv"
COST_TABLE = "cost_table.csv"
PAIRED_TESTS = "paired_tests.csv"
FIDELITY = "fidelity.csv"  # per cell x reference: paired caching fidelity (fcr.experiments.paired_fidelity)
# Per image: model, config, seed, image, reference (+ its model and config) and every fidelity endpoint,
# one table per sweep (what every paired contrast reads).
FIDELITY_PER_IMAGE = "fidelity_per_image.parquet"
# Paired fidelity endpoints (fcr.eval.fidelity): +1 higher is better (closer to the full-sampling
# image), -1 lower is better.
FIDELITY_DIRECTIONS: dict[str, int] = {"psnr": 1, "ssim": 1, "rmse": -1, "feature_distance": -1, "clip_drift": -1}
# Robustness (notebook 04).
ROBUSTNESS = "robustness.csv"
DROPS = "drops.csv"
CRITERION = "criterion.csv"
STRESS_FIDELITY = "stress_fidelity.csv"  # per image: caching fidelity vs full under each stress
STRESS_FIDELITY_SUMMARY = "stress_fidelity_summary.csv"
STRESS_DID = "stress_did.csv"  # criterion c as a difference in differences (the study's report)
# Mechanistic regression (notebook 05).
VARIANCE = "variance.csv"
VARIANCE_REDUCTION = "variance_reduction.csv"
QUALITY_DROPS = "quality_drops.csv"
REGRESSION_POINTS = "regression_points.csv"
REGRESSION_FITS = "regression.csv"
REGRESSION = "regression.json"
# Encoder drift along the sampled trajectories against the per-image caching error (notebook 05).
TRAJECTORY_POINTS = "trajectory_points.csv"
TRAJECTORY_REGRESSION = "trajectory_regression.json"
# The analysis stage (fcr.analysis.run.analyze) writes these into a run's report folder; the report
# (fcr.report) only reads and formats them.
VERDICT = "verdict.csv"  # the success criteria, one row per criterion x scope
EXP1_TABLE = "exp1_table.csv"
EXP2_TABLE = "exp2_table.csv"
SUPPLEMENTARY_ROBUSTNESS = "supplementary_robustness.csv"  # criterion-c rows of notebook-04 runs outside the verdict
ANALYSIS_NOTES = "analysis_notes.json"  # the study's notes and why an experiment table is missing
CONTRASTS = "contrasts.csv"
SAFE_STRIDES = "safe_strides.csv"
REGIME_SAFE_STRIDES = "regime_safe_strides.csv"  # safe strides on the frontier sweep (strides to 25, FD-50ls)
FD_INFINITY = "fd_infinity.csv"  # FD pooled over seeds and extrapolated to n -> infinity
LENGTH_CONTRASTS = "length_contrasts.csv"  # FCR vs control at each fine-tune length
ABLATION_CONTRASTS = "ablation_contrasts.csv"  # FCR ablations (e.g. Δ_max) vs the control
FEW_STEPS_CONTRASTS = "few_steps_contrasts.csv"  # FCR vs control with a few-step sampler (e.g. 25-step DDIM)
FEW_STEPS_SAFE_STRIDES = "few_steps_safe_strides.csv"  # safe strides with that sampler
# The ablation grid (issue #31): its contrasts are rows of CONTRASTS (families "grid: ...").
GRID_SECONDARY = "grid_secondary.csv"  # descriptive secondary endpoints of every arm vs the control
GRID_SELECTIONS = "grid_early_stopping.csv"  # the step each grid fine-tune's early stopping chose
GRID_SENSITIVITY = "grid_sensitivity.csv"  # the grid's contrasts with the best-step weights
STOPPING_RULE = "stopping_rule.csv"  # the seed's stopping rule: each candidate kept or excluded, and why
GRID_FOREST = "grid_forest.png"  # every arm's estimate and CI on one axis (the report draws it)
# Quality-vs-cost frontier (notebook 06): one row per model x configuration, and the matched-cost table.
FRONTIER = "frontier.csv"
# The panels of a frontier figure: how a point's sampler came about (fcr.experiments.frontier.approach).
APPROACHES: tuple[str, ...] = ("training-free", "fine-tuned", "cache-aware", "distilled")
HEADLINE_FRONTIER = "frontier_all_psnr.png"  # the report's figure of every frontier run of one original
FRONTIER_ARMS = "frontier_arms.csv"  # the figure's points: a cache-aware arm's training runs pooled
MATCHED_COST = "matched_cost.csv"

# Files a notebook always writes into its stage folder, in both settings: a stage without them is
# not complete (data preparation writes setting-specific files; its inventory covers them).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "02_finetune": (RUN_PARAMS, TRAIN_CONFIG, TRAIN_LOG, "unet/config.json", "unet/diffusion_pytorch_model.safetensors"),
    "03_stride_sweep": (QUALITY, SUMMARY, COST, COST_TABLE, FIDELITY, FIDELITY_PER_IMAGE),  # paired tests: embedded only
    "04_robustness": (ROBUSTNESS, DROPS, CRITERION),
    "05_mechanistic_regression": (VARIANCE, VARIANCE_REDUCTION),
    "06_baselines_frontier": (FRONTIER, MATCHED_COST),
}

_FINETUNE = "the fine-tune (notebook 02_finetune / python -m fcr train)"
# Which stage writes a file (named in the report's 'missing file' notes).
PRODUCERS: dict[str, str] = {
    SUMMARY: "notebook 03_stride_sweep (fcr.experiments.sweep.summarize)",
    COST: "notebook 03_stride_sweep (fcr.experiments.sweep.run_sweep)",
    COST_TABLE: "notebook 03_stride_sweep (fcr.experiments.sweep.cost_table)",
    PAIRED_TESTS: "notebook 03_stride_sweep (fcr.experiments.sweep.paired_comparison)",
    FIDELITY: "notebook 03_stride_sweep (fcr.experiments.paired_fidelity.fidelity_table)",
    FIDELITY_PER_IMAGE: "notebook 03_stride_sweep (fcr.experiments.paired_fidelity.fidelity_table)",
    CRITERION: "notebook 04_robustness",
    STRESS_FIDELITY: "notebook 04_robustness (fcr.experiments.robustness.fidelity.stress_fidelity_table)",
    VARIANCE_REDUCTION: "notebook 05_mechanistic_regression",
    REGRESSION: "notebook 05_mechanistic_regression",
    TRAJECTORY_REGRESSION: "notebook 05_mechanistic_regression (trajectory_seeds)",
    FRONTIER: "notebook 06_baselines_frontier (fcr.experiments.frontier.frontier_from_sweep)",
    MATCHED_COST: "notebook 06_baselines_frontier (fcr.experiments.frontier.matched_cost)",
    VERDICT: "the analysis stage (fcr.analysis.run.analyze; python -m fcr.pipeline report)",
    CONTRASTS: "the analysis stage (fcr.analysis.run.analyze; python -m fcr.pipeline report)",
    ANALYSIS_NOTES: "the analysis stage (fcr.analysis.run.analyze; python -m fcr.pipeline report)",
    TRAIN_CONFIG: _FINETUNE,
    VALIDATION_LOG: _FINETUNE + " with validate_every > 0",
    EARLY_STOPPING: _FINETUNE + " with validate_every > 0",
    RUN_PARAMS: _FINETUNE,
}

# Logical column -> its spelling, per table; the quality metrics have one spelling per setting
# (embedded, SD), the only case where a logical column has two.
COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "summary": {
        "model": ("model",),
        "config": ("config",),
        "fd": ("fd_fashioncnn", "fid"),
        "accuracy": ("class_accuracy", "clip_score"),
        "architecture": ("architecture",),
    },
    "cost": {
        "architecture": ("architecture",),
        "config": ("config",),
        "peak_memory": ("peak_memory_bytes",),
        "device": ("device",),
    },
    "cost_table": {
        "architecture": ("architecture",),
        "config": ("config",),
        "time_speedup": ("time_speedup_vs_FD-5",),
        "flops_speedup": ("flops_speedup_vs_FD-5",),
        "bound_speedup": ("bound_flops_speedup_vs_FD-5",),
        "time_column": ("time_column",),
    },
    "criterion": {
        "fcr_model": ("model",),
        "original_model": ("original_model",),
        "config": ("config",),
        "stress": ("stress",),
        "metric": ("metric",),
        "drop_fcr": ("drop_fcr",),
        "drop_original": ("drop_original",),
        "passed": ("passed",),
    },
    "variance_reduction": {
        "model": ("model",),
        "original_model": ("original_model",),
        "feature_group": ("feature_group",),
        "units": ("units",),
        "reduction_pct": ("reduction_pct",),
    },
    "regression": {
        "r2": ("r2",),
        "slope": ("slope",),
        "slope_lo": ("slope_lo",),
        "slope_hi": ("slope_hi",),
        "n": ("n",),
    },
}


def model_label(source: str) -> str:
    """The name a model has in result tables: an embedded model name as it is, a run folder or hub
    id by its last part (the sweep, robustness and mechanistic runners and the manifest's backbones);
    a fine-tune's best-step weights (``<run>/unet_best``) as ``<run>@best``, a distillation's round
    (``<run>/round<r>_steps<N>``, :data:`DISTILLATION_FILE`) as ``<run>@round<r>``."""
    path = Path(source)
    if path.name == BEST_UNET and path.parent.name:
        return f"{path.parent.name}@best"
    if ROUND_FOLDER.fullmatch(path.name) and path.parent.name:  # a distillation round
        return f"{path.parent.name}@{path.name.split('_')[0]}"
    return path.name or source
