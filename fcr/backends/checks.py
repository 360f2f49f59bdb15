"""Checks of validated parameters that depend on the setting and on the task a notebook or CLI
runs: everything that can be known before any work (paths, resolutions, stresses) fails here, with
one message naming the key, before anything is written."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fcr.config import TASKS, ConfigError
from fcr.backends.sd.params import check_sd_params

__all__ = ["check_task"]


def check_task(params: Mapping[str, Any], task: str) -> None:
    """Checks of validated ``params`` that depend on the setting and on what ``task`` (one of
    :data:`TASKS`) will do with them: data paths that must be set and exist, resolutions, stresses.
    Raises :class:`ConfigError` naming the key, before any work or output."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed {list(TASKS)}")
    if task == "robustness" and "high_resolution" in params["stresses"] and params["stress_resolution"] <= params["resolution"]:
        raise ConfigError(
            f"parameter 'stress_resolution': the high-resolution stress needs a side above resolution="
            f"{params['resolution']}, got {params['stress_resolution']}"
        )
    if task == "mechanistic" and params["trajectory_seeds"]:
        if max(params["trajectory_strides"]) >= params["num_inference_steps"]:
            raise ConfigError(f"parameter 'trajectory_strides': each must be < num_inference_steps="
                              f"{params['num_inference_steps']}, got {params['trajectory_strides']}")
        if params["trajectory_images"] > params["num_eval_images"]:
            raise ConfigError(f"parameter 'trajectory_images': at most the sweep's num_eval_images="
                              f"{params['num_eval_images']}, got {params['trajectory_images']}")
        if not any(Path(p).name == "quality.csv" for p in params["quality_tables"]):
            raise ConfigError("parameter 'trajectory_seeds': the trajectory drift pairs with a sweep; quality_tables "
                              "must name the sweep's quality.csv")
    if task == "human" and params["human_a"] == params["human_b"]:
        raise ConfigError(f"parameter 'human_b': the two sides of a pair must differ, both are {params['human_a']!r}")
    if task == "frontier":
        if params["frontier_cost"].startswith("time_per_image_s_bs"):
            batch = int(params["frontier_cost"].rsplit("bs", 1)[1])
            if batch not in params["profile_batches"]:
                raise ConfigError(f"parameter 'frontier_cost': {params['frontier_cost']} needs batch {batch} in "
                                  f"profile_batches={params['profile_batches']}")
    if params["setting"] == "sd":
        check_sd_params(params, task)
