"""Checks of validated parameters that depend on the setting and on the task a notebook or CLI
runs: everything that can be known before any work (paths, resolutions, stresses) fails here, with
one message naming the key, before anything is written."""

from __future__ import annotations

from pathlib import Path

from fcr.backends.sd.params import check_sd_params
from fcr.config import SETTING_TASKS, TASKS, ConfigError
from fcr.options import Options

__all__ = ["check_task"]


def check_task(opts: Options, task: str) -> None:
    """Checks of validated ``opts`` that depend on the setting and on what ``task`` (one of
    :data:`TASKS`) will do with them: data paths that must be set and exist, resolutions, stresses.
    Raises :class:`ConfigError` naming the key, before any work or output."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed {list(TASKS)}")
    if task == "robustness" and "high_resolution" in opts.robustness.stresses and opts.robustness.stress_resolution <= opts.backbone.resolution:
        raise ConfigError(
            f"parameter 'stress_resolution': the high-resolution stress needs a side above resolution="
            f"{opts.backbone.resolution}, got {opts.robustness.stress_resolution}"
        )
    if task == "mechanistic" and opts.mechanistic.trajectory_seeds:
        if max(opts.mechanistic.trajectory_strides) >= opts.sampling.num_inference_steps:
            raise ConfigError(f"parameter 'trajectory_strides': each must be < num_inference_steps="
                              f"{opts.sampling.num_inference_steps}, got {opts.mechanistic.trajectory_strides}")
        if opts.mechanistic.trajectory_images > opts.evaluation.num_eval_images:
            raise ConfigError(f"parameter 'trajectory_images': at most the sweep's num_eval_images="
                              f"{opts.evaluation.num_eval_images}, got {opts.mechanistic.trajectory_images}")
        if not any(Path(p).name == "quality.csv" for p in opts.mechanistic.quality_tables):
            raise ConfigError("parameter 'trajectory_seeds': the trajectory drift pairs with a sweep; quality_tables "
                              "must name the sweep's quality.csv")
    if task == "human" and opts.human.human_a == opts.human.human_b:
        raise ConfigError(f"parameter 'human_b': the two sides of a pair must differ, both are {opts.human.human_a!r}")
    if task == "frontier":
        if opts.frontier.frontier_cost.startswith("time_per_image_s_bs"):
            batch = int(opts.frontier.frontier_cost.rsplit("bs", 1)[1])
            if batch not in opts.evaluation.profile_batches:
                raise ConfigError(f"parameter 'frontier_cost': {opts.frontier.frontier_cost} needs batch {batch} in "
                                  f"profile_batches={opts.evaluation.profile_batches}")
    if task not in SETTING_TASKS[opts.run.setting]:
        raise ConfigError(f"parameter 'setting': the {opts.run.setting} setting has no {task!r} task "
                          f"(it has {list(SETTING_TASKS[opts.run.setting])})")
    if opts.run.setting == "sd":
        check_sd_params(opts, task)
