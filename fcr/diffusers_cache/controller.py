"""The encoder cache's controller: follows a diffusers pipeline's step loop, runs the encoder at key
steps and only the decoder between them (the public API is :mod:`fcr.diffusers_cache`). With a
``deep_branch`` it runs DeepCache instead (the full UNet at key steps, keeping the deep hidden state,
only the shallow path between them), and a ``correction`` (:mod:`fcr.core.scale_shift`) corrects
what a cached step reuses, as :func:`fcr.core.sampler.sample` does."""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from fcr.core.sampler import PriorNoise, repeat_per_sample
from fcr.core.sampler import key_steps as resolve_key_steps
from fcr.core.unet import (DeepBranch, EncoderFeatures, UnsupportedUNetError, check_supported, decode, deep_branch,
                           deep_forward, encode, shallow_forward)

__all__ = ["CacheSettings", "CacheStats", "EncoderCache"]

_ATTR = "_fcr_encoder_cache"  # the controller, on the pipeline and on the wrapping callables
# Config fields an FCR UNet must share with the pipeline's UNet.
_MATCHING_FIELDS = ("in_channels", "out_channels", "cross_attention_dim", "sample_size")


@dataclass(frozen=True)
class CacheSettings:
    """What :func:`enable_encoder_cache` was given: ``schedule`` is ``"uniform"`` (with ``stride``),
    another :func:`fcr.core.sampler.key_steps` schedule name (e.g. ``"50ls"``) or an explicit index tuple."""

    schedule: str | tuple[int, ...]
    stride: int
    parallel: bool
    prior_noise: PriorNoise
    deep_branch: int | None = None  # DeepCache's cache_branch_id instead of encoder caching
    correction: Any = None  # a CacheScaleShift trained for this sampler (fcr.core.scale_shift)

    def key_steps(self, num_steps: int) -> list[int]:
        """Key-step indices for a call with ``num_steps`` scheduler timesteps."""
        return resolve_key_steps(num_steps, self.schedule, self.stride)


@dataclass
class CacheStats:
    """What the most recent pipeline call did: ``num_steps`` scheduler timesteps, the resolved
    ``key_steps``, the step indices at which the encoder ran (``encoder_steps``) and the tensor batch
    size of every decoder call (a batched ``parallel`` call counts once)."""

    num_steps: int
    key_steps: list[int]
    encoder_steps: list[int] = field(default_factory=list)
    decoder_batch_sizes: list[int] = field(default_factory=list)


@dataclass
class _Run:
    """State of one pipeline call; dropped when the next call starts."""

    timesteps: torch.Tensor
    keys: frozenset[int]
    stats: CacheStats
    next_index: int = 0
    features: EncoderFeatures | torch.Tensor | None = None  # DeepCache: the deep hidden state
    context: tuple[torch.Tensor, dict[str, Any]] | None = None  # conditioning used at the key step
    predictions: dict[int, torch.Tensor] = field(default_factory=dict)  # parallel decoding
    initial_noise: torch.Tensor | None = None  # z_T, for prior noise injection
    branch: DeepBranch | None = None  # DeepCache: resolved (and checked) once, at the first key step


def _equal_timestep(reference: torch.Tensor, timestep: Any) -> bool:
    value = torch.as_tensor(timestep, device=reference.device)
    return bool((value == reference).all())


def _same(a: Any, b: Any) -> bool:
    """Whether two conditioning values are the same (identity, or equal tensors / dicts / values)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # e.g. objects without a boolean equality
        return False


class EncoderCache:
    """Owns the wrappers of one pipeline: ``unet.forward`` and (for prior noise) ``scheduler.step``."""

    def __init__(self, pipe: Any, settings: CacheSettings) -> None:
        self.settings = settings
        self._pipe = weakref.ref(pipe)
        self.run: _Run | None = None
        self.last_stats: CacheStats | None = None
        self._unet: UNet2DConditionModel | None = None
        self._unet_saved: tuple[bool, Any] = (False, None)
        self._scheduler: Any = None
        self._scheduler_saved: tuple[bool, Any] = (False, None)

    # ------------------------------------------------------------------ installing

    @property
    def pipe(self) -> Any:
        pipe = self._pipe()
        if pipe is None:
            raise RuntimeError("the pipeline this encoder cache was enabled on no longer exists")
        return pipe

    def install(self) -> None:
        self.wrap_unet(self.pipe.unet)
        if self.settings.prior_noise.enabled:
            self.hook_scheduler(self.pipe.scheduler)

    def uninstall(self) -> None:
        self.unhook_scheduler()
        self.unwrap_unet()
        self.run = None

    def wrap_unet(self, unet: UNet2DConditionModel) -> None:
        _check_unet(unet)
        original = unet.forward
        signature = inspect.signature(original)

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.forward(unet, signature.bind(*args, **kwargs))

        setattr(forward, _ATTR, self)
        self._unet_saved = ("forward" in unet.__dict__, unet.__dict__.get("forward"))
        unet.forward = forward
        self._unet = unet

    def unwrap_unet(self) -> None:
        unet, self._unet = self._unet, None
        if unet is None:
            return
        current = unet.__dict__.get("forward")
        if getattr(current, _ATTR, None) is not self:
            raise RuntimeError(
                "pipe.unet.forward was replaced after enable_encoder_cache (e.g. by an offload hook); "
                "remove that wrapper before disabling encoder caching"
            )
        had, previous = self._unet_saved
        if had:
            unet.forward = previous
        else:
            del unet.forward  # back to the class's forward

    def hook_scheduler(self, scheduler: Any) -> None:
        original = scheduler.step
        signature = inspect.signature(original)
        if "sample" not in signature.parameters:
            raise ValueError(
                f"prior noise injection needs scheduler.step(model_output, timestep, sample, ...); "
                f"{type(scheduler).__name__}.step has no 'sample' argument"
            )

        @functools.wraps(original)
        def step(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            self.inject_prior_noise(scheduler, bound)
            return original(*bound.args, **bound.kwargs)

        setattr(step, _ATTR, self)
        self._scheduler_saved = ("step" in scheduler.__dict__, scheduler.__dict__.get("step"))
        scheduler.step = step
        self._scheduler = scheduler

    def unhook_scheduler(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is None:
            return
        had, previous = self._scheduler_saved
        if getattr(scheduler.__dict__.get("step"), _ATTR, None) is not self:
            raise RuntimeError("pipe.scheduler.step was replaced after enable_encoder_cache; cannot restore it")
        if had:
            scheduler.step = previous
        else:
            del scheduler.step

    # ------------------------------------------------------------------ one call

    def sync(self, scheduler: Any) -> _Run:
        """The state of the current call: a new one when the scheduler holds new timesteps."""
        timesteps = scheduler.timesteps
        if timesteps is None:
            raise RuntimeError("pipe.scheduler has no timesteps: the UNet was called outside a pipeline call")
        if self.run is None or self.run.timesteps is not timesteps:
            self.start(timesteps)
        return self.run

    def start(self, timesteps: torch.Tensor) -> None:
        correction = self.settings.correction
        if correction is not None and correction.num_inference_steps != len(timesteps):
            raise ValueError(f"the scale-shift was trained for {correction.configuration} with "
                             f"{correction.num_inference_steps} steps; this call runs {len(timesteps)}")
        keys = self.settings.key_steps(len(timesteps))
        self.run = _Run(timesteps, frozenset(keys), CacheStats(len(timesteps), keys))
        self.last_stats = self.run.stats

    def locate(self, run: _Run, timestep: Any) -> _Run:
        """Find the step index of ``timestep``; sets ``run.next_index`` to it (maybe in a fresh run)."""
        ts, i = run.timesteps, run.next_index
        if i < len(ts) and _equal_timestep(ts[i], timestep):
            return run
        if i > 0 and _equal_timestep(ts[0], timestep):  # the same timesteps reused by another loop
            self.start(ts)
            return self.run
        if i == 0:  # a loop that starts later in the schedule (e.g. image-to-image)
            hits = (ts == torch.as_tensor(timestep, device=ts.device).flatten()[0]).nonzero()
            if len(hits):
                run.next_index = int(hits[0])
                return run
        expected = f"{ts[i].item()} (step {i})" if i < len(ts) else f"none (all {len(ts)} steps done)"
        raise RuntimeError(
            f"pipe.unet was called with timestep {torch.as_tensor(timestep).flatten()[0].item()} but the "
            f"next entry of pipe.scheduler.timesteps is {expected}: encoder caching follows the pipeline's "
            "step loop (one UNet call per scheduler timestep); call fcr.diffusers_cache.disable_encoder_cache "
            "before using pipe.unet another way"
        )

    def forward(self, unet: UNet2DConditionModel, bound: inspect.BoundArguments) -> Any:
        """The cached UNet call: encoder + decoder at a key step, the decoder alone otherwise."""
        bound.apply_defaults()
        args = dict(bound.arguments)
        sample, timestep, context = args.pop("sample"), args.pop("timestep"), args.pop("encoder_hidden_states")
        return_dict = args.pop("return_dict", True)
        # Every other argument that is set goes to fcr.core.unet, which refuses those it cannot split
        # (ControlNet residuals, class labels, added conditions) with an UnsupportedUNetError.
        kwargs = {k: v for k, v in args.items() if v is not None and not (isinstance(v, dict) and not v)}
        attention_kwargs = kwargs.get("cross_attention_kwargs")
        if attention_kwargs is not None and "scale" in attention_kwargs:
            # forward() applies a LoRA scale around the blocks; the split does not, so only 1.0 is exact.
            if float(attention_kwargs["scale"]) != 1.0:
                raise UnsupportedUNetError(
                    "a LoRA scale in cross_attention_kwargs is not applied by fcr.core.unet's encoder/decoder "
                    "split; fuse the LoRA weights (pipe.fuse_lora(lora_scale=...)) instead"
                )
            kwargs["cross_attention_kwargs"] = {k: v for k, v in attention_kwargs.items() if k != "scale"} or None
            if kwargs["cross_attention_kwargs"] is None:
                del kwargs["cross_attention_kwargs"]

        pipe = self.pipe
        if self.settings.prior_noise.enabled and pipe.scheduler is not self._scheduler:
            self.unhook_scheduler()  # pipe.scheduler was swapped after enabling: follow it
            self.hook_scheduler(pipe.scheduler)
        run = self.locate(self.sync(pipe.scheduler), timestep)
        i = run.next_index
        if i in run.keys or run.features is None:
            prediction = self.key_step(unet, run, i, sample, timestep, context, kwargs)
        else:
            prediction = run.predictions.pop(i, None)
            if self.settings.deep_branch is not None:
                prediction = shallow_forward(unet, sample, timestep, context, self.reused(run.features, i), run.branch,
                                             **kwargs)
            elif prediction is None or not _same(run.context, (context, kwargs)):
                # Sequential decoding, or the conditioning changed since the key step (a callback).
                prediction = self.decode(unet, run, self.reused(run.features, i), timestep, context, kwargs)
        run.next_index = i + 1
        if run.next_index == len(run.timesteps):  # last step: free the features
            run.features, run.context, run.predictions = None, None, {}
        if not return_dict:
            return (prediction,)
        return UNet2DConditionOutput(sample=prediction)

    def key_step(
        self,
        unet: UNet2DConditionModel,
        run: _Run,
        i: int,
        sample: torch.Tensor,
        timestep: Any,
        context: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        if self.settings.deep_branch is not None:
            if run.branch is None:
                run.branch = deep_branch(unet, self.settings.deep_branch)
            prediction, deep = deep_forward(unet, sample, timestep, context, run.branch, **kwargs)
            run.stats.encoder_steps.append(i)
            run.features, run.context, run.predictions = deep, (context, kwargs), {}
            return prediction
        features = encode(unet, sample, timestep, context, **kwargs)
        run.stats.encoder_steps.append(i)
        run.features, run.context, run.predictions = features, (context, kwargs), {}
        stop = min([k for k in run.keys if k > i], default=len(run.timesteps))
        if not self.settings.parallel or stop - i == 1:
            return self.decode(unet, run, features, timestep, context, kwargs)
        # Parallel decoding: everything a non-key step's decoder needs is known now, so the decoders
        # of steps i..stop-1 run as one batched call (as fcr.core.sampler.sample(parallel=True) does).
        k, batch = stop - i, sample.shape[0]
        ts = run.timesteps[i:stop].to(sample.device)
        if self.settings.correction is None:
            repeated = features.map(lambda x: x.repeat(k, *([1] * (x.ndim - 1))))
        else:
            repeated = EncoderFeatures.cat([features] + [self.reused(features, j) for j in range(i + 1, stop)])
        batched_kwargs = {name: repeat_per_sample(value, k, batch) for name, value in kwargs.items()}
        out = self.decode(
            unet, run, repeated, ts.repeat_interleave(batch), repeat_per_sample(context, k, batch), batched_kwargs
        )
        predictions = out.chunk(k)
        run.predictions = {i + j: p for j, p in enumerate(predictions) if j > 0}
        return predictions[0]

    def reused(self, cached: Any, step: int) -> Any:
        """What a cached step ``step`` reads: the kept features or deep state, corrected when a
        scale-shift was given."""
        correction = self.settings.correction
        if correction is None:
            return cached
        if self.settings.deep_branch is not None:
            return correction.correct_deep(cached, step)
        return correction.correct_features(cached, step)

    def decode(
        self,
        unet: UNet2DConditionModel,
        run: _Run,
        features: EncoderFeatures,
        timestep: Any,
        context: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        out = decode(unet, features, timestep, context, **kwargs)
        run.stats.decoder_batch_sizes.append(out.shape[0])
        return out

    def inject_prior_noise(self, scheduler: Any, bound: inspect.BoundArguments) -> None:
        """Before a scheduler step with ``t / num_train_timesteps < threshold``: ``sample += alpha * z_T``."""
        run = self.sync(scheduler)
        sample = bound.arguments["sample"]
        if run.initial_noise is None:
            # The first step of a call sees the initial latents, z_T * init_noise_sigma.
            run.initial_noise = sample / scheduler.init_noise_sigma
        prior = self.settings.prior_noise
        timestep = torch.as_tensor(bound.arguments["timestep"]).flatten()[0]
        if float(timestep) / scheduler.config.num_train_timesteps < prior.threshold:
            bound.arguments["sample"] = sample + prior.alpha * run.initial_noise


def _check_unet(unet: Any) -> None:
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"encoder caching needs a diffusers UNet2DConditionModel; got {type(unet).__name__}")
    check_supported(unet)  # UnsupportedUNetError (a ValueError) for what the split cannot reproduce
    if hasattr(unet, "_hf_hook"):
        raise ValueError(
            "pipe.unet has an accelerate hook (CPU offload or a device map); encoder caching calls the "
            "UNet's blocks directly and cannot run through it: enable caching on a pipeline without offloading"
        )
    owner = getattr(unet.__dict__.get("forward"), _ATTR, None)
    if owner is not None:
        raise ValueError("this UNet already has encoder caching enabled through another pipeline; disable it there")
