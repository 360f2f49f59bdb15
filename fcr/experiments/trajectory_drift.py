"""Encoder-feature drift along the sampler's own trajectories: what a uniform stride-``s`` cache
suffers, measured where sampling actually goes instead of on forward-noised training images (the
FCR loss's own inputs, :mod:`fcr.experiments.feature_variance`).

Full sampling runs as cached sampling with every step a key step (the same images mathematically;
the encoder output of every step is observed through the sampler's ``on_encoder``). At step ``j``
the encoder's features ``f_j`` are compared with those of the key step a stride-``s`` cache would
reuse there, ``k = s * floor(j / s)``::

    drift_s = mean over the non-key steps j of d(f_k, f_j)

per image, with ``d`` = :func:`fcr.core.loss.feature_distance` (raw ``abs`` and scale-invariant
``norm``) over a feature group of :func:`fcr.core.unet.feature_group_indices`. Under guidance
the distance is the mean of the image's unconditional and conditional rows (a cache reuses both).
Only the latest key step's features are kept per stride, so memory does not grow with the steps.
Image ``i`` of seed ``k`` starts from the same z_T as in the sweep (:func:`fcr.backends.generate.
initial_noise`), so its drift pairs with the sweep's per-image caching error of that image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fcr.backends.generate import SamplingModel, generate
from fcr.core.unet import EncoderFeatures, feature_group_indices
from fcr.experiments.feature_variance import VARIANTS, per_sample_feature_distance

__all__ = ["DriftRecorder", "TrajectoryDrift", "drift_key", "trajectory_drift"]


def drift_key(stride: int, group: str, variant: str) -> str:
    """Name of one drift series in result files: ``drift_s10_all_norm``."""
    return f"drift_s{stride}_{group}_{variant}"


class DriftRecorder:
    """An ``on_encoder`` observer (via :func:`fcr.backends.generate.generate`'s ``feature_hook``)
    that accumulates each image's drift for every stride, feature group and variant."""

    def __init__(self, n_images: int, strides: Sequence[int], group_indices: Mapping[str, Sequence[int]],
                 guidance: bool) -> None:
        if any(s < 2 for s in strides):
            raise ValueError(f"drift strides must be >= 2 (stride 1 reuses nothing); got {list(strides)}")
        self.strides = tuple(int(s) for s in strides)
        self.group_indices = {g: list(ix) for g, ix in group_indices.items()}
        self.guidance = guidance
        self.sums = {drift_key(s, g, v): np.zeros(n_images) for s in self.strides for g in self.group_indices
                     for v in VARIANTS}
        self.counts = {s: np.zeros(n_images) for s in self.strides}
        self._keys: dict[int, EncoderFeatures] = {}  # stride -> features of its latest key step

    def __call__(self, indices: range, step: int, features: EncoderFeatures) -> None:
        # Step 0 is a key step of every stride, so each batch starts from its own keys.
        features = features.map(lambda x: x.detach().float().cpu())
        rows = np.asarray(indices)
        for s in self.strides:
            if step % s == 0:
                self._keys[s] = features
                continue
            for g, ix in self.group_indices.items():
                for v in VARIANTS:
                    d = per_sample_feature_distance(self._keys[s], features, ix, normalize=v == "norm")
                    if self.guidance:  # rows [uncond; cond]: one value per image
                        d = d.view(2, -1).mean(0)
                    self.sums[drift_key(s, g, v)][rows] += d.double().numpy()
            self.counts[s][rows] += 1

    def result(self) -> dict[str, np.ndarray]:
        """Per-image mean drift of every series (:func:`drift_key`)."""
        out = {}
        for key, total in self.sums.items():
            stride = int(key.split("_")[1][1:])
            if not np.all(self.counts[stride] > 0):
                raise RuntimeError(f"stride {stride}: some images saw no non-key step")
            out[key] = total / self.counts[stride]
        return out


@dataclass
class TrajectoryDrift:
    """Per-image drift series (:func:`drift_key` -> (N,)) and the full-sampling images they come from."""

    drift: dict[str, np.ndarray]
    images: torch.Tensor


def trajectory_drift(
    model: SamplingModel,
    prompts: Any,
    *,
    seed: int,
    strides: Sequence[int],
    groups: Sequence[str] = ("all",),
    scheduler_name: str = "ddim",
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    batch_size: int = 16,
    progress: bool = False,
) -> TrajectoryDrift:
    """Sample ``prompts`` in full (every step a key step) from the seed's z_T and record each image's
    drift at every stride in ``strides`` and feature group in ``groups`` (see the module docstring)."""
    if max(strides) >= num_inference_steps:
        raise ValueError(f"drift strides must be < num_inference_steps={num_inference_steps}; got {list(strides)}")
    recorder = DriftRecorder(len(prompts), strides, {g: feature_group_indices(model.unet, g) for g in groups},
                             guidance=guidance_scale > 1)
    out = generate(model, prompts, seed=seed, scheduler_name=scheduler_name, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, key_steps=list(range(num_inference_steps)), parallel=False,
                   batch_size=batch_size, feature_hook=recorder, progress=progress, desc="trajectory drift")
    return TrajectoryDrift(recorder.result(), out.images)
