"""Sampling under a stress: a stress is the generation loop's two hooks
(:func:`fcr.backends.generate.generate`), the same for the embedded setting and SD.

The adversarial stress replaces each batch's z_T with the PGD attack of
:func:`fcr.experiments.robustness.attack.adversarial_noise`; the perturbed-schedule stress replaces
each batch's scheduler with :func:`fcr.experiments.robustness.stresses.perturbed_scheduler` seeded
by ``(seed, batch)`` (so perturbed images depend on the batch size). Resolution and prompt stresses
need no hook: they are the loop's ``image_size`` and the prompt set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fcr.backends.generate import Batch, NoiseHook, SchedulerHook
from fcr.core.configurations import SamplingConfig
from fcr.experiments.robustness.attack import ATTACK_CHUNK, adversarial_noise
from fcr.experiments.robustness.stresses import Stress, perturbed_scheduler, schedule_seed

__all__ = ["AttackCache", "StressHooks"]

# The attacked z_T of one (model, prompt set, seed), by batch and attack settings.
AttackCache = dict[tuple[Any, ...], tuple[torch.Tensor, Mapping[str, float]]]


class StressHooks:
    """The hooks of one stressed generation (one model x configuration x stress x seed).

    ``attack`` = ``{"stride", "epsilon", "steps"}`` (adversarial stress), ``chunk_size`` images per
    attack chunk (memory of the backward pass). The attack does not depend on the key steps, so
    configurations attacked with the same stride share it through ``attack_cache`` (a dict owned by
    the caller for one model, prompt set and seed); ``batches_reused`` counts the batches taken from it.
    """

    def __init__(
        self,
        stress: Stress,
        config: SamplingConfig,
        *,
        seed: int,
        batch_size: int,
        attack: Mapping[str, Any] | None = None,
        attack_cache: AttackCache | None = None,
        chunk_size: int = ATTACK_CHUNK,
    ) -> None:
        if stress.adversarial and attack is None:
            raise ValueError("the adversarial stress needs attack = {'stride', 'epsilon', 'steps'}")
        self.stress = stress
        self.config = config
        self.seed = seed
        self.batch_size = batch_size
        self.attack = dict(attack or {})
        self.attack_cache = attack_cache
        self.chunk_size = chunk_size
        self.batches_reused = 0

    @property
    def noise_hook(self) -> NoiseHook | None:
        return self._attacked if self.stress.adversarial else None

    @property
    def scheduler_hook(self) -> SchedulerHook | None:
        return self._perturbed if self.stress.schedule_noise_std is not None else None

    def _perturbed(self, batch_index: int, scheduler: Any) -> Any:
        std = float(self.stress.schedule_noise_std)
        return perturbed_scheduler(scheduler, std, schedule_seed(self.seed, batch_index))

    def _attacked(self, batch: Batch) -> tuple[torch.Tensor, Mapping[str, float]]:
        key = (batch.index, self.batch_size, self.config.scheduler, self.config.num_inference_steps,
               tuple(batch.noise.shape[1:]), *sorted((k, str(v)) for k, v in self.attack.items()))
        cached = self.attack_cache.get(key) if self.attack_cache is not None else None
        if cached is not None:
            self.batches_reused += 1
            return cached
        attacked = adversarial_noise(
            batch.unet, batch.make_scheduler, batch.noise, batch.cond, batch.uncond,
            guidance_scale=batch.guidance_scale, num_inference_steps=batch.num_inference_steps,
            stride=int(self.attack["stride"]), epsilon=float(self.attack["epsilon"]), steps=int(self.attack["steps"]),
            chunk_size=self.chunk_size,
        )
        if self.attack_cache is not None:
            self.attack_cache[key] = attacked
        return attacked
