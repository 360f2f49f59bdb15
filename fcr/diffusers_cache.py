"""Encoder caching inside a stock diffusers Stable Diffusion pipeline (pipeline-level API).

Usage (like DeepCache's ``DeepCacheSDHelper``)::

    import fcr.diffusers_cache as fc
    fc.load_fcr_unet(pipe, "outputs/my_fcr_run")            # optional: an FCR-fine-tuned UNet
    fc.enable_encoder_cache(pipe, key_steps="50ls")           # or stride=10, or key_steps=[0, 1, 2, 5]
    images = pipe("a red coat", num_inference_steps=50).images  # the pipeline's own __call__
    fc.disable_encoder_cache(pipe)                            # back to the stock pipeline

``enable_encoder_cache`` replaces ``pipe.unet.forward`` (an instance attribute, nothing else of
the UNet changes) with a callable that follows the pipeline's step loop: at a *key step* it runs
:func:`fcr.core.unet.encode` and :func:`fcr.core.unet.decode` and keeps the encoder features; at any other
step it runs only :func:`fcr.core.unet.decode` on the kept features with that step's timestep, exactly
as :func:`fcr.core.sampler.sample` does. Step ``i`` is the index into ``pipe.scheduler.timesteps``
(0 = noisiest); the key steps are resolved with :func:`fcr.core.sampler.key_steps` from the length of
``pipe.scheduler.timesteps`` at call time, so every call may use another ``num_inference_steps``.
Each call starts from a clean state: a new call is recognised by the new ``timesteps`` tensor that
the pipeline's ``scheduler.set_timesteps`` creates. Prior noise injection wraps
``pipe.scheduler.step`` the same way. Everything else of the pipeline (prompts, negative prompts,
guidance, generators, callbacks, ``output_type``) is the user's own pipeline code.

``parallel=True`` decodes a key step and the non-key steps up to the next key step in one batched
call at the key step (their decoders need only the cached features, the timesteps and the
conditioning, all known then) and returns the stored predictions at the following steps; a step
whose conditioning was changed by a callback is decoded again. Not supported: ControlNet/adapter
residuals, IP-Adapter and class/added conditions (UnsupportedUNetError), a LoRA ``scale`` other than
1 in ``cross_attention_kwargs`` (fuse the LoRA instead), accelerate offload hooks on the UNet, and
using ``pipe.unet`` outside the pipeline's step loop while caching is on (RuntimeError).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from fcr.core.sampler import PriorNoise, repeat_per_sample
from fcr.core.sampler import key_steps as resolve_key_steps
from fcr.core.unet import EncoderFeatures, UnsupportedUNetError, check_supported, decode, encode

__all__ = [
    "CacheSettings",
    "CacheStats",
    "disable_encoder_cache",
    "enable_encoder_cache",
    "encoder_cache_settings",
    "encoder_cache_stats",
    "load_fcr_unet",
]

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
    features: EncoderFeatures | None = None
    context: tuple[torch.Tensor, dict[str, Any]] | None = None  # conditioning used at the key step
    predictions: dict[int, torch.Tensor] = field(default_factory=dict)  # parallel decoding
    initial_noise: torch.Tensor | None = None  # z_T, for prior noise injection


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


class _EncoderCache:
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
            if prediction is None or not _same(run.context, (context, kwargs)):
                # Sequential decoding, or the conditioning changed since the key step (a callback).
                prediction = self.decode(unet, run, run.features, timestep, context, kwargs)
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
        repeated = features.map(lambda x: x.repeat(k, *([1] * (x.ndim - 1))))
        batched_kwargs = {name: repeat_per_sample(value, k, batch) for name, value in kwargs.items()}
        out = self.decode(
            unet, run, repeated, ts.repeat_interleave(batch), repeat_per_sample(context, k, batch), batched_kwargs
        )
        predictions = out.chunk(k)
        run.predictions = {i + j: p for j, p in enumerate(predictions) if j > 0}
        return predictions[0]

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


# ---------------------------------------------------------------------------------- public API


def _controller(pipe: Any) -> _EncoderCache | None:
    return getattr(pipe, _ATTR, None)


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


def _settings(
    stride: int | None, key_steps: str | Sequence[int] | None, parallel: bool, prior_noise: bool | PriorNoise
) -> CacheSettings:
    if (stride is None) == (key_steps is None):
        raise ValueError(
            "give exactly one of stride= (every stride-th step is a key step) or key_steps= "
            "('50ls' or a list of step indices)"
        )
    if not isinstance(parallel, bool):
        raise ValueError(f"parallel must be True or False; got {parallel!r}")
    if isinstance(prior_noise, bool):
        prior = PriorNoise(enabled=prior_noise)
    elif isinstance(prior_noise, PriorNoise):
        prior = prior_noise
    else:
        raise ValueError(f"prior_noise must be a bool or an fcr.core.sampler.PriorNoise; got {prior_noise!r}")
    if stride is not None:
        resolve_key_steps(1, "uniform", stride)  # ValueError unless an integer >= 1
        return CacheSettings("uniform", int(stride), parallel, prior)
    if isinstance(key_steps, str):
        if key_steps == "uniform":
            raise ValueError("key_steps='uniform' needs a stride: use stride= instead")
        resolve_key_steps(50, key_steps)  # ValueError for an unknown schedule name
        return CacheSettings(key_steps, 1, parallel, prior)
    if isinstance(key_steps, (torch.Tensor, bytes)) or not isinstance(key_steps, Sequence):
        raise ValueError(f"key_steps must be a schedule name ('50ls') or a list of step indices; got {key_steps!r}")
    steps = list(key_steps)
    if steps and all(isinstance(s, Integral) and not isinstance(s, bool) for s in steps):
        # Checks what can be checked before the number of steps is known (a call checks the range).
        resolve_key_steps(max(int(s) for s in steps) + 1, steps)
    else:
        resolve_key_steps(1, steps)  # raises: empty or non-integer
    return CacheSettings(tuple(int(s) for s in steps), 1, parallel, prior)


def enable_encoder_cache(
    pipe: Any,
    stride: int | None = None,
    key_steps: str | Sequence[int] | None = None,
    *,
    parallel: bool = False,
    prior_noise: bool | PriorNoise = False,
) -> Any:
    """Make ``pipe(...)`` sample with encoder caching; returns ``pipe``.

    Give ``stride`` (key steps ``0, stride, 2*stride, ...``) or ``key_steps`` (``"50ls"``, scaled to
    the call's step count, or explicit indices into ``pipe.scheduler.timesteps`` starting at 0).
    ``parallel`` batches the decoders of a key step and the non-key steps up to the next key step
    into one call at the key step; ``prior_noise`` (True or a PriorNoise) adds ``alpha * z_T`` before
    late scheduler steps. Enabling again replaces the previous settings; after replacing
    ``pipe.unet`` by hand (rather than with :func:`load_fcr_unet`), enable again.
    """
    settings = _settings(stride, key_steps, parallel, prior_noise)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "scheduler"):
        raise ValueError(f"expected a diffusers pipeline with .unet and .scheduler; got {type(pipe).__name__}")
    _check_unet_or_own(pipe)
    if settings.prior_noise.enabled and "sample" not in inspect.signature(pipe.scheduler.step).parameters:
        raise ValueError(f"prior noise injection needs a scheduler.step with a 'sample' argument; "
                         f"{type(pipe.scheduler).__name__}.step has none")
    disable_encoder_cache(pipe)
    controller = _EncoderCache(pipe, settings)
    try:
        controller.install()
    except BaseException:
        controller.uninstall()
        raise
    setattr(pipe, _ATTR, controller)
    return pipe


def _check_unet_or_own(pipe: Any) -> None:
    # Validate before touching anything, so a failed enable leaves the previous state in place.
    controller = _controller(pipe)
    if controller is not None and pipe.unet is controller._unet:
        return  # ours; re-enabling replaces it
    _check_unet(pipe.unet)


def disable_encoder_cache(pipe: Any) -> Any:
    """Restore the pipeline's own ``unet.forward`` (and ``scheduler.step``); returns ``pipe``.
    Does nothing when caching is not enabled."""
    controller = _controller(pipe)
    if controller is not None:
        controller.uninstall()
        delattr(pipe, _ATTR)
    return pipe


def encoder_cache_settings(pipe: Any) -> CacheSettings | None:
    """The settings caching was enabled with, or None when it is off."""
    controller = _controller(pipe)
    return None if controller is None else controller.settings


def encoder_cache_stats(pipe: Any) -> CacheStats | None:
    """Key steps and encoder/decoder calls of the most recent cached call (None before any)."""
    controller = _controller(pipe)
    return None if controller is None else controller.last_stats


def _unet_folder(folder: Path, subfolder: str | None) -> Path:
    def is_unet(path: Path) -> bool:
        return (path / "config.json").is_file() and (path / "diffusion_pytorch_model.safetensors").is_file()

    candidates = [folder / subfolder] if subfolder is not None else [folder / "unet_ema", folder / "unet", folder]
    for path in candidates:
        if is_unet(path):
            return path
    from fcr.backends.models import ModelNotFoundError

    raise ModelNotFoundError(
        f"no diffusers UNet in {folder}: expected config.json + diffusion_pytorch_model.safetensors in "
        + (f"{folder / subfolder}" if subfolder is not None else f"{folder}/unet_ema, {folder}/unet or {folder}")
    )


def load_fcr_unet(pipe: Any, folder: str | Path, *, subfolder: str | None = None) -> Any:
    """Swap the UNet of an FCR run folder into ``pipe`` (same device and dtype); returns ``pipe``.

    ``folder``: a training run folder (``unet_ema/`` preferred over ``unet/``, as fcr's evaluation
    does; ``subfolder="unet"`` picks the raw weights) or a UNet folder itself; safetensors only.
    Raises ValueError naming the config field when the UNet does not fit the pipeline. Encoder
    caching, when enabled, stays enabled on the new UNet; attention processors are not carried over.
    """
    from fcr.backends.models import load_unet_folder

    path = _unet_folder(Path(folder).expanduser(), subfolder)
    unet = load_unet_folder(path)
    current = pipe.unet
    mismatched = [
        f"{name}: {getattr(unet.config, name)!r} in {path}, {getattr(current.config, name)!r} in pipe.unet"
        for name in _MATCHING_FIELDS
        if _config_value(unet.config, name) != _config_value(current.config, name)
    ]
    if mismatched:
        raise ValueError("the FCR UNet does not fit this pipeline: " + "; ".join(mismatched))
    unet.to(device=current.device, dtype=current.dtype).eval()
    controller = _controller(pipe)
    if controller is None:
        pipe.unet = unet
        return pipe
    _check_unet(unet)  # before anything changes
    controller.unwrap_unet()
    pipe.unet = unet
    controller.wrap_unet(unet)
    return pipe


def _config_value(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    return tuple(value) if isinstance(value, list) else value
