"""The one generation loop of both settings: paired prompt/noise sets sampled in batches.

A setting plugs in through :class:`SamplingModel` (the embedded adapter
:class:`fcr.backends.embedded.model.EmbeddedModel`, SD's :class:`fcr.backends.sd.model.SDComponents`): how
prompts become text states, the latent shape, the sampling schedulers and what the final latents
become. Image ``i`` starts from noise seeded by ``(seed, i)`` (:func:`initial_noise`), so an image
never depends on the batch size and every configuration of a sweep or stress test samples the
SAME prompts from the SAME z_T: differences between configurations are paired comparisons.

Stresses inject themselves the way diffusers' ``latents=`` does, through two hooks: one that may
replace a batch's z_T (the adversarial attack) and one that may replace a batch's scheduler (the
perturbed noise schedule).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from diffusers import LCMScheduler
from tqdm.auto import tqdm

from fcr.core.sampler import PriorNoise, SamplerStats, build_scheduler, sample
from fcr.core.tgate import TGateSettings, tgate_sample
from fcr.core.token_merging import TokenMergeSettings, token_merging

if TYPE_CHECKING:  # passed through to the sampler
    from fcr.core.scale_shift import CacheScaleShift

__all__ = [
    "step_generators",
    "Batch",
    "GenerationResult",
    "FeatureHook",
    "NoiseHook",
    "SamplingModel",
    "SchedulerHook",
    "generate",
    "initial_noise",
    "sampling_scheduler",
]


class SamplingModel(Protocol):
    """A loaded model of a setting, as :func:`generate` sees it."""

    unet: torch.nn.Module
    noise_scheduler: Any  # the training noise schedule

    @property
    def native_resolution(self) -> int:
        """The image side the UNet was trained at, in pixels."""

    def make_scheduler(self, name: str) -> Any:
        """A fresh sampling scheduler ``name`` on the model's training noise schedule."""

    def latent_shape(self, image_size: tuple[int, int] | None) -> tuple[int, int, int]:
        """(C, h, w) of z_T for images of ``image_size`` = (height, width) pixels (None: the native size)."""

    def condition(
        self, prompts: Any, start: int, stop: int, guidance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text states of ``prompts[start:stop]`` and, with ``guidance``, the empty prompt's (on the UNet's device)."""

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """One batch's final latents as the loop returns them (e.g. clamped pixels on the CPU)."""


def initial_noise(indices: range | Sequence[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """z_T for images ``indices``: one CPU generator per image, so image i never depends on batching."""
    out = []
    for i in indices:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
        out.append(torch.randn(shape, generator=gen))
    return torch.stack(out)


def step_generators(scheduler: Any, indices: range | Sequence[int], seed: int) -> list[torch.Generator] | None:
    """One generator per image for a scheduler that draws noise in its steps (LCM's multi-step sampler),
    seeded by ``(seed, i)`` like z_T, so image i never depends on batching; None for the deterministic
    ones (DDIM at eta 0, DPM-Solver++, Euler without churn), which are left exactly as they were."""
    if not isinstance(scheduler, LCMScheduler):
        return None
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i, 0x57E9]).generate_state(1)[0]))
            for i in indices]


def sampling_scheduler(name: str, noise_scheduler: Any):
    """A sampling scheduler on the training noise schedule, configured as SD's pipelines are."""
    return build_scheduler(name, **{**dict(noise_scheduler.config), "set_alpha_to_one": False})


@dataclass
class Batch:
    """What a hook sees of one batch: its position, z_T, text states and how to sample it."""

    index: int
    indices: range
    noise: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None
    unet: torch.nn.Module
    make_scheduler: Callable[[], Any]
    guidance_scale: float
    num_inference_steps: int


# Replaces a batch's z_T; returns the new noise and per-batch numbers averaged over images.
NoiseHook = Callable[[Batch], tuple[torch.Tensor, Mapping[str, float]]]
# Replaces a batch's scheduler: (batch index, scheduler) -> scheduler.
SchedulerHook = Callable[[int, Any], Any]
# Sees every encoder output of cached sampling: (batch's image indices, step index, features).
FeatureHook = Callable[[range, int, Any], None]


@dataclass
class GenerationResult:
    """The finished batches (see :meth:`SamplingModel.finish`) and the sampler's pass counters
    summed over batches (lists concatenated), plus the noise hook's numbers averaged over images
    and ``sampling_runs`` (batches)."""

    images: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


def _add_stats(total: dict[str, Any], stats: SamplerStats) -> None:
    for key, value in stats.as_dict().items():
        if isinstance(value, list):
            total.setdefault(key, []).extend(value)
        else:
            total[key] = total.get(key, 0) + value


def generate(
    model: SamplingModel,
    prompts: Any,
    *,
    seed: int,
    scheduler_name: str = "ddim",
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    key_steps: Sequence[int] | None = None,
    parallel: bool = True,
    prior_noise: PriorNoise | None = None,
    batch_size: int = 100,
    image_size: int | tuple[int, int] | None = None,
    noise_hook: NoiseHook | None = None,
    scheduler_hook: SchedulerHook | None = None,
    feature_hook: FeatureHook | None = None,
    deep_cache_branch: int | None = None,
    token_merge: float | TokenMergeSettings | None = None,
    tgate: TGateSettings | None = None,
    first_index: int = 0,
    progress: bool = False,
    desc: str = "generate",
    cache_correction: CacheScaleShift | None = None,
) -> GenerationResult:
    """Sample one image per prompt (plain when ``key_steps`` is None, else encoder-cached).

    ``prompts``: whatever ``model.condition`` reads (a :class:`fcr.backends.embedded.model.PromptSet`,
    a list of strings for SD), with ``len``. Classifier-free guidance when ``guidance_scale > 1``.
    ``image_size``: output side or (height, width) in pixels (the model's native size when None). ``noise_hook`` and
    ``scheduler_hook`` apply a stress to each batch (see the module docstring); ``feature_hook``
    observes the encoder's features of cached sampling (:func:`fcr.core.sampler.sample`'s ``on_encoder``);
    ``deep_cache_branch``: DeepCache at ``key_steps`` instead of encoder caching (see ``sample``).
    ``token_merge``: Token Merging (a ratio: the paper's defaults; :mod:`fcr.core.token_merging`),
    its random destinations drawn from a generator seeded by ``seed`` and the batch's first index.
    ``tgate``: T-GATE (:func:`fcr.core.tgate.tgate_sample`; plain sampling with guidance only).
    ``first_index``: the index of ``prompts[0]`` in a larger set (a shard of it): image ``j`` here is
    image ``first_index + j`` there, noise and hooks' indices included. ``cache_correction``: a
    cache-aware fine-tune's scale-shift for its cached sampler (see ``sample``).
    """
    if tgate is not None and (key_steps is not None or deep_cache_branch is not None or noise_hook is not None
                              or feature_hook is not None or (prior_noise is not None and prior_noise.enabled)):
        raise ValueError("T-GATE runs plain sampling: no key_steps, DeepCache, prior noise or noise/feature hooks")
    if isinstance(prompts, str):
        raise TypeError("generate takes a sequence of prompts, not a single string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    unet = model.unet
    device, dtype = unet.device, unet.dtype
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    shape = model.latent_shape(image_size)
    guidance = guidance_scale > 1
    chunks, stats, infos = [], {}, []
    batches = range(0, len(prompts), batch_size)
    for b, start in enumerate(tqdm(batches, disable=not progress, desc=desc)):
        stop = min(start + batch_size, len(prompts))
        idx = range(first_index + start, first_index + stop)
        noise = initial_noise(idx, shape, seed).to(device=device, dtype=dtype)
        cond, uncond = model.condition(prompts, start, stop, guidance)

        def make_scheduler(name: str = scheduler_name) -> Any:
            return model.make_scheduler(name)

        if noise_hook is not None:
            noise, info = noise_hook(Batch(b, idx, noise, cond, uncond, unet, make_scheduler, guidance_scale,
                                           num_inference_steps))
            infos.append((len(idx), info))
        scheduler = make_scheduler()
        if scheduler_hook is not None:
            scheduler = scheduler_hook(b, scheduler)
        tome = TokenMergeSettings(token_merge) if isinstance(token_merge, (int, float)) else token_merge
        merging = token_merging(unet, tome, tuple(noise.shape[-2:]),
                                torch.Generator().manual_seed(int(seed) * 1_000_003 + idx.start))
        with merging:
            out = tgate_sample(
                unet, scheduler, noise, cond, uncond_hidden_states=uncond, guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps, settings=tgate,
            ) if tgate is not None else sample(
                unet, scheduler, noise, cond,
                uncond_hidden_states=uncond,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                key_steps=None if key_steps is None else list(key_steps),
                parallel=parallel,
                prior_noise=prior_noise,
                on_encoder=None if feature_hook is None else (lambda step, f, idx=idx: feature_hook(idx, step, f)),
                deep_cache_branch=deep_cache_branch,
                cache_correction=cache_correction,
                generator=step_generators(scheduler, idx, seed),
            )
        chunks.append(model.finish(out.latents))
        _add_stats(stats, out.stats)
    infos = [(n, info) for n, info in infos if info]
    if infos:
        total = sum(n for n, _ in infos)
        for key in infos[0][1]:
            stats[key] = sum(n * info[key] for n, info in infos) / total
    stats["sampling_runs"] = len(batches)
    images = torch.cat(chunks) if chunks else torch.empty(0, *shape)
    return GenerationResult(images, stats)
