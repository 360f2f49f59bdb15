"""Sampling loops: plain sampling and Faster-Diffusion-style encoder caching (Li et al., 2312.09608).

At a *key step* the encoder runs on the current latent and its features are cached; at every step
(key or not) the decoder runs on the cached features with the time embedding of that step, so a
non-key step never looks at its own latent. With ``parallel=True`` the decoders of a key step and
of the non-key steps that follow it run as one batched call; the scheduler steps are then applied
one after the other. Optional *prior noise injection* adds a small multiple of the initial noise
before late scheduler steps. Nothing here is specific to Stable Diffusion or to pixel space: any
latent shape the UNet accepts works.

Step indices count into ``scheduler.timesteps`` (index 0 = noisiest step).
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from numbers import Integral
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fcr.core.unet import EncoderFeatures, decode, deep_branch, deep_forward, encode, shallow_forward
from fcr.core.video_unet import check_latents

if TYPE_CHECKING:  # only a type here: the sampler calls its methods
    from fcr.core.scale_shift import CacheScaleShift

__all__ = [
    "FD_50LS",
    "SCHEDULERS",
    "PriorNoise",
    "SampleOutput",
    "SamplerStats",
    "apply_guidance",
    "build_scheduler",
    "guidance_context",
    "key_steps",
    "repeat_per_sample",
    "sample",
]

# Faster Diffusion's non-uniform key steps for 50 DDIM steps ("50ls" in the reference code).
FD_50LS: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 15, 25, 35)

SCHEDULERS: tuple[str, ...] = ("ddim", "dpmsolver++", "euler", "lcm")


# --------------------------------------------------------------------------------------------
# Key steps
# --------------------------------------------------------------------------------------------


def _validate_key_steps(num_inference_steps: int, steps: Sequence[int]) -> list[int]:
    """Check an explicit key-step list; raise ValueError saying what is wrong."""
    steps = list(steps)
    if not steps:
        raise ValueError("key steps must not be empty (step 0 must be a key step)")
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, Integral)]
    if bad:
        raise ValueError(f"key steps must be integers; got non-integer value(s) {bad!r}")
    steps = [int(s) for s in steps]
    dupes = sorted({s for s in steps if steps.count(s) > 1})
    if dupes:
        raise ValueError(f"key steps must be unique; duplicated: {dupes}")
    if steps != sorted(steps):
        raise ValueError(f"key steps must be sorted in increasing order; got {steps}")
    out_of_range = [s for s in steps if not 0 <= s < num_inference_steps]
    if out_of_range:
        raise ValueError(
            f"key steps must lie in [0, {num_inference_steps}) for {num_inference_steps} inference steps; "
            f"out of range: {out_of_range}"
        )
    if steps[0] != 0:
        # Without a key step at 0 there are no cached features for the first decoder call.
        raise ValueError(f"key steps must start with 0 (the first step needs encoder features); got {steps}")
    return steps


def key_steps(num_inference_steps: int, schedule: str | Sequence[int] = "uniform", stride: int = 1) -> list[int]:
    """Indices into ``scheduler.timesteps`` at which the encoder runs.

    - ``"uniform"``: every ``stride``-th step, ``range(0, n, stride)`` (stride 1 = every step).
    - ``"50ls"``: Faster Diffusion's preset :data:`FD_50LS` for ``n == 50``. For other ``n`` each
      index ``i`` becomes ``floor(i * n / 50 + 0.5)`` (round half up), indices ``>= n`` are dropped
      and duplicates removed, so the result is sorted, unique and starts at 0.
    - a sequence of ints: validated (integers, strictly increasing, within ``[0, n)``, starting at 0).

    ``stride`` is used by ``"uniform"`` only but must be >= 1 in every case.
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, Integral):
        raise ValueError(f"num_inference_steps must be an integer; got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1; got {num_inference_steps}")
    if isinstance(stride, bool) or not isinstance(stride, Integral) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1; got {stride!r}")
    n = int(num_inference_steps)
    if isinstance(schedule, str):
        if schedule == "uniform":
            return list(range(0, n, int(stride)))
        if schedule == "50ls":
            scaled = {math.floor(i * n / 50 + 0.5) for i in FD_50LS}
            return sorted(s for s in scaled if s < n)
        raise ValueError(f"unknown key-step schedule {schedule!r}; allowed: 'uniform', '50ls' or a list of ints")
    return _validate_key_steps(n, schedule)


# --------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------


def build_scheduler(name: str, **config: Any) -> SchedulerMixin:
    """A diffusers scheduler of family ``name`` (one of :data:`SCHEDULERS`) from a scheduler config.

    ``config`` may be a Stable Diffusion repo's ``scheduler_config.json`` contents (keys another
    family does not know are ignored by diffusers with a warning). ``"ddim"`` is deterministic
    (``sample`` steps it with eta 0); ``"dpmsolver++"`` forces ``algorithm_type="dpmsolver++"``;
    ``"lcm"`` (a consistency student's sampler) re-noises between steps from ``sample``'s generator.
    """
    config = dict(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpmsolver++":
        algorithm = config.pop("algorithm_type", "dpmsolver++")
        if algorithm != "dpmsolver++":
            raise ValueError(f"'dpmsolver++' scheduler requested but config has algorithm_type={algorithm!r}")
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "lcm":  # a consistency-distilled student's multi-step sampler (noise drawn from the step's generator)
        return LCMScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}; allowed: {list(SCHEDULERS)}")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


@dataclass
class PriorNoise:
    """Faster Diffusion's prior noise injection: before a scheduler step at timestep ``t`` with
    ``t / num_train_timesteps < threshold``, add ``alpha * z_T`` (``z_T`` = the unit-variance
    initial noise passed to :func:`sample`) to the latents."""

    enabled: bool = False
    alpha: float = 0.003
    threshold: float = 0.5


@dataclass
class SamplerStats:
    """Network-call counters of one :func:`sample` call.

    ``unet_passes``: full UNet passes (plain sampling, DeepCache's key steps); ``shallow_passes``:
    DeepCache's shallow-path passes; ``encoder_passes``: encoder
    calls; ``decoder_passes``: decoder calls (a batched call counts once); ``decoder_steps``:
    step predictions produced by decoders; ``decoder_batch_sizes``: tensor batch size per decoder call.
    """

    unet_passes: int = 0
    shallow_passes: int = 0
    encoder_passes: int = 0
    decoder_passes: int = 0
    decoder_steps: int = 0
    decoder_batch_sizes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain-Python copy (for JSON logs)."""
        return asdict(self)


@dataclass
class SampleOutput:
    """Final latents (before any VAE decoding) and the call counters."""

    latents: torch.Tensor
    stats: SamplerStats


def _expand_batch(hidden: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    # A single conditioning row (e.g. one empty prompt) is broadcast to the whole batch.
    if hidden.shape[0] == batch:
        return hidden
    if hidden.shape[0] == 1:
        return hidden.expand(batch, *hidden.shape[1:])
    raise ValueError(f"{name} has batch size {hidden.shape[0]}, expected {batch} (or 1)")


def guidance_context(
    cond: torch.Tensor, uncond: torch.Tensor | None, batch: int, guidance_scale: float
) -> torch.Tensor:
    """The UNet's conditioning for ``batch`` latents: ``[uncond; cond]`` under classifier-free
    guidance (``uncond`` given and ``guidance_scale > 1``), else ``cond``; a single row is broadcast."""
    cond = _expand_batch(cond, batch, "encoder_hidden_states")
    if uncond is None or guidance_scale <= 1:
        return cond
    return torch.cat([_expand_batch(uncond, batch, "uncond_hidden_states"), cond])


def apply_guidance(pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance of a ``[uncond; cond]`` prediction batch."""
    pred_uncond, pred_cond = pred.chunk(2)
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def repeat_per_sample(value: Any, times: int, batch: int) -> Any:
    """``value`` repeated ``times`` along dim 0 when it is a per-sample tensor of the UNet batch
    (e.g. a mask or ``timestep_cond``), for a batched decoder call; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.repeat(times, *([1] * (value.ndim - 1)))
    return value


def _repeat_kwargs(kwargs: dict[str, Any], times: int, batch: int) -> dict[str, Any]:
    """Repeat per-sample tensors of the UNet keyword arguments for a batched decoder call."""
    if times == 1:
        return kwargs
    return {key: repeat_per_sample(value, times, batch) for key, value in kwargs.items()}


def _step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | list[torch.Generator] | None) -> dict[str, Any]:
    # DDIM/DPM/Euler accept a generator (only stochastic variants use it); others may not.
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if generator is not None and "generator" in params:
        kwargs["generator"] = generator
    if "eta" in params:
        kwargs["eta"] = 0.0  # deterministic DDIM
    return kwargs


def sample(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    uncond_hidden_states: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 50,
    key_steps: Sequence[int] | None = None,
    parallel: bool = True,
    prior_noise: PriorNoise | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = False,
    unet_kwargs: dict[str, Any] | None = None,
    on_encoder: Callable[[int, EncoderFeatures], None] | None = None,
    deep_cache_branch: int | None = None,
    on_latents: Callable[[int, torch.Tensor], None] | None = None,
    channel_condition: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    cache_correction: CacheScaleShift | None = None,
) -> SampleOutput:
    """Denoise ``noise`` (z_T, unit variance, any latent shape) with ``scheduler``.

    ``key_steps=None``: plain sampling, the full UNet at every step. A sequence: cached sampling,
    the encoder runs at those step indices (validated as in :func:`key_steps`; ``[0..n-1]`` is
    mathematically plain sampling) and the decoder at every step; ``parallel`` batches the decoders
    between two key steps into one call. Classifier-free guidance is used when
    ``uncond_hidden_states`` is given and ``guidance_scale > 1`` (the batch is ``[uncond; cond]``).
    ``scheduler`` is reset with ``set_timesteps`` and mutated. ``unet_kwargs`` go to
    ``unet``/``encode``/``decode``; per-sample tensors in it must match the UNet batch (``2B``
    under guidance) and are repeated for batched decoder calls. ``on_encoder(step, features)`` sees
    every encoder output of cached sampling (batch ``[uncond; cond]`` under guidance) before it is
    decoded: with ``key_steps=range(n)`` that is the encoder along the full-sampling trajectory.
    ``deep_cache_branch``: DeepCache instead of encoder caching (DeepCacheSDHelper's
    ``cache_branch_id``): the full UNet at the key steps, keeping the deep hidden state at that skip
    branch (:func:`fcr.core.unet.deep_forward`), and only the shallow path at the other steps
    (:func:`fcr.core.unet.shallow_forward`); ``parallel`` does not apply.
    ``channel_condition``: channels concatenated to the scaled latents at every network call, as
    diffusers' in-painting (mask + masked-image latents) and depth-to-image (depth map) pipelines
    do; batch ``B`` (or 1), doubled under guidance like the latents. The scheduler never sees them.
    ``image_latents``: image-to-image (depth-to-image) as diffusers runs it: only the last
    ``int(n * strength)`` steps run, from ``image_latents`` noised with ``noise`` to the first of
    them; ``key_steps`` then count from that first step run.
    ``cache_correction``: Block Caching's learned scale-shift (:mod:`fcr.core.scale_shift`) applied to
    the reused tensors at every cached step; it must belong to this sampler (steps, cache kind).
    """
    steps_run = num_inference_steps
    if image_latents is not None:
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1]; got {strength}")
        steps_run = min(int(num_inference_steps * strength), num_inference_steps)
        if steps_run < 1:
            raise ValueError(f"strength {strength} runs no step of {num_inference_steps}")
    elif strength != 1.0:
        raise ValueError("strength < 1 needs image_latents (the image to start from)")
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1; got {guidance_scale}")
    do_cfg = uncond_hidden_states is not None and guidance_scale > 1
    if guidance_scale > 1 and uncond_hidden_states is None:
        raise ValueError("guidance_scale > 1 needs uncond_hidden_states (classifier-free guidance)")
    prior_noise = prior_noise if prior_noise is not None else PriorNoise()
    unet_kwargs = dict(unet_kwargs or {})
    keys = None if key_steps is None else _validate_key_steps(steps_run, key_steps)
    if deep_cache_branch is not None and keys is None:
        raise ValueError("deep_cache_branch needs key_steps (the steps that run the full UNet)")
    branch = None if deep_cache_branch is None else deep_branch(unet, deep_cache_branch)
    if cache_correction is not None and (keys is None or cache_correction.deep_branch != deep_cache_branch
                                         or cache_correction.num_inference_steps != steps_run):
        raise ValueError(f"cache_correction belongs to {cache_correction.configuration} with "
                         f"{cache_correction.num_inference_steps} steps; this call samples "
                         f"{'without a cache' if keys is None else f'deep_cache_branch={deep_cache_branch}'} "
                         f"over {steps_run} steps")

    check_latents(unet, noise)
    batch = noise.shape[0]
    context = guidance_context(encoder_hidden_states, uncond_hidden_states, batch, guidance_scale)
    net_batch = context.shape[0]
    extra = None
    if channel_condition is not None:
        if channel_condition.ndim != noise.ndim or channel_condition.shape[2:] != noise.shape[2:]:
            raise ValueError(f"channel_condition has shape {tuple(channel_condition.shape)}; it must match the "
                             f"latents {tuple(noise.shape)} in every dimension but batch and channels")
        extra = _expand_batch(channel_condition.to(noise.dtype), batch, "channel_condition")
        extra = torch.cat([extra, extra]) if do_cfg else extra

    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    first = num_inference_steps - steps_run
    timesteps = scheduler.timesteps[first:]  # every scheduler here is first order: one timestep per step
    if first and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first)
    num_train = scheduler.config.num_train_timesteps
    step_kwargs = _step_kwargs(scheduler, generator)
    stats = SamplerStats()
    step_index = itertools.count()  # steps run in order: the count is the step's index

    def net_input(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Called exactly once per step: Euler-type schedulers scale by sigma and track state here.
        doubled = torch.cat([latents, latents]) if do_cfg else latents
        scaled = scheduler.scale_model_input(doubled, t)
        return scaled if extra is None else torch.cat([scaled, extra], dim=1)

    def scheduler_step(pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if on_latents is not None:
            on_latents(next(step_index), latents)
        if prior_noise.enabled and float(t) / num_train < prior_noise.threshold:
            latents = latents + prior_noise.alpha * noise
        guided = apply_guidance(pred, guidance_scale) if do_cfg else pred
        return scheduler.step(guided, t, latents, **step_kwargs, return_dict=False)[0]

    def run_decoder(features: EncoderFeatures, ts: torch.Tensor, first: int, key: int) -> list[torch.Tensor]:
        """Decode ``features`` (of key step ``key``) for each timestep in ``ts`` (steps ``first, first
        + 1, ...``) as one batched call."""
        k = len(ts)
        if cache_correction is not None:
            feats = EncoderFeatures.cat([features if i == key else cache_correction.correct_features(features, i)
                                         for i in range(first, first + k)])
        else:
            feats = features if k == 1 else features.map(lambda x: x.repeat(k, *([1] * (x.ndim - 1))))
        t_batch = ts.repeat_interleave(net_batch)
        ctx = context.repeat(k, *([1] * (context.ndim - 1)))
        out = decode(unet, feats, t_batch, ctx, **_repeat_kwargs(unet_kwargs, k, net_batch))
        stats.decoder_passes += 1
        stats.decoder_steps += k
        stats.decoder_batch_sizes.append(out.shape[0])
        return list(out.chunk(k))

    if image_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents.to(noise.dtype), noise, timesteps[:1].repeat(batch))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps_run, desc="sampling")

    with torch.no_grad():
        if branch is not None:
            is_key, deep = set(keys), None
            for i, t in enumerate(timesteps):
                x = net_input(latents, t)
                if i in is_key:
                    pred, deep = deep_forward(unet, x, t, context, branch, **unet_kwargs)
                    stats.unet_passes += 1
                else:
                    reused = deep if cache_correction is None else cache_correction.correct_deep(deep, i)
                    pred = shallow_forward(unet, x, t, context, reused, branch, **unet_kwargs)
                    stats.shallow_passes += 1
                latents = scheduler_step(pred, t, latents)
                if bar is not None:
                    bar.update(1)
        elif keys is None:
            for t in timesteps:
                pred = unet(net_input(latents, t), t, context, **unet_kwargs).sample
                stats.unet_passes += 1
                latents = scheduler_step(pred, t, latents)
                if bar is not None:
                    bar.update(1)
        else:
            bounds = [*keys, steps_run]
            for start, stop in zip(bounds[:-1], bounds[1:]):
                features = encode(unet, net_input(latents, timesteps[start]), timesteps[start], context, **unet_kwargs)
                stats.encoder_passes += 1
                if on_encoder is not None:
                    on_encoder(start, features)
                if parallel:
                    preds = run_decoder(features, timesteps[start:stop], start, start)
                for offset, i in enumerate(range(start, stop)):
                    t = timesteps[i]
                    if i != start:
                        net_input(latents, t)  # scheduler state only; the decoder never sees this latent
                    pred = preds[offset] if parallel else run_decoder(features, timesteps[i : i + 1], i, start)[0]
                    latents = scheduler_step(pred, t, latents)
                    if bar is not None:
                        bar.update(1)
    if on_latents is not None:
        on_latents(steps_run, latents)
    if bar is not None:
        bar.close()
    return SampleOutput(latents=latents, stats=stats)
