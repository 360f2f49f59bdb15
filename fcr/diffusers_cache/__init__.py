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

import inspect
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import torch

from fcr.core.sampler import PriorNoise
from fcr.core.scale_shift import SCALE_SHIFT_FILE, load_scale_shift
from fcr.core.sampler import key_steps as resolve_key_steps
from fcr.diffusers_cache.controller import _ATTR, _MATCHING_FIELDS, CacheSettings, CacheStats, EncoderCache, _check_unet

__all__ = [
    "CacheSettings",
    "CacheStats",
    "disable_cache_trained",
    "disable_encoder_cache",
    "enable_cache_trained",
    "enable_encoder_cache",
    "encoder_cache_settings",
    "encoder_cache_stats",
    "load_fcr_unet",
]


# ---------------------------------------------------------------------------------- public API


def _controller(pipe: Any) -> EncoderCache | None:
    return getattr(pipe, _ATTR, None)


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
    return _enable(pipe, _settings(stride, key_steps, parallel, prior_noise))


def _enable(pipe: Any, settings: CacheSettings) -> Any:
    if not hasattr(pipe, "unet") or not hasattr(pipe, "scheduler"):
        raise ValueError(f"expected a diffusers pipeline with .unet and .scheduler; got {type(pipe).__name__}")
    _check_unet_or_own(pipe)
    if settings.deep_branch is not None:
        from fcr.core.unet import deep_branch

        deep_branch(pipe.unet, settings.deep_branch)  # ValueError for a branch the UNet does not have
    if settings.prior_noise.enabled and "sample" not in inspect.signature(pipe.scheduler.step).parameters:
        raise ValueError(f"prior noise injection needs a scheduler.step with a 'sample' argument; "
                         f"{type(pipe.scheduler).__name__}.step has none")
    disable_encoder_cache(pipe)
    controller = EncoderCache(pipe, settings)
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


_DEEPCACHE_ATTR = "_fcr_deepcache_helper"


def enable_cache_trained(pipe: Any, folder: str | Path) -> dict[str, Any]:
    """Load a cache-aware fine-tune (:mod:`fcr.train.cache_aware`) into ``pipe`` and switch on the cached
    sampler it was trained for: encoder caching (FD-N, with its prior noise) or DeepCache-N-bB through
    the DeepCache package's ``DeepCacheSDHelper``; a ``scale_shift`` fine-tune's correction
    (``unet/cache_scale_shift.safetensors``) is applied by fcr's own controller, DeepCache included.
    Returns the run's record: sample with its ``num_inference_steps`` and ``guidance_scale`` and a
    DDIM ``pipe.scheduler``, as it was trained::

        record = fc.enable_cache_trained(pipe, "outputs/my_cache_aware_run")
        images = pipe(prompt, num_inference_steps=record["num_inference_steps"],
                      guidance_scale=record["guidance_scale"]).images
        fc.disable_cache_trained(pipe)
    """
    import json

    from fcr.contract import CACHE_TRAINING_FILE

    record_file = Path(folder).expanduser() / CACHE_TRAINING_FILE
    if not record_file.is_file():
        raise FileNotFoundError(f"{record_file} not found: not a finished cache-aware fine-tune")
    record = json.loads(record_file.read_text())
    disable_cache_trained(pipe)
    load_fcr_unet(pipe, folder, subfolder="unet")
    correction_file = Path(folder).expanduser() / "unet" / SCALE_SHIFT_FILE
    if correction_file.is_file():
        correction = load_scale_shift(correction_file).to(pipe.unet.device)
        prior = PriorNoise(**record["prior_noise"]) if record["deep_branch"] is None else PriorNoise(enabled=False)
        _enable(pipe, CacheSettings("uniform", int(record["interval"]), False, prior, record["deep_branch"], correction))
    elif record["deep_branch"] is None:
        enable_encoder_cache(pipe, stride=record["interval"], prior_noise=PriorNoise(**record["prior_noise"]))
    else:
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=record["interval"], cache_branch_id=record["deep_branch"])
        helper.enable()
        setattr(pipe, _DEEPCACHE_ATTR, helper)
    return record


def disable_cache_trained(pipe: Any) -> Any:
    """Switch off what :func:`enable_cache_trained` switched on (the fine-tuned UNet stays); returns ``pipe``."""
    disable_encoder_cache(pipe)
    helper = getattr(pipe, _DEEPCACHE_ATTR, None)
    if helper is not None:
        helper.disable()
        delattr(pipe, _DEEPCACHE_ATTR)
    return pipe


def _config_value(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    return tuple(value) if isinstance(value, list) else value
